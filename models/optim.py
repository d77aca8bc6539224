"""AdamW, gradient clipping and the learning-rate schedule, written once over the op contract.

Why not each framework's own optimizer: the optimizer state is then a plain dict of arrays
with the same names on every backend (`m.<param>`, `v.<param>`, `step`), saved next to the
weights in one safetensors file. A checkpoint written by MLX resumes on tinygrad with the
same state, and a resume is exact because nothing lives in framework objects we cannot save.
The update follows torch.optim.AdamW (decoupled decay, bias correction in the step size).
May import: stdlib, numpy, moe_min.ops.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from moe_min.ops import Ops


@dataclass(frozen=True)
class AdamW:
    """Hyperparameters; `no_decay` is a regex on parameter names (norm gains and vectors
    are never decayed: nanoGPT decays exactly the tensors of 2 or more dimensions)."""

    beta1: float = 0.9
    beta2: float = 0.99  # nanoGPT's choice for small byte/char models
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global L2 norm; 0 turns clipping off
    frozen: str = ""  # regex: parameters matching it are never updated (e.g. random routers)

    def __post_init__(self):  # a checkpoint's JSON may hold anything: one line, naming it
        for name, ok, accepted in (
                ("beta1", 0 <= self.beta1 < 1, "0 <= beta1 < 1"),
                ("beta2", 0 <= self.beta2 < 1, "0 <= beta2 < 1"),
                ("eps", 0 < self.eps < math.inf, "a finite eps > 0"),
                ("weight_decay", 0 <= self.weight_decay < math.inf, "a finite value >= 0"),
                ("grad_clip", 0 <= self.grad_clip < math.inf, "a finite value >= 0 (0: off)")):
            if not ok:
                raise ValueError(f"AdamW.{name} = {getattr(self, name)!r}: expected {accepted}")
        try:
            re.compile(self.frozen)
        except (re.error, TypeError) as e:
            raise ValueError(f"AdamW.frozen = {self.frozen!r}: expected a regular expression "
                             f"({e})") from None


def init_state(ops: Ops, params: dict) -> dict:
    """Zero moments for every parameter, and the step count as a 0-d float array (an array,
    not a Python int, so a compiled step is not re-traced every step). Built from NumPy
    zeros: real buffers, which tinygrad's jit wants as inputs (its zeros are constants)."""
    state = {"step": ops.asarray(np.zeros((), np.float32))}
    for name, p in params.items():
        state[f"m.{name}"] = ops.asarray(np.zeros(tuple(p.shape), np.float32))
        state[f"v.{name}"] = ops.asarray(np.zeros(tuple(p.shape), np.float32))
    return state


def global_norm(ops: Ops, grads: dict):
    # summed in name order: a float sum depends on its order, and a resumed run's dicts come
    # from a checkpoint in another order; the clip would then differ in the last bit
    return ops.sqrt(sum(ops.sum(grads[name] * grads[name]) for name in sorted(grads)))


def step(ops: Ops, hp: AdamW, params: dict, grads: dict, state: dict, lr, norm_fn=None):
    """One AdamW update. `lr` is a 0-d array. Returns (params, state, grad norm before
    clipping, over the trained parameters); the inputs are not modified. `norm_fn(grads)`
    replaces global_norm where the gradients are split over processes (expert parallel)."""
    frozen = re.compile(hp.frozen) if hp.frozen else None
    live = [k for k in params if frozen is None or not frozen.search(k)]
    live_grads = {k: grads[k] for k in live}
    norm = norm_fn(live_grads) if norm_fn else global_norm(ops, live_grads)
    scale = hp.grad_clip / ops.maximum(norm, hp.grad_clip) if hp.grad_clip > 0 else 1.0
    t = state["step"] + 1.0
    bias1 = 1.0 - ops.exp(t * math.log(hp.beta1))  # 1 - beta1^t
    bias2 = 1.0 - ops.exp(t * math.log(hp.beta2))
    new_params, new_state = dict(params), {**state, "step": t}
    for name in live:
        p, m, v = params[name], state[f"m.{name}"], state[f"v.{name}"]
        g = grads[name] * scale
        m = hp.beta1 * m + (1.0 - hp.beta1) * g
        v = hp.beta2 * v + (1.0 - hp.beta2) * (g * g)
        if len(p.shape) >= 2 and hp.weight_decay > 0:
            p = p * (1.0 - lr * hp.weight_decay)
        denom = ops.sqrt(v / bias2) + hp.eps
        new_params[name] = p - (lr / bias1) * (m / denom)
        new_state[f"m.{name}"], new_state[f"v.{name}"] = m, v
    return new_params, new_state, norm


def cosine_lr(it: int, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """Linear warmup, then cosine decay from lr to min_lr at `decay_steps`, then flat
    (nanoGPT `train.py: get_lr`)."""
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_steps:
        return min_lr
    ratio = (it - warmup) / max(1, decay_steps - warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (lr - min_lr)
