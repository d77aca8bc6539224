"""Applying a plan: gather tokens into per-expert buffers, run every expert as one batched
matmul, bring the weighted outputs back (token choice: each token gathers its K; other
schemes scatter-add); and the MoD block branch (attention among the routed tokens at their
true positions, then an MLP). `forward` returns the quantities of
docs/conventions.md, which the conformance suite compares with the oracle.
May import: moe_min.spec, moe_min.ops, moe_min.routing.
"""

from __future__ import annotations

import math

import numpy as np

from moe_min import grouped
from moe_min.inputs import check_layer_inputs
from moe_min.ops import Array, Ops, fast_op, fast_ops
from moe_min.routing import Plan, activation, route
from moe_min.spec import ExpertMLP, MixtureOfDepths, SoftMoE


def mlp(ops: Ops, spec: ExpertMLP, h: Array, w1: Array, w2: Array, w3: Array | None = None):
    """act(h @ w1) @ w2, or SwiGLU. Batched: h (E, N, D) with w1 (E, D, H) runs E experts."""
    a = h @ w1
    a = activation(ops, "silu", a) * (h @ w3) if spec.glu else activation(ops, spec.activation, a)
    return a @ w2


def experts(ops: Ops, spec: ExpertMLP, params: dict, h: Array) -> Array:
    """All experts at once: h (E, N, D) -> (E, N, D); through the optional op expert_mlp where
    the backend has one (expert parallel: the experts live in other processes)."""
    w = params["expert_w1"], params["expert_w2"], params.get("expert_w3")
    if "expert_mlp" in fast_ops(ops):
        name = "silu" if spec.glu else spec.activation
        return ops.expert_mlp(h, *w, lambda a: activation(ops, name, a))
    return mlp(ops, spec, h, *w)


def apply_slots(ops: Ops, expert_fn, x: Array, plan: Plan) -> Array:
    """y[g, s] = Σ over slots (e, c) holding token s of slot_weight · expert_e(x[g, s]).

    Expert-major padded buffers (E, G·C + 1, D) filled by one row gather, every expert in one
    batched matmul: 1.1x a dense MLP on CPU (reference/backends.md §1), where sort +
    gather_mm costs 4x. Token choice combines by gathering each token's K slot outputs
    straight from that layout (plan.choice_slot), so nothing is transposed or padded after the
    experts; other plans scatter-add. Empty slots read a zero row of x; each expert's last row
    is a spare that a dropped choice reads (with weight 0: a finite 0, never another token's)."""
    G, S, D = x.shape
    E, C = plan.slot_token.shape[1], plan.slot_token.shape[2]
    rows = ops.where(plan.slot_token < 0, S, plan.slot_token) + \
        ops.reshape(ops.arange(G), (G, 1, 1)) * (S + 1)  # (G, E, C) into the padded rows
    rows = ops.concatenate([ops.reshape(ops.transpose(rows, (1, 0, 2)), (E, G * C)),
                            ops.zeros((E, 1), "int") + S], axis=1)  # + the spare: a zero row
    padded = ops.reshape(ops.concatenate([x, ops.zeros((G, 1, D))], axis=1), (G * (S + 1), D))
    flat_rows, backs = ops.reshape(rows, (E * (G * C + 1),)), (None, None)
    if plan.choice_slot is not None:  # each token's K rows in the expert-major output
        picks = ops.take(ops.asarray(_slot_rows(G, E, C)),
                         plan.choice_slot + ops.reshape(ops.arange(G), (G, 1, 1)) * (E * C + 1),
                         axis=0)
        backs = grouped.slot_inverses(ops, plan, picks, E * (G * C + 1))
    buffers = grouped.take_rows(ops, padded, flat_rows, backs[0])
    out = expert_fn(ops.reshape(buffers, (E, G * C + 1, D)))
    if plan.choice_slot is not None:  # gather: each token reads its K slots
        K = plan.choice_slot.shape[-1]
        picked = grouped.take_rows(ops, ops.reshape(out, (E * (G * C + 1), D)),
                                   ops.reshape(picks, (G * S * K,)), backs[1])
        return ops.sum(ops.reshape(picked, (G, S, K, D)) *
                       ops.reshape(plan.choice_weight, (G, S, K, 1)), axis=2)
    out = ops.reshape(out[:, :G * C], (E, G, C, D))
    out = ops.reshape(ops.transpose(out, (1, 0, 2, 3)), (G, E * C, D))
    index = ops.where(plan.slot_token < 0, S, plan.slot_token) + \
        ops.reshape(ops.arange(G), (G, 1, 1)) * (S + 1)  # (G, E, C) into the padded rows
    out = out * ops.reshape(plan.slot_weight, (G, E * C, 1))
    y = grouped.scatter_rows(ops, ops.zeros((G * (S + 1), D)), ops.reshape(index, (G * E * C,)),
                             ops.reshape(out, (G * E * C, D)))
    return ops.reshape(y, (G, S + 1, D))[:, :S]


