"""`moe-min bench generate`: prefill and decode tokens/s of a decoder through the compiled
static-shape steps (models/decode.py), for one backend next to MLX and next to the same-shape
dense model, as ratios from one run. The first calls, which trace and compile, are timed apart.
Decode steps of all variants are timed round-robin in rounds, so a slow spell on a shared
machine hits all alike. Never used by tests as assertions.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace

import numpy as np

from moe_min.models import decode, lm


@dataclass
class Variant:
    label: str
    ops: object
    config: object
    params: dict
    skip: str
    twin: bool = False  # the dense twin, the baseline of its backend's ratios
    decoder: decode.Decoder | None = None
    first: float = 0.0  # seconds of the first prefills and the warm-up of every step variant
    prefill: list = field(default_factory=list)  # seconds per prefilled token, after warm-up
    steps: list = field(default_factory=list)  # seconds per decode step, after warm-up
    token: int = 0
    routed: dict = field(default_factory=dict)

    @property
    def backend(self) -> str:
        return f"{self.ops.name}-{self.ops.device}"


def dense_twin(config):
    """The same shape with every block dense: the baseline of a routed model."""
    return replace(config, mod=None, moe=None)


def calibrated_params(ops, config, seed: int = 0) -> dict:
    """Fresh parameters whose MoD predictors route about `capacity` of the tokens, as a
    trained model's do: at init the predictor's bias sits at the base rate's logit, below the
    threshold, so it would route nothing and time a model that skips every block. Block by
    block, in causal mode (a block's input depends on the earlier blocks' decisions), each
    bias is shifted so that the logits of a random batch cross the threshold at the capacity.
    Variant.routed reports what was realised."""
    params = lm.init_params(config, seed)
    if config.mod is None or config.mod.predictor is None:
        return params
    tokens = np.random.default_rng(seed).integers(0, config.vocab, (4, config.context))
    for i in decode.mod_blocks(config):
        _, info = lm.forward(ops, config, params, tokens, mode="causal", noise=False)
        logits = np.asarray(ops.to_numpy(info["blocks"][i]["predictor_logits"]), np.float64)
        cut = np.quantile(logits.ravel(), 1.0 - config.mod.capacity)
        name = f"blocks.{i}.predictor_b2"
        params[name] = (params[name] + (config.mod.predictor.threshold - cut)).astype(np.float32)
    return params


def variants(ops, config, params: dict | None, name: str, skip: str = "both") -> list[Variant]:
    """The routed model under each MoD skip ("both": mask and branch) and its dense twin, on
    one backend; params None: fresh, calibrated ones."""
    label = f"{ops.name}-{ops.device}"
    params = params if params is not None else calibrated_params(ops, config)
    modes = list(decode.SKIP_MODES) if skip == "both" else [skip]
    out = [Variant(f"{label} {name} ({mode})", ops, config, params, mode)
           for mode in (modes if config.mod is not None else ["mask"])]
    twin = dense_twin(config)
    return [*out, Variant(f"{label} dense twin", ops, twin, lm.init_params(twin, 0), "mask",
                          twin=True)]


def report(variants: list[Variant], echo, trained: dict | None = None) -> None:
    for label, rate in (trained or {}).items():
        echo(f"  {label:<40} train failed: {rate['error'].splitlines()[0][:120]}"
             if "error" in rate else f"  {label:<40} train {rate['tokens_per_s']:9.0f} tok/s "
             f"(batch 16)  first steps {rate['first']:6.2f} s")
    for v in variants:
        routed = "".join(f" b{i}:{f:.0%}" for i, f in v.routed.items())
        echo(f"  {v.label:<40} prefill {prefill_rate(v):9.0f} tok/s  decode "
             f"{decode_rate(v):8.1f} tok/s  first calls {v.first:6.2f} s"
             + (f"  routed{routed}" if routed else ""))
    for label, value in ratios(variants):
        echo(f"  {label:<52} {value:6.2f}x")


def _prompt(config, length: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(32, 127, (1, length)).astype(np.int32)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _run_round(v: Variant, prompt: np.ndarray, count: int, context: int) -> None:
    """`count` decode steps of greedy tokens; a full context is refilled with its last half
    (not timed as decode), as generation does."""
    d = v.decoder
    for _ in range(count):
        if d.position >= context:
            window = np.concatenate([prompt[0], [v.token]])[-(context // 2):]
            d.prefill(window[None].astype(np.int32))
        logits, seconds = _timed(lambda: d.step(np.array([[v.token]], np.int32)))
        v.steps.append(seconds)
        v.token = int(np.argmax(logits[0]))


def run(variants: list[Variant], prompt_len: int = 64, tokens: int = 300, rounds: int = 6,
        seed: int = 0) -> list[Variant]:
    """Time every variant: its warm-up (the prefill bucket's and every step variant's traces),
    then `rounds` rounds of one prefill and tokens/rounds decode steps each, round-robin over
    the variants."""
    prompts = {id(v): _prompt(v.config, min(prompt_len, v.config.context - 1), seed)
               for v in variants}
    for v in variants:
        prompt = prompts[id(v)]
        v.decoder = decode.Decoder(v.ops, v.config, v.params, skip=v.skip)
        start = time.perf_counter()
        logits = v.decoder.prefill(prompt)
        for _ in range(2):  # the prefill bucket's traces (TinyJit: eager, two captures)
            v.decoder.prefill(prompt)
        v.decoder.warm_up()  # every step variant, entered MoD blocks included
        v.token = int(np.argmax(logits[0]))
        v.first = time.perf_counter() - start
    per_round = max(1, tokens // rounds)
    for _ in range(rounds):
        for v in variants:
            prompt = prompts[id(v)]
            last, seconds = _timed(lambda v=v, p=prompt: v.decoder.prefill(p))
            v.prefill.append(seconds / prompt.shape[1])
            v.token = int(np.argmax(last[0]))
            _run_round(v, prompt, per_round, v.config.context)
            if v.config.mod is not None:
                lengths = v.decoder.lengths()
                v.routed = {i: n / v.decoder.position for i, n in lengths.items()
                            if v.config.block_kind(i) == "mod"}
    return variants


def decode_rate(v: Variant) -> float:
    """Throughput of the timed steps: their count over their total time."""
    return len(v.steps) / sum(v.steps)


def prefill_rate(v: Variant) -> float:
    return 1.0 / statistics.median(v.prefill)


def train_stepper(ops, config, tokens: np.ndarray, batch: int = 16):
    """A function that runs one jitted training step (models/train.py) on the next batch of the
    default corpus and returns its seconds. tokens: the training split."""
    from moe_min.models import data, optim
    from moe_min.models import train as t

    step_fn = t.make_step(ops, config, t.TrainConfig(batch_size=batch))
    params = {k: ops.asarray(v) for k, v in lm.init_params(config, 0).items()}
    state, it = optim.init_state(ops, params), iter(range(1 << 62))

    def step() -> float:
        nonlocal params, state
        window = data.batch_at(tokens, next(it), batch, config.context, 0)
        start = time.perf_counter()
        loss, _, params, state = step_fn(params, state, ops.asarray(window[:, :-1], "int"),
                                         ops.asarray(window[:, 1:], "int"),
                                         ops.asarray(np.float32(1e-3)))
        t.materialize(ops, {"loss": loss}, params, state)
        return time.perf_counter() - start
    return step


def train_rate(ops, config, tokens: np.ndarray, steps: int = 4, batch: int = 16,
               warmup: int = 3) -> dict:
    """Training tokens/s of the jitted step: `warmup` steps (trace, compile; timed apart as
    "first"), then `steps` timed ones."""
    step = train_stepper(ops, config, tokens, batch)
    first = sum(step() for _ in range(warmup))
    return {"first": first,
            "tokens_per_s": steps * batch * config.context / sum(step() for _ in range(steps))}


def train_rates(variants: list[Variant], name: str, steps: int) -> dict:
    """`train_rate` of the routed config on each backend of `variants` (none if steps is 0)."""
    from moe_min.models import data

    if not steps:
        return {}
    tokens, out = data.split(data.load_corpus(None))[0], {}
    for v in {v.backend: v for v in variants if not v.twin}.values():
        try:
            out[f"{v.backend} {name}"] = train_rate(v.ops, v.config, tokens, steps)
        except Exception as e:  # a backend that cannot train this here is a row, not a crash
            out[f"{v.backend} {name}"] = {"error": f"{type(e).__name__}: {e}"}
    return out


def ratios(variants: list[Variant]) -> list[tuple[str, float]]:
    """Per backend, the faster MoD skip over the dense twin (decode), then each backend's
    decode and prefill over MLX's, both with their faster skip."""
    backends = list(dict.fromkeys(v.backend for v in variants))
    best = {}
    for b in backends:
        mine = [v for v in variants if v.backend == b]
        best[b] = (max((v for v in mine if not v.twin), key=decode_rate),
                   next(v for v in mine if v.twin))
    out = []
    for b, (fast, twin) in best.items():
        out.append((f"{b} decode, routed ({fast.skip}) / dense twin",
                    decode_rate(fast) / decode_rate(twin)))
    mlx = next((b for b in backends if b.startswith("mlx")), None)
    for b in backends:
        if mlx and b != mlx:
            out.append((f"{b} / {mlx} decode", decode_rate(best[b][0]) / decode_rate(best[mlx][0])))
            out.append((f"{b} / {mlx} prefill",
                        prefill_rate(best[b][0]) / prefill_rate(best[mlx][0])))
    return out


