"""Dropless token choice (Mixtral, capacity="dropless") at work proportional to T·K.

Lowered like every other capacity, dropless buffers hold S rows per expert: E/K times the
work. A backend with the optional fused op `grouped_mlp(x, expert, w1, w2, w3, act)` (x (N, D)
rows sorted by expert, expert (N,) ascending -> each row through its expert's MLP,
act(x @ w1[e]) [* x @ w3[e]] @ w2[e]: grouped matmuls) runs the experts on exactly the T·K
chosen rows instead: the choices are sorted by expert
(stable, so a token's order within an expert is the plan's), gathered, run through the
grouped expert MLP, and each token sums its K outputs with the plan's weights. The plan is
the same; only how it is applied differs, so the conformance rows of the dropless cases hold
this path to the oracle on every backend that has the op. Without it, layers.apply_slots.
May import: moe_min.spec, moe_min.ops, moe_min.routing.
"""

from __future__ import annotations

import numpy as np

from moe_min.ops import Array, Ops, fast_op
from moe_min.routing import Plan, activation
from moe_min.spec import ExpertMLP


def take_rows(ops: Ops, x: Array, idx: Array, back=None) -> Array:
    """ops.take(x, idx, axis=0); with the fused op (ops.py) and `back()` the inverse, its
    gradient is a gather rather than a scatter-add. back is called only when used."""
    op = fast_op(ops, "take_rows") if back is not None else None
    return op(x, idx, back()) if op else ops.take(x, idx, axis=0)


def scatter_rows(ops: Ops, x: Array, rows: Array, src: Array) -> Array:
    """x (N, D) with src (M, D) added at rows (M,): the fused op, else the contract's
    scatter_add with the row index broadcast over D (MLX: 4x slower at T=4096, D=512)."""
    op = fast_op(ops, "scatter_rows")
    if op:
        return op(x, rows, src)
    M, D = src.shape
    return ops.scatter_add(x, ops.broadcast_to(ops.reshape(rows, (M, 1)), (M, D)), src, axis=0)


def slot_inverses(ops: Ops, plan: Plan, picks: Array, rows: int):
    """For apply_slots' token-choice gathers, the `back` of take_rows: of the dispatch (padded
    token row -> the expert-major rows holding it: its K picks, none for a dropped choice or a
    padding row) and of the combine (expert-major row -> the one kept choice that picks it;
    a spare row is read only by dropped choices, whose weight is 0). rows: E·(G·C + 1)."""
    G, S, K = picks.shape
    kept = ops.where(plan.choice_slot < plan.slot_token.shape[1] * plan.slot_token.shape[2],
                     picks, rows)

    def dispatch():
        pad = ops.zeros((G, 1, K), "int") + rows
        return ops.reshape(ops.concatenate([kept, pad], axis=1), (G * (S + 1), K))

    def combine():
        n = G * S * K
        found = ops.scatter_add(ops.zeros((rows + 1,), "int"), ops.reshape(kept, (n,)),
                                ops.arange(n) + 1, axis=0)[:rows]  # choice + 1, or 0
        return ops.reshape(ops.where(found > 0, found - 1, n), (rows, 1))
    return dispatch, combine


def applies(ops: Ops, plan: Plan, group_tokens: int) -> bool:
    """A token-choice plan in which nothing can drop (C >= S), on a backend with the op."""
    return (plan.choice_slot is not None and plan.slot_token.shape[2] >= group_tokens
            and fast_op(ops, "grouped_mlp") is not None)


def expert_mlp(ops: Ops, spec: ExpertMLP, params: dict, rows: Array, expert: Array) -> Array:
    """layers.mlp on rows sorted by expert, each through its own expert's weights."""
    name = "silu" if spec.glu else spec.activation
    return ops.grouped_mlp(rows, expert, params["expert_w1"], params["expert_w2"],
                           params.get("expert_w3"), lambda a: activation(ops, name, a))


def apply_grouped(ops: Ops, spec: ExpertMLP, params: dict, x: Array, plan: Plan) -> Array:
    """y[g, s] = Σ_k choice_weight[g, s, k] · expert_{e(g,s,k)}(x[g, s]); x (G, S, D)."""
    G, S, D = x.shape
    K, C, E = plan.choice_slot.shape[-1], plan.slot_token.shape[2], plan.slot_token.shape[1]
    N = G * S * K
    slot = ops.reshape(plan.choice_slot, (N, 1))  # flat slot e·C + c: e = #{e' : slot >= (e'+1)·C}
    bounds = ops.reshape(ops.asarray((np.arange(E) + 1) * C, "int"), (1, E))
    expert = ops.sum(ops.astype(slot >= bounds, "int"), axis=1)  # (N,) in (g, s, k) order
    order = ops.stop_gradient(ops.argsort(expert))  # stable: by expert, then (g, s, k)
    token = ops.take(ops.asarray(np.repeat(np.arange(G * S), K), "int"), order, axis=0)
    back = ops.scatter_add(ops.zeros((N,), "int"), order, ops.arange(N), axis=0)  # inverse
    # token t is read at the sorted positions of its K choices; sorted row i by choice order[i]
    rows = take_rows(ops, ops.reshape(x, (G * S, D)), token, lambda: ops.reshape(back, (G * S, K)))
    out = expert_mlp(ops, spec, params, rows, ops.take(expert, order, axis=0))
    picked = ops.reshape(take_rows(ops, out, back, lambda: ops.reshape(order, (N, 1))),
                         (G, S, K, D))
    return ops.sum(picked * ops.reshape(plan.choice_weight, (G, S, K, 1)), axis=2)