def apply_experts(ops: Ops, spec: ExpertMLP, params: dict, x: Array, plan: Plan) -> Array:
    """A sparse plan applied with MLP experts: grouped on exactly the chosen rows where nothing
    can drop and the backend has the fused op (moe_min/grouped.py), else `apply_slots`."""
    if grouped.applies(ops, plan, x.shape[1]):
        return grouped.apply_grouped(ops, spec, params, x, plan)
    return apply_slots(ops, lambda h: experts(ops, spec, params, h), x, plan)


def _slot_rows(G: int, E: int, C: int) -> np.ndarray:
    """For group g's flat slot e·C + c (E·C: dropped), its row in the expert-major output
    (E, G·C + 1): e·(G·C + 1) + g·C + c, and G·C (expert 0's spare row) for E·C."""
    e, g, c = np.meshgrid(np.arange(E), np.arange(G), np.arange(C), indexing="ij")
    rows = np.full((G, E * C + 1), G * C, np.int64)
    rows[:, :E * C] = np.transpose(e * (G * C + 1) + g * C + c, (1, 0, 2)).reshape(G, E * C)
    return rows.reshape(-1)


def apply_soft(ops: Ops, expert_fn, x: Array, dispatch: Array, combine: Array, num_experts: int,
               round_bf16: bool = False) -> Array:
    """Soft MoE: slots = dispatch @ x, y = combine @ expert(slots)."""
    G, S, D = x.shape
    E, P = num_experts, dispatch.shape[1] // num_experts
    data = ops.round_bfloat16 if round_bf16 else (lambda v: v)  # vmoe rounds data, not weights
    slots = ops.reshape(dispatch @ data(x), (G, E, P, D))
    out = expert_fn(ops.reshape(ops.transpose(slots, (1, 0, 2, 3)), (E, G * P, D)))
    out = ops.reshape(ops.transpose(ops.reshape(out, (E, G, P, D)), (1, 0, 2, 3)), (G, E * P, D))
    return combine @ data(out)


