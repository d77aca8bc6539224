"""Benchmarks, reported as ratios measured side by side in one run (absolute times on a shared
machine drift; ratios taken together do not). Never used by tests as assertions.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import numpy as np

from moe_min.layers import forward, mlp
from moe_min.routing import route
from moe_min.spec import ExpertMLP, TokenChoice


@dataclass
class Timing:
    name: str
    seconds: float | None  # median; None when the backend cannot run it
    note: str = ""


def median_time(fn, repeat: int = 5, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _block(ops, *arrays):
    """Force evaluation (lazy backends) with a tiny host copy rather than a full one."""
    for a in arrays:
        ops.to_numpy(ops.sum(a))


def layer(ops, tokens=4096, dim=512, hidden=1024, experts=8, top_k=2, activation="relu",
          repeat=5, seed=0) -> list[Timing]:
    """A token-choice MoE layer, its routing alone, and a dense MLP of equal active FLOPs
    (`act(x @ W1[D, K·H]) @ W2[K·H, D]`), forward and forward+backward, on one backend."""
    rng = np.random.default_rng(seed)
    spec = TokenChoice(num_experts=experts, top_k=top_k, capacity_factor=1.0,
                       capacity_multiple_of=1)  # C = T·K/E: the buffers hold T·K rows, as dense
    expert = ExpertMLP(hidden=hidden, activation=activation)
    x = ops.asarray(rng.standard_normal((1, tokens, dim)).astype(np.float32))
    moe = {"router_w": rng.standard_normal((dim, experts)) * dim ** -0.5,
           "expert_w1": rng.standard_normal((experts, dim, hidden)) * dim ** -0.5,
           "expert_w2": rng.standard_normal((experts, hidden, dim)) * hidden ** -0.5}
    dense = {"w1": rng.standard_normal((dim, top_k * hidden)) * dim ** -0.5,
             "w2": rng.standard_normal((top_k * hidden, dim)) * hidden ** -0.5}
    moe, dense = ({k: ops.asarray(v.astype(np.float32)) for k, v in p.items()}
                  for p in (moe, dense))

    def moe_loss(p, x_):
        return ops.sum(forward(spec, x_, p, ops, expert=expert, mode="train", validate=False)["y"])

    def dense_loss(p, x_):
        return ops.sum(mlp(ops, expert, x_, p["w1"], p["w2"]))

    def plan_only():
        plan = route(spec, x, moe, ops, mode="train", validate=False)
        _block(ops, plan.slot_token, plan.slot_weight)

    out = [Timing("routing (plan only)", median_time(plan_only, repeat))]
    for name, loss, params in (("MoE layer", moe_loss, moe), ("dense MLP", dense_loss, dense)):
        out.append(Timing(f"{name} fwd", median_time(lambda: _block(ops, loss(params, x)),
                                                     repeat)))
        try:
            ops.grad(loss, params, x)
        except NotImplementedError as e:
            out.append(Timing(f"{name} fwd+bwd", None, str(e)))
            continue
        out.append(Timing(f"{name} fwd+bwd", median_time(
            lambda: _block(ops, *ops.grad(loss, params, x).values()), repeat)))
    return out


def ratios(timings: list[Timing]) -> list[tuple[str, float]]:
    t = {x.name: x.seconds for x in timings}
    pairs = [("MoE/dense throughput, fwd", "dense MLP fwd", "MoE layer fwd"),
             ("MoE/dense throughput, fwd+bwd", "dense MLP fwd+bwd", "MoE layer fwd+bwd"),
             ("routing share of the MoE fwd", "routing (plan only)", "MoE layer fwd"),
             ("MoE/mlx-lm SwitchMLP, fwd", "mlx-lm SwitchMLP fwd", "MoE layer fwd"),
             ("MoE/mlx-lm SwitchMLP, fwd+bwd", "mlx-lm SwitchMLP fwd+bwd", "MoE layer fwd+bwd")]
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


def mlx_lm_layer(ops, tokens=4096, dim=512, hidden=1024, experts=8, top_k=2,
                 repeat=5, seed=0) -> list[Timing]:
    """mlx-lm's MoE compute (sort by expert + gather_mm) with its own routing, ReLU experts,
    on the same shapes; for the ratio against our layer. MLX only."""
    layers = _import_mlx_lm_switch_layers() if ops.name == "mlx" else None
    if layers is None:
        why = "needs the mlx backend and mlx-lm (pip install 'moe-min[bench]')"
        return [Timing("mlx-lm SwitchMLP fwd", None, why)]
    import mlx.core as mx
    import mlx.nn as nn

    mx.random.seed(seed)
    switch = layers.SwitchMLP(dim, hidden, experts, activation=nn.ReLU())
    router = mx.random.normal((dim, experts)) * dim ** -0.5
    x = mx.random.normal((tokens, dim))

    def block(params, x_):  # mlx-lm's Mixtral block: argpartition, softmax over the K kept
        switch.update(params)
        gates = x_ @ router
        inds = mx.stop_gradient(mx.argpartition(-gates, kth=top_k - 1, axis=-1)[..., :top_k])
        scores = mx.softmax(mx.take_along_axis(gates, inds, axis=-1), axis=-1)
        return (switch(x_, inds) * scores[..., None]).sum(axis=-2).sum()

    params = switch.trainable_parameters()
    grad = mx.grad(block)
    return [Timing("mlx-lm SwitchMLP fwd", median_time(lambda: mx.eval(block(params, x)),
                                                       repeat)),
            Timing("mlx-lm SwitchMLP fwd+bwd", median_time(lambda: mx.eval(grad(params, x)),
                                                           repeat))]
