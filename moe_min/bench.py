"""Benchmarks, reported as ratios measured side by side in one run (absolute times on a shared
machine drift; ratios taken together do not). Never used by tests as assertions.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np

from moe_min.helpers import check_fits
from moe_min.layers import forward, mlp
from moe_min.routing import route
from moe_min.spec import ExpertChoice, ExpertMLP, SoftMoE, TokenChoice

SCHEMES = ("token_choice", "expert_choice", "soft_moe")


def layer_spec(scheme: str, experts: int, top_k: int, capacity="1.0", tokens: int = 4096):
    """The routed layer a bench times, at the active compute of top-K: token choice at a
    capacity factor (C = T·K·factor/E) or dropless (Mixtral: renormalised), expert choice at
    capacity factor K (each expert T·K/E tokens), Soft MoE with T·K/E slots per expert."""
    if capacity != "dropless":
        try:
            factor = float(capacity)
        except ValueError:
            factor = -1.0
        if not factor > 0:
            raise ValueError(f"capacity {capacity!r}: expected a positive factor or 'dropless'")
    if scheme == "token_choice":
        if capacity == "dropless":
            return TokenChoice(num_experts=experts, top_k=top_k, capacity="dropless",
                               renormalize=True, load_balance_counting="all_k")
        return TokenChoice(num_experts=experts, top_k=top_k, capacity_factor=factor,
                           capacity_multiple_of=1)
    if scheme == "expert_choice":
        return ExpertChoice(num_experts=experts, capacity_factor=float(top_k), causal="router",
                            predictor=None, router_bce_coef=0.01)
    if scheme == "soft_moe":
        return SoftMoE(num_experts=experts, slots_per_expert=max(1, tokens * top_k // experts))
    raise ValueError(f"scheme {scheme!r}: expected one of {', '.join(SCHEMES)}")


def check_layer_fits(tokens: int, dim: int, hidden: int, experts: int, top_k: int,
                     scheme: str) -> None:
    """Refuse sizes whose arrays would not fit in RAM, before any is made (float64 on NumPy;
    x4 for the backward's copies). Soft MoE's dispatch and combine are T x T*K each."""
    floats = tokens * dim * (top_k + 4) + experts * dim * hidden * 3 + tokens * top_k * hidden
    if scheme == "soft_moe":
        floats += 2 * tokens * tokens * top_k
    check_fits(8 * 4 * floats, f"a layer of T={tokens} D={dim} H={hidden} E={experts} "
               f"K={top_k} ({scheme})", "lower --tokens, --dim, --hidden or --experts")


@dataclass
class Timing:
    name: str
    seconds: float | None  # median; None when the backend cannot run it
    note: str = ""


def median_time(fn, repeat: int = 5, warmup: int = 2) -> float:
    return interleaved({"": fn}, repeat, warmup)[""]


def interleaved(cases: dict, repeat: int = 5, warmup: int = 2) -> dict[str, float]:
    """Median seconds of each callable, timed round-robin (A B C A B C ...): on a shared
    machine a slow spell then hits every case alike, so their ratios hold."""
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in samples.items()}


def _block(ops, *arrays):
    """Force evaluation (lazy backends) with a tiny host copy rather than a full one."""
    for a in arrays:
        ops.to_numpy(ops.sum(a))


def layer_cases(ops, tokens=4096, dim=512, hidden=1024, experts=8, top_k=2, activation="relu",
                glu=False, seed=0, scheme="token_choice", capacity="1.0", compiled=False
                ) -> tuple[dict, list[Timing]]:
    """Callables for a token-choice MoE layer, its routing alone, and a dense MLP of equal
    active FLOPs (`act(x @ W1[D, K·H]) @ W2[K·H, D]`, gated with W3 if glu), forward and
    forward+backward, on one backend; plus a Timing for each case the backend cannot run.
    compiled: through ops.compile (tinygrad's TinyJit replays the step it captured; MLX traces
    once), forward+backward as value_and_grad, as training runs it."""
    rng = np.random.default_rng(seed)
    spec = layer_spec(scheme, experts, top_k, capacity, tokens)
    expert = ExpertMLP(hidden=hidden, activation="silu" if glu else activation, glu=glu)
    x = ops.asarray(rng.standard_normal((1, tokens, dim)).astype(np.float32))
    moe = {"router_w": rng.standard_normal((dim, experts)) * dim ** -0.5,
           "expert_w1": rng.standard_normal((experts, dim, hidden)) * dim ** -0.5,
           "expert_w2": rng.standard_normal((experts, hidden, dim)) * hidden ** -0.5}
    dense = {"w1": rng.standard_normal((dim, top_k * hidden)) * dim ** -0.5,
             "w2": rng.standard_normal((top_k * hidden, dim)) * hidden ** -0.5}
    if scheme == "soft_moe":
        moe["slot_mu"] = rng.standard_normal((dim, experts, spec.slots_for(tokens)))
        moe["slot_scale"] = np.array(1.0)
    if glu:
        moe["expert_w3"] = rng.standard_normal((experts, dim, hidden)) * dim ** -0.5
        dense["w3"] = rng.standard_normal((dim, top_k * hidden)) * dim ** -0.5
    moe, dense = ({k: ops.asarray(v.astype(np.float32)) for k, v in p.items()}
                  for p in (moe, dense))

    def moe_loss(p, x_):
        return ops.sum(forward(spec, x_, p, ops, expert=expert, mode="train", validate=False)["y"])

    def dense_loss(p, x_):
        return ops.sum(mlp(ops, expert, x_, p["w1"], p["w2"], p.get("w3")))

    def plan_only():
        plan = route(spec, x, moe, ops, mode="train", validate=False)
        _block(ops, *(a for a in (plan.slot_token, plan.slot_weight, plan.choice_weight,
                                   plan.combine) if a is not None))

    cases, missing = {"routing (plan only)": plan_only}, []
    for name, loss, params in (("MoE layer", moe_loss, moe), ("dense MLP", dense_loss, dense)):
        fwd = ops.compile(loss) if compiled else loss
        cases[f"{name} fwd"] = lambda fwd=fwd, params=params: _block(ops, fwd(params, x))
        try:
            both = ops.compile(ops.value_and_grad(loss)) if compiled else \
                (lambda p, x_, loss=loss: (None, ops.grad(loss, p, x_)))
            for _ in range(4 if compiled else 1):  # two alternating TinyJits replay from call 5
                both(params, x)
                if compiled:
                    fwd(params, x)
        except NotImplementedError as e:
            missing.append(Timing(f"{name} fwd+bwd", None, str(e)))
            continue
        cases[f"{name} fwd+bwd"] = lambda both=both, params=params: _block(
            ops, *both(params, x)[1].values())
    return cases, missing


def layer(ops, tokens=4096, dim=512, hidden=1024, experts=8, top_k=2, activation="relu",
          glu=False, repeat=5, seed=0, with_mlx_lm=True, scheme="token_choice",
          capacity="1.0", variants: dict | None = None, compiled=False) -> list[Timing]:
    """Time `layer_cases` (and mlx-lm's layer on MLX) side by side, round-robin; `variants`
    {label: ops}: the MoE layer also on the same backend opened otherwise (other fused ops)."""
    cases, missing = layer_cases(ops, tokens, dim, hidden, experts, top_k, activation, glu, seed,
                                 scheme, capacity, compiled)
    for label, other in (variants or {}).items():
        found, _ = layer_cases(other, tokens, dim, hidden, experts, top_k, activation, glu, seed,
                               scheme, capacity, compiled)
        cases.update({f"{k} [{label}]": f for k, f in found.items() if k.startswith("MoE")})
    if with_mlx_lm and scheme == "token_choice":
        found, why = mlx_lm_cases(ops, tokens, dim, hidden, experts, top_k, activation, glu, seed)
        cases.update(found)
        missing += why
    timed = interleaved(cases, repeat)
    return [Timing(name, seconds) for name, seconds in timed.items()] + missing


def ratios(timings: list[Timing]) -> list[tuple[str, float]]:
    t = {x.name: x.seconds for x in timings}
    pairs = [("MoE/dense throughput, fwd", "dense MLP fwd", "MoE layer fwd"),
             ("MoE/dense throughput, fwd+bwd", "dense MLP fwd+bwd", "MoE layer fwd+bwd"),
             ("routing share of the MoE fwd", "routing (plan only)", "MoE layer fwd"),
             *((f"MoE/mlx-lm {k}, fwd", f"mlx-lm {k} fwd", "MoE layer fwd") for k in SWITCH),
             *((f"MoE/mlx-lm {k}, fwd+bwd", f"mlx-lm {k} fwd+bwd", "MoE layer fwd+bwd")
               for k in SWITCH)]
    labels = sorted({n[n.index(" ["):] for n in t if n.endswith("]")})
    pairs += [(f"{label}{v}", a, f"{b}{v}") for v in labels for label, a, b in pairs[:2]]
    return [(label, t[a] / t[b]) for label, a, b in pairs if t.get(a) and t.get(b)]


def environment() -> str:
    """What a reader needs to trust a timing: OPENBLAS_CORETYPE slows OpenBLAS when set."""
    coretype = os.environ.get("OPENBLAS_CORETYPE")
    return f"OPENBLAS_CORETYPE={coretype!r}" + (" (set: OpenBLAS may run slower)" if coretype
                                                 else "")


def matmul_gflops(ops, n: int = 1024, repeat: int = 5) -> list[Timing]:
    """float32 n³ matmul on the backend next to NumPy's (MLX on Linux: which BLAS it got)."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    xa, xb = ops.asarray(a), ops.asarray(b)
    flops = 2 * n ** 3
    own = median_time(lambda: _block(ops, ops.matmul(xa, xb)), repeat)
    ref = median_time(lambda: a @ b, repeat)
    return [Timing(f"{ops.name} matmul {n}³", own, f"{flops / own / 1e9:.1f} GFLOP/s"),
            Timing(f"numpy matmul {n}³", ref, f"{flops / ref / 1e9:.1f} GFLOP/s")]


def _import_mlx_lm_switch_layers():
    """mlx_lm/__init__ imports huggingface_hub; its switch layers need only mlx, so load them
    under a bare package module when the hub is absent (reference/backends.md §1)."""
    import importlib.util
    import sys
    import types

    found = importlib.util.find_spec("mlx_lm")
    if found is None:
        return None
    if "mlx_lm" not in sys.modules and importlib.util.find_spec("huggingface_hub") is None:
        package = types.ModuleType("mlx_lm")
        package.__path__ = list(found.submodule_search_locations)
        sys.modules["mlx_lm"] = package
    from mlx_lm.models import switch_layers

    return switch_layers


SWITCH = ("SwitchMLP", "SwitchGLU")


def mlx_lm_cases(ops, tokens=4096, dim=512, hidden=1024, experts=8, top_k=2, activation="relu",
                 glu=False, seed=0) -> tuple[dict, list[Timing]]:
    """mlx-lm's MoE compute (sort by expert + gather_mm) with its own routing (Mixtral's:
    argpartition, softmax over the K kept) on the same shapes: SwitchGLU if glu (SiLU), else
    SwitchMLP with the activation. MLX only."""
    kind = SWITCH[glu]
    layers = _import_mlx_lm_switch_layers() if ops.name == "mlx" else None
    if layers is None:
        why = "needs the mlx backend and mlx-lm (pip install 'moe-min[bench]')"
        return {}, [Timing(f"mlx-lm {kind} fwd", None, why)]
    import mlx.core as mx

    from moe_min.routing import activation as act

    mx.random.seed(seed)
    if glu:
        switch = layers.SwitchGLU(dim, hidden, experts)
    else:
        switch = layers.SwitchMLP(dim, hidden, experts,
                                  activation=lambda v: act(ops, activation, v))
    router = mx.random.normal((dim, experts)) * dim ** -0.5
    x = mx.random.normal((tokens, dim))

    def block(params, x_):
        switch.update(params)
        gates = x_ @ router
        inds = mx.stop_gradient(mx.argpartition(-gates, kth=top_k - 1, axis=-1)[..., :top_k])
        scores = mx.softmax(mx.take_along_axis(gates, inds, axis=-1), axis=-1)
        return (switch(x_, inds) * scores[..., None]).sum(axis=-2).sum()

    params, grad = switch.trainable_parameters(), mx.grad(block)
    return {f"mlx-lm {kind} fwd": lambda: mx.eval(block(params, x)),
            f"mlx-lm {kind} fwd+bwd": lambda: mx.eval(grad(params, x))}, []
