"""Static-shape incremental decoding: every array a decode call touches has a shape fixed by the
config, so a jit backend (mx.compile, TinyJit, jax.jit) traces the step once and replays it for
every token instead of scheduling and compiling a new graph per call.

The cache is a flat dict of backend arrays, per attention block i:
  `i.k`, `i.v` (B, Hd, L, D/Hd)  keys (rotated at their true positions) and values,
  `i.pos` (B, L) int             the true position held in each row, -1 for an empty row,
  `i.len` (B,) int               rows filled so far; a new token goes to row `len`.
L is the context for every block: a dense or MoE block holds every token of the window, a
MoD-routed block at most all of them (its sparse cache: the routed tokens only, in time order,
at their true positions; mod_and_predictor.md §7). Writes are one-hot selections by row, so a
call's shapes do not depend on how many tokens a MoD block took.

A call is `step(params, tokens (B, n), start (1,), limit (1,), cache) -> (logits, cache)`:
positions start.., and only tokens before `limit` are real (the rest pad a prefill to its
bucket: they are never written, and later positions are invisible to earlier ones anyway).

MoD blocks at decode time. A token that skips a routed block should cost nothing there, but
"skip" is data, and a compiled graph has no data-dependent branch. Two ways, both here:
- "mask": one compiled step runs every routed block on the token and masks it out (no write to
  the cache, the residual unchanged) when the predictor says skip: no host read, no saving.
- "branch": the step runs as if the token skipped every MoD block, computing each block's
  decision on the way, and one host read fetches the decisions with the logits. At the first
  block the token enters, the writes before it are kept and the step reruns from that block's
  input with the block run (one compiled variant per MoD block). A token costs one call plus
  one per block it enters; a skipped block costs its predictor only.
Which is faster depends on the backend's per-call cost: `moe-min bench generate` prints both.
Prefill is always "mask" (a whole prompt routes some tokens into every block).
May import: anything but cli.
"""

from __future__ import annotations

import time

import numpy as np

from moe_min.models import lm
from moe_min.models.configs import LMConfig
from moe_min.ops import Ops
from moe_min.routing import causal_decisions

SKIP_MODES = ("mask", "branch")


def buckets(context: int, smallest: int = 16) -> list[int]:
    """Prefill lengths: powers of two from `smallest` below the context, then the context."""
    out, n = [], smallest
    while n < context:
        out.append(n)
        n *= 2
    return [*out, context]


def check_batch(config: LMConfig, batch: int) -> None:
    if config.mod is not None and batch != 1:
        raise ValueError(f"decode: batch {batch} with MoD blocks: each sequence routes different "
                         f"tokens into a routed block, so decode batch 1")


