"""Sampling from a trained decoder: `generate_step` yields one token at a time (prefill of the
prompt through the causal path into the KV cache, then one token per call; mlx-lm
`generate.py: generate_step`), `make_sampler` returns the sampling closure (mlx-lm
`sample_utils.py`), and `generate` streams text on top. Sampling runs in NumPy on the
float64 log-probabilities, so a seed gives the same text on every backend that gives the same
logits. May import: anything but cli.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Iterator

import numpy as np

from moe_min.models import data, decode


def make_sampler(temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 seed: int = 0) -> Callable[[np.ndarray], int]:
    """A closure: log-probabilities (V,) -> token id. temperature 0 is greedy; top_k > 0
    keeps the k most likely tokens; top_p < 1 keeps the smallest set whose probability
    reaches top_p (nucleus). Its generator is seeded once: the same seed, the same draws."""
    for name, value, ok, accepted in (
            ("temperature", temperature, 0 <= temperature < np.inf, "a finite number >= 0"),
            ("top_k", top_k, top_k >= 0, "an integer >= 0 (0: no cut)"),
            ("top_p", top_p, 0 < top_p <= 1, "0 < top_p <= 1"),
            ("seed", seed, seed >= 0, "an integer >= 0")):
        if not ok:
            raise ValueError(f"sampler {name} {value!r}: expected {accepted}")
    rng = np.random.default_rng(seed)

    def sample(logprobs: np.ndarray) -> int:
        logprobs = np.asarray(logprobs, np.float64)
        if temperature == 0:
            return int(np.argmax(logprobs))
        order = np.argsort(-logprobs, kind="stable")  # most likely first, ties by id
        keep = len(order) if top_k == 0 else min(top_k, len(order))
        scaled = logprobs[order[:keep]] / temperature
        if not np.isfinite(scaled[0]):  # a temperature so small the scale overflows: greedy
            return int(order[0])
        p = np.exp(scaled - scaled.max())
        p /= p.sum()
        if top_p < 1:
            # the nucleus: tokens up to and including the one where the mass reaches top_p
            cut = int(np.searchsorted(np.cumsum(p), top_p)) + 1
            p = p[:cut] / p[:cut].sum()
        return int(order[rng.choice(len(p), p=p)])

    return sample


def generate_step(ops, config, params: dict, prompt: np.ndarray, *,
                  sampler: Callable[[np.ndarray], int], max_tokens: int | None = None,
                  stats: dict | None = None, skip: str | None = None,
                  decoder: decode.Decoder | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (token, log-probabilities (V,)) for each new token after `prompt` (1-d token
    ids), `max_tokens` of them (None: without end). The prompt is prefilled in one causal
    call, which also fills the cache; each new token is then one decode call, both through
    compiled functions of fixed shapes (models/decode.py; `skip` is its MoD skip). When the
    context is full, the last half of it is prefilled afresh at positions 0.. (the model
    never saw positions past its context), so generation can run past the context.
    `stats`, if given, gets the realised fraction of the window's tokens that entered each
    MoD-routed block (its sparse cache's length): near the capacity, not 1 (P1).
    `decoder`: reuse one (and its compiled steps) across calls."""
    history = [int(t) for t in np.asarray(prompt).reshape(-1)]
    check_prompt(config, len(history))
    decoder = decoder or decode.Decoder(ops, config, params, skip=skip)
    window, count = history, 0
    try:
        while max_tokens is None or count < max_tokens:
            if window is not None:  # (re)fill the cache with a whole window
                last = decoder.prefill(np.array([window], np.int32))[0]
                window = None
            logprobs = last - np.logaddexp.reduce(last)
            token = sampler(logprobs)
            yield token, logprobs
            history.append(token)
            count += 1
            if decoder.position == config.context:
                window = history[-(config.context // 2):]
            else:
                last = decoder.step(np.array([[token]], np.int32))[0]
    finally:  # read once at the end (or when the caller stops): a host read per token costs
        if stats is not None and decoder.cache is not None:
            stats["routed_fraction"] = {i: n / decoder.position
                                        for i, n in decoder.lengths().items()
                                        if config.block_kind(i) == "mod"}


def check_prompt(config, length: int) -> None:
    if length == 0:
        raise ValueError("the prompt is empty: give at least one byte (e.g. --prompt 'def ')")
    if length >= config.context:
        raise ValueError(f"the prompt is {length} bytes: the context is {config.context}, so "
                         f"it must be at most {config.context - 1} to leave room to generate")


def generate(ops, config, params: dict, prompt: str, *, max_tokens: int = 200,
             sampler: Callable[[np.ndarray], int], emit: Callable[[str], None] | None = None,
             stats: dict | None = None):
    """Generate text after `prompt`; each piece of text goes to `emit` as soon as its bytes
    form whole UTF-8 characters. Returns (text, tokens per second of the whole generation,
    prefill and compiles included, and the number of tokens). `stats` as in `generate_step`,
    plus `compile_seconds` (the calls that traced a step) and `steady_tokens_per_s` (without
    them)."""
    tokens = data.encode(prompt)
    check_prompt(config, len(tokens))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    steps = decode.Decoder(ops, config, params)
    pieces, count, start = [], 0, time.perf_counter()
    for token, _ in generate_step(ops, config, params, tokens, sampler=sampler,
                                  max_tokens=max_tokens, stats=stats, decoder=steps):
        count += 1
        piece = decoder.decode(bytes([token]))
        if piece:
            pieces.append(piece)
            if emit:
                emit(piece)
    tail = decoder.decode(b"", final=True)
    if tail and emit:
        emit(tail)
    seconds = time.perf_counter() - start
    if stats is not None:
        steady = seconds - steps.compile_seconds
        stats.update(compile_seconds=steps.compile_seconds,
                     steady_tokens_per_s=count / steady if steady > 0 else 0.0)
    return "".join(pieces) + tail, count / seconds if seconds > 0 else 0.0, count