def fused_variants(ops_by_choice: dict, config, params: dict | None, name: str) -> list[Variant]:
    """One routed variant per choice of fused ops (`moe-min bench generate --fused`), each
    on the backend opened with that choice; same parameters, the backend's default skip."""
    first = next(iter(ops_by_choice.values()))
    params = params if params is not None else calibrated_params(first, config)
    return [Variant(f"{ops.name}-{ops.device} {name} fused={choice}", ops, config, params,
                    decode.default_skip(ops)) for choice, ops in ops_by_choice.items()]


def fused_report(variants: list[Variant], echo, train_steps: int) -> None:
    """Each variant's rates, then each over the first's: the fused ops' gain on this device."""
    from moe_min.models import data

    trained = [None] * len(variants)
    if train_steps:  # round-robin, one step each, so a slow spell hits all alike
        tokens = data.split(data.load_corpus(None))[0]
        steppers = [train_stepper(v.ops, v.config, tokens) for v in variants]
        for stepper in steppers:
            [stepper() for _ in range(3)]  # trace and compile
        seconds = [0.0] * len(variants)
        for _ in range(train_steps):
            for i, stepper in enumerate(steppers):
                seconds[i] += stepper()
        trained = [train_steps * 16 * v.config.context / s for v, s in zip(variants, seconds)]
    for v, rate in zip(variants, trained):
        echo(f"  {v.label:<44} prefill {prefill_rate(v):8.0f}  decode {decode_rate(v):7.1f}"
             + (f"  train {rate:7.0f}" if rate else "") + "  tok/s")
    base = variants[0]
    for v, rate in zip(variants[1:], trained[1:]):
        echo(f"  {v.label.split()[-1]} / {base.label.split()[-1]}: decode "
             f"{decode_rate(v) / decode_rate(base):.2f}x, prefill "
             f"{prefill_rate(v) / prefill_rate(base):.2f}x"
             + (f", train {rate / trained[0]:.2f}x" if rate else ""))