def new_cache(ops: Ops, config: LMConfig, batch: int = 1) -> dict:
    """An empty cache (module docstring) for `batch` sequences."""
    check_batch(config, batch)
    heads, L = config.heads, config.context
    cache = {}
    for i in range(config.layers):
        z = np.zeros((batch, heads, L, config.dim // heads), np.float32)
        cache.update({f"{i}.k": z, f"{i}.v": z, f"{i}.pos": np.full((batch, L), -1, np.int32),
                      f"{i}.len": np.zeros(batch, np.int32)})
    return {name: ops.asarray(value) for name, value in cache.items()}


def _writer(ops: Ops, cache: dict, new: dict, i: int, limit):
    """Block i's `kv` hook (layers.block_branch): write the call's real rows (valid, before
    `limit`) at rows len, len+1, .. in order, then attend over the whole cache."""
    k_old, v_old, pos_old, length = (cache[f"{i}.{n}"] for n in ("k", "v", "pos", "len"))
    L = k_old.shape[2]

    def kv(k, v, positions, valid):
        B, n = positions.shape
        valid = valid & (positions < ops.reshape(limit, (1, 1)))
        count = ops.astype(valid, "int")
        if n == 1:  # a decode step: one broadcast select per array, no one-hot matmul
            hot = (ops.reshape(ops.arange(L), (1, L)) == ops.reshape(length, (B, 1))) & valid
            where4 = ops.reshape(hot, (B, 1, L, 1))
            new[f"{i}.k"] = ops.where(where4, k, k_old)
            new[f"{i}.v"] = ops.where(where4, v, v_old)
            new[f"{i}.pos"] = ops.where(hot, positions, pos_old)
            new[f"{i}.len"] = length + ops.reshape(count, (B,))
            return new[f"{i}.k"], new[f"{i}.v"], new[f"{i}.pos"], new[f"{i}.pos"] >= 0
        row = ops.reshape(length, (B, 1)) + ops.cumsum(count, axis=1) - 1  # (B, n)
        hot = (ops.reshape(row, (B, n, 1)) == ops.reshape(ops.arange(L), (1, 1, L))) & \
            ops.reshape(valid, (B, n, 1))  # (B, n, L): new row j goes to cache row l
        hot_int = ops.astype(hot, "int")
        written = ops.sum(hot_int, axis=1) > 0  # (B, L)
        to_rows = ops.reshape(ops.transpose(ops.astype(hot, "float"), (0, 2, 1)), (B, 1, L, n))
        where4 = ops.reshape(written, (B, 1, L, 1))
        new[f"{i}.k"] = ops.where(where4, to_rows @ k, k_old)  # exact: one 1 per written row
        new[f"{i}.v"] = ops.where(where4, to_rows @ v, v_old)
        pos = ops.sum(hot_int * ops.reshape(positions, (B, n, 1)), axis=1)
        new[f"{i}.pos"] = ops.where(written, pos, pos_old)
        new[f"{i}.len"] = length + ops.sum(count, axis=1)
        return new[f"{i}.k"], new[f"{i}.v"], new[f"{i}.pos"], new[f"{i}.pos"] >= 0

    return kv


def _positions(ops: Ops, start, B: int, n: int):
    return ops.broadcast_to(ops.reshape(start, (1, 1)) + ops.reshape(ops.arange(n), (1, n)),
                            (B, n))


def _blocks(ops, config, params, x, positions, limit, cache, new, blocks):
    for i in blocks:
        x, _ = lm.block(ops, config, params, i, x, positions, mode="causal", noise=False,
                        kv=_writer(ops, cache, new, i, limit))
    return x


def masked_step(ops: Ops, config: LMConfig):
    """The whole model as one function of fixed shapes ("mask")."""

    def step(params, tokens, start, limit, cache):
        B, n = tokens.shape
        new = {}
        x = _blocks(ops, config, params, lm.embed(ops, params, tokens),
                    _positions(ops, start, B, n), limit, cache, new, range(config.layers))
        return lm.head(ops, config, params, x), new

    return step


def mod_blocks(config: LMConfig, after: int | None = None) -> list[int]:
    """The MoD-routed blocks (after block `after`, if given)."""
    return [i for i in range(config.layers)
            if config.block_kind(i) == "mod" and (after is None or i > after)]


def speculative_step(ops: Ops, config: LMConfig, entered: int | None):
    """A "branch" step: from the tokens (entered None), or from the input x of MoD block
    `entered`, which the token enters, to the logits, with every later MoD block skipped and
    its decision computed on the way. Returns (host, xs, cache writes): host = the later
    blocks' decisions (0/1) then the logits, flat, so that one host read gets both; xs = each
    later MoD block's input, from which the step reruns if the token enters it."""
    later, first = mod_blocks(config, entered), 0 if entered is None else entered

    def step(params, inputs, start, limit, cache):
        B, n = inputs.shape[:2]
        positions, new, decided, xs = _positions(ops, start, B, n), {}, [], {}
        x = lm.embed(ops, params, inputs) if entered is None else inputs
        for i in range(first, config.layers):
            if i in later:  # skipped here; its decision says whether that was right
                decision = causal_decisions(ops, config.mod, lm.layer_params(params, i), x)
                decided.append(ops.reshape(ops.astype(decision, "float"), (1,)))
                xs[f"x{i}"] = x
                continue
            x = _blocks(ops, config, params, x, positions, limit, cache, new, [i])
        logits = ops.reshape(lm.head(ops, config, params, x), (-1,))
        return ops.concatenate([*decided, logits], axis=0), xs, new

    return step


class Decoder:
    """Prefill then one token per call, every call through a compiled function of fixed shapes.

    `prefill(tokens (B, n))` starts a fresh cache and returns the logits of the last token,
    `step(tokens (B, 1))` appends one token and returns its logits; both as NumPy (B, V).
    `traces` counts how often a function body ran (a trace, or an eager call), per key: a
    reused compiled step adds nothing; `compile_seconds` sums the calls that traced. skip: "mask" | "branch" | None (the backend's default).
    """

    def __init__(self, ops: Ops, config: LMConfig, params: dict, *, batch: int = 1,
                 skip: str | None = None, compiled: bool = True):
        skip = skip or default_skip(ops)
        if skip not in SKIP_MODES:
            raise ValueError(f"decode skip {skip!r}: expected one of {', '.join(SKIP_MODES)}")
        self.ops, self.config, self.batch, self.skip = ops, config, batch, skip
        self.params = {name: ops.asarray(value) for name, value in params.items()}
        self.compiled, self.traces, self._fns = compiled, {}, {}
        self.compile_seconds = 0.0  # time of the calls that traced (and compiled) something
        self.cache, self.position = None, 0
        check_batch(config, batch)

    def _fn(self, key, make):
        """The compiled function for `key`. It closes over the parameters rather than taking
        them: they are constant while decoding, and a jit then sees only the few per-token
        inputs (tinygrad prepares every input of every call: -35 % time per token)."""
        if key not in self._fns:
            body = make()

            def counted(*args):
                self.traces[key] = self.traces.get(key, 0) + 1
                return body(self.params, *args)
            self._fns[key] = self.ops.compile(counted) if self.compiled else counted
        return self._fns[key]

    def _scalar(self, value: int):
        return self.ops.asarray(np.array([value], np.int32), "int")

    def _check_ids(self, tokens: np.ndarray) -> None:
        if tokens.size and not (0 <= tokens.min() and tokens.max() < self.config.vocab):
            raise ValueError(f"token ids {tokens.min()}..{tokens.max()}: expected 0.."
                             f"{self.config.vocab - 1} (the vocabulary)")

    def _timing(self, call):
        """Run call(); a call during which something was traced counts as compile time."""
        before, start = sum(self.traces.values()), time.perf_counter()
        out = call()
        if sum(self.traces.values()) != before:
            self.compile_seconds += time.perf_counter() - start
        return out

    def prefill(self, tokens) -> np.ndarray:
        return self._timing(lambda: self._prefill(tokens))

    def step(self, tokens) -> np.ndarray:
        return self._timing(lambda: self._step(tokens))

    def _prefill(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens)
        self._check_ids(tokens)
        if tokens.ndim != 2 or tokens.shape[0] != self.batch or tokens.shape[1] < 1:
            raise ValueError(f"prefill: tokens of shape {tokens.shape}: expected "
                             f"(batch={self.batch}, n) with 1 <= n <= {self.config.context}")
        n = tokens.shape[1]
        if n > self.config.context:
            raise ValueError(f"prefill: {n} tokens: the context is {self.config.context}")
        size = next(b for b in buckets(self.config.context) if b >= n)
        padded = np.zeros((self.batch, size), np.int32)
        padded[:, :n] = tokens
        fn = self._fn(("prefill", size), lambda: masked_step(self.ops, self.config))
        self.cache = new_cache(self.ops, self.config, self.batch)
        logits, self.cache = fn(self.ops.asarray(padded, "int"), self._scalar(0),
                                self._scalar(n), self.cache)
        self.position = n
        return np.asarray(self.ops.to_numpy(logits), np.float64)[:, n - 1]

    def _step(self, tokens) -> np.ndarray:
        tokens = np.asarray(tokens).reshape(self.batch, 1)
        self._check_ids(tokens)
        if self.cache is None:
            raise ValueError("decode step before prefill: prefill a prompt first")
        if self.position >= self.config.context:
            raise ValueError(f"decode: position {self.position} is past the context "
                             f"{self.config.context}: prefill a shorter window")
        start, limit = self._scalar(self.position), self._scalar(self.position + 1)
        x = self.ops.asarray(tokens.astype(np.int32), "int")
        if self.skip == "mask" or self.config.mod is None:
            fn = self._fn(("step",), lambda: masked_step(self.ops, self.config))
            logits, new = fn(x, start, limit, self.cache)
        else:
            logits, new = self._branch(x, start, limit)
        self.cache = {**self.cache, **new}
        self.position += 1
        return np.asarray(self.ops.to_numpy(logits), np.float64).reshape(self.batch, -1)

    def _branch(self, x, start, limit):
        """Run as if the token skips every MoD block; at the first block it enters instead,
        keep the cache writes before that block and rerun from there (module docstring)."""
        committed, entered = {}, None
        while True:
            later = mod_blocks(self.config, entered)
            fn = self._fn(("branch", entered), lambda e=entered:
                          speculative_step(self.ops, self.config, e))
            host, xs, new = fn(x, start, limit, self.cache)
            host = np.asarray(self.ops.to_numpy(host))
            enters = [i for i, d in zip(later, host[:len(later)]) if d > 0.5]
            if not enters:
                return host[None, None, len(later):], {**committed, **new}
            entered = enters[0]
            committed.update({k: v for k, v in new.items() if int(k.split(".")[0]) < entered})
            x = xs[f"x{entered}"]

    def warm_up(self, calls: int = 3) -> None:
        """Trace and compile every step variant now (after a prefill), not when a token first
        enters a rarely entered MoD block: `calls` throwaway calls each (TinyJit: an eager
        call, then a capture per alternating jit). The cache is left as it was."""
        if self.cache is None:
            raise ValueError("warm_up before prefill: prefill a prompt first")
        start, limit = self._scalar(self.position), self._scalar(self.position + 1)
        token = self.ops.asarray(np.zeros((self.batch, 1), np.int32), "int")
        if self.skip == "mask" or self.config.mod is None:
            variants = [(("step",), lambda: masked_step(self.ops, self.config), token)]
        else:
            x = self.ops.asarray(np.zeros((self.batch, 1, self.config.dim), np.float32))
            variants = [(("branch", e), lambda e=e: speculative_step(self.ops, self.config, e),
                         token if e is None else x) for e in [None, *mod_blocks(self.config)]]
        for key, make, inputs in variants:
            fn = self._fn(key, make)
            for _ in range(calls):
                out = fn(inputs, start, limit, self.cache)
                self.ops.to_numpy(out[0])

    def lengths(self) -> dict[int, int]:
        """Rows filled per block (batch row 0): every token for a dense block, the routed
        ones for a MoD block."""
        return {i: int(self.ops.to_numpy(self.cache[f"{i}.len"])[0])
                for i in range(self.config.layers)}

    def positions(self, i: int) -> list[int]:
        """The true positions held by block i's cache (batch row 0), in row order."""
        pos = self.ops.to_numpy(self.cache[f"{i}.pos"])[0]
        return [int(p) for p in pos if p >= 0]


def default_skip(ops: Ops) -> str:
    """Per backend, the MoD skip that measured faster in `moe-min bench generate` (README):
    "branch" everywhere but tinygrad's OpenCL device, where the host reads that branching
    needs cost more than the routed blocks' work (tiny-mod decode: 15 vs 62 tokens/s)."""
    return "mask" if ops.name == "tinygrad" and ops.device.split(":")[0] == "CL" else "branch"