def rms_norm(ops: Ops, x: Array, gain: Array, eps: float, fused: bool = True) -> Array:
    op = fast_op(ops, "rms_norm", fused)
    return op(x, gain, eps) if op else \
        x / ops.sqrt(ops.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def rotate(ops: Ops, vs: list, positions: Array, base: float, fused: bool = True) -> list:
    """Rotate-half RoPE of each v (B, H, N, Dh) in vs at the true positions (B, N); the
    composite computes cos and sin once for all of them."""
    op = fast_op(ops, "rope", fused)
    if op:
        return [op(v, positions, base) for v in vs]
    (B, N), dim = positions.shape, vs[0].shape[-1]
    inv_freq = ops.asarray(base ** (-np.arange(dim // 2, dtype=np.float64) * 2 / dim))
    angle = ops.reshape(ops.astype(positions, "float"), (B, 1, N, 1)) * inv_freq
    cos, sin, half = ops.cos(angle), ops.sin(angle), dim // 2
    return [ops.concatenate([v[..., :half] * cos - v[..., half:] * sin,
                             v[..., :half] * sin + v[..., half:] * cos], axis=-1) for v in vs]


def attention(ops: Ops, q, k, v, q_pos, k_pos, k_valid, fused: bool = True) -> Array:
    """Softmax attention where a query sees valid keys at positions <= its own.
    q (B, H, Nq, Dh), k/v (B, H, Nk, Dh), q_pos (B, Nq), k_pos/k_valid (B, Nk)."""
    B, Nq, Nk = q.shape[0], q.shape[2], k.shape[2]
    allowed = (ops.reshape(k_pos, (B, 1, 1, Nk)) <= ops.reshape(q_pos, (B, 1, Nq, 1))) & \
        ops.reshape(k_valid, (B, 1, 1, Nk))
    op = fast_op(ops, "attention", fused)
    if op:
        return op(q, k, v, allowed)
    scores = (q @ ops.transpose(k, (0, 1, 3, 2))) * (1.0 / math.sqrt(q.shape[-1]))
    # a finite floor, not -inf: a padded query row must not turn into NaN (NaN·0 is NaN)
    return ops.softmax(ops.where(allowed, scores, -1e9), axis=-1) @ v


def block_branch(ops: Ops, block: dict, params: dict, h: Array, positions: Array, valid: Array,
                 ffn=None, kv=None):
    """f(h): a pre-norm transformer block without its residual, over the routed tokens only.
    h (B, N, D) at true `positions` (B, N); `valid` marks real (not padding) rows.
    `ffn(u)`, if given, replaces the MLP (an MoE layer in a model). `kv(k, v, positions, valid)`,
    if given, returns the keys (rotated), values, positions and validity to attend over: a KV
    cache prepends its entries and stores the new ones."""
    B, N, D = h.shape
    heads, eps = block["heads"], block["norm_eps"]

    def split(t):
        return ops.transpose(ops.reshape(t, (B, N, heads, D // heads)), (0, 2, 1, 3))

    normed = rms_norm(ops, h, params["block_norm1"], eps)
    q, k, v = (split(normed @ params[f"block_w{n}"]) for n in "qkv")
    q, k = rotate(ops, [q, k], positions, block["rope_base"])
    k, v, k_pos, k_valid = (k, v, positions, valid) if kv is None else kv(k, v, positions, valid)
    a = ops.transpose(attention(ops, q, k, v, positions, k_pos, k_valid), (0, 2, 1, 3))
    a = ops.reshape(a, (B, N, D)) @ params["block_wo"]
    u = rms_norm(ops, h + a, params["block_norm2"], eps)
    if ffn is not None:
        return a + ffn(u)
    return a + mlp(ops, block["mlp"], u, params["block_w1"], params["block_w2"],
                   params.get("block_w3"))


def apply_mod(ops: Ops, block: dict, params: dict, x: Array, plan: Plan, positions=None,
              kv=None) -> Array:
    """x + weight·f(x̃) at the routed tokens, x elsewhere. `positions` (B, T): the true
    positions of x's tokens (default 0..T-1, the layer alone); `kv` as in `block_branch`."""
    B, T, D = x.shape
    C = plan.slot_token.shape[-1]
    slot_token = ops.reshape(plan.slot_token, (B, C))
    valid = slot_token >= 0
    index = ops.reshape(ops.where(valid, slot_token, T), (B, C, 1))
    padded = ops.concatenate([x, ops.zeros((B, 1, D))], axis=1)
    routed = ops.take_along_axis(padded, index, axis=1)  # (B, C, D)
    slot_pos = ops.where(valid, slot_token, 0)
    if positions is not None:
        slot_pos = ops.take_along_axis(positions, slot_pos, axis=1)
    f = block_branch(ops, block, params, routed, slot_pos, valid, kv=kv)
    update = f * ops.reshape(plan.slot_weight, (B, C, 1))
    rows = ops.reshape(index, (B, C)) + ops.reshape(ops.arange(B), (B, 1)) * (T + 1)
    delta = grouped.scatter_rows(ops, ops.zeros((B * (T + 1), D)), ops.reshape(rows, (B * C,)),
                                 ops.reshape(update, (B * C, D)))
    return x + ops.reshape(delta, (B, T + 1, D))[:, :T]


def forward(spec, x, params: dict, ops: Ops, *, expert: ExpertMLP | None = None,
            block: dict | None = None, mode: str = "eval", noise=None, x_predictor=None,
            validate: bool = True) -> dict:
    """Route and apply one layer; returns {name: array} with the names of
    docs/conventions.md (`plan/...`, `y`, `aux/...`, `stats/...`, `predictor/...`)."""
    check_layer_inputs(ops, spec, x, params, expert, block, mode, noise, x_predictor)
    squeeze = len(x.shape) == 2
    if squeeze:
        x = ops.reshape(x, (1, *x.shape))
    if x_predictor is not None and len(x_predictor.shape) == 2:
        x_predictor = ops.reshape(x_predictor, (1, *x_predictor.shape))
    plan = route(spec, x, params, ops, mode=mode, noise=noise, x_predictor=x_predictor,
                 validate=validate)
    B, T, D = x.shape
    G, S = plan.groups
    if isinstance(spec, MixtureOfDepths):
        y = apply_mod(ops, block, params, x, plan)
    else:
        def expert_fn(h):
            return experts(ops, expert, params, h)
        xg = ops.reshape(x, (G, S, D))
        if isinstance(spec, SoftMoE):
            y = apply_soft(ops, expert_fn, xg, plan.dispatch, plan.combine, spec.num_experts,
                           spec.round_bf16)
        else:
            y = apply_experts(ops, expert, params, xg, plan)
    if validate and not ops.all_finite(y):  # routing was finite: the experts or block made it
        raise ValueError("the layer output contains NaN or inf though the routing was finite: "
                         "check the expert (or block) weights")
    out = {"y": ops.reshape(y, (T, D) if squeeze else (B, T, D))}
    for name in ("slot_token", "slot_weight", "dispatch", "combine"):
        if getattr(plan, name) is not None:
            out[f"plan/{name}"] = getattr(plan, name)
    for prefix, values in (("aux", plan.aux), ("stats", plan.stats), ("predictor", plan.predictor)):
        out.update({f"{prefix}/{k}": v for k, v in values.items()})
    return out
