"""Routing, lowered once against the op contract: `route(spec, x, params, ops)` -> `Plan`.

A sparse plan says which token sits in each expert slot and with what weight
(`slot_token[G, E, C]`, -1 for an empty slot; `slot_weight[G, E, C]`); a Soft MoE plan holds
the dispatch and combine matrices. Shapes, names and rules: docs/conventions.md.
Memory is O(tokens·K + experts·capacity): no [tokens, experts, capacity] one-hot anywhere.
May import: moe_min.spec, moe_min.ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moe_min.ops import Array, Ops
from moe_min.spec import ExpertChoice, MixtureOfDepths, SoftMoE, TokenChoice

MODES = ("train", "eval", "causal")


@dataclass
class Plan:
    """The routing decision for one layer call. Sparse schemes fill slot_token/slot_weight,
    Soft MoE fills dispatch/combine. `aux`, `stats` and `predictor` map the names of
    docs/conventions.md (without their prefix) to arrays."""

    groups: tuple[int, int]  # (G, S)
    slot_token: Array | None = None  # (G, E, C) int, -1 marks an empty slot
    slot_weight: Array | None = None  # (G, E, C)
    choice_slot: Array | None = None  # (G, S, K) token choice: flat slot e*C+c, E*C if dropped
    choice_weight: Array | None = None  # (G, S, K) its combine weight, 0 if dropped
    dispatch: Array | None = None  # (G, E*P, S), rows sum to 1 over tokens
    combine: Array | None = None  # (G, S, E*P), rows sum to 1 over slots
    aux: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    predictor: dict = field(default_factory=dict)


def group_shape(spec, batch: int, seq: int) -> tuple[int, int]:
    """(G, S) for `batch` sequences of `seq` tokens, by the spec's grouping rule."""
    if spec.group == "sequence":
        return batch, seq
    if spec.group == "batch":
        return 1, batch * seq
    if (batch * seq) % spec.group_size:
        raise ValueError(f"group_size {spec.group_size} must divide the {batch * seq} tokens "
                         f"of the batch (B={batch} x T={seq})")
    return batch * seq // spec.group_size, spec.group_size


def activation(ops: Ops, name: str, x: Array) -> Array:
    if name == "relu":
        return ops.maximum(x, 0.0)
    if name == "gelu":
        return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + ops.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))
    if name == "silu":
        return x * ops.sigmoid(x)
    raise ValueError(f"activation {name!r}: expected relu, gelu, gelu_tanh or silu")


def bce_with_logits(ops: Ops, z: Array, target: Array) -> Array:
    """Mean binary cross-entropy, stable for large |z|: max(z,0) - z·t + log(1 + e^-|z|)."""
    return ops.mean(ops.maximum(z, 0.0) - z * target + ops.log(1.0 + ops.exp(-ops.maximum(z, -z))))


def predictor_logits(ops: Ops, spec, params: dict, h: Array) -> Array:
    """The causal router's logits (.., O); its input is cut from the graph (stop-gradient)."""
    h = ops.stop_gradient(h)
    hidden = activation(ops, spec.activation, h @ params["predictor_w1"] + params["predictor_b1"])
    return hidden @ params["predictor_w2"] + params["predictor_b2"]


def _normal(ops: Ops, noise, shape: tuple[int, ...], what: str) -> Array:
    if noise is None:
        raise ValueError(f"{what} is on in mode='train': pass its standard-normal draw as noise")
    return ops.reshape(noise, shape)


def _check_finite(ops: Ops, logits: Array, validate: bool, weights: str = "router_w"):
    if validate and not ops.all_finite(logits):
        raise ValueError(f"router logits contain NaN or inf: check the input and {weights} "
                         "(every logit must be finite)")


def _ones(ops: Ops, shape, dtype="float") -> Array:
    return ops.zeros(shape, dtype) + 1


def _in_time_order(ops: Ops, chosen: Array, weight: Array) -> tuple[Array, Array]:
    """Slots holding the chosen tokens of each (group, expert) row in increasing token order,
    padded with -1 / weight 0. chosen, weight: (G, E, S) -> slot_token, slot_weight (G, E, S)."""
    order = ops.argsort(ops.where(chosen, 0, 1), axis=-1)  # stable: chosen first, time order
    taken = ops.take_along_axis(chosen, order, axis=-1)
    slot_token = ops.where(taken, order, -1)
    return slot_token, ops.where(taken, ops.take_along_axis(weight, order, axis=-1), 0.0)


def _variance_ratio(ops: Ops, v: Array) -> Array:
    """(std/mean)^2 over the last axis (population std), averaged over groups."""
    mean = ops.mean(v, axis=-1, keepdims=True)
    return ops.mean(ops.mean((v - mean) * (v - mean), axis=-1) / ops.mean(v, axis=-1) ** 2)


def _k_major(ops: Ops, v, order3, G: int, N: int):
    """(G, S, K) in token order -> (G, K*S) in claim order: tokens by priority, every first
    choice before any second choice (vmoe; routing_semantics.md §2.3)."""
    v = ops.take_along_axis(v, order3, axis=1)
    return ops.reshape(ops.transpose(v, (0, 2, 1)), (G, N))


def _claim_slots(ops: Ops, spec: TokenChoice, top_gate, top_expert, weight, C: int):
    """Walk the choices in k-major priority order; each takes its expert's next free slot."""
    G, S, K = top_expert.shape
    E, N = spec.num_experts, S * K
    if spec.drop_priority == "score":  # V-MoE's BPR: stable sort by descending top-1 gate
        order = ops.argsort(top_gate[..., 0], axis=-1, descending=True)
    else:
        order = ops.broadcast_to(ops.reshape(ops.arange(S), (1, S)), (G, S))
    order3 = ops.reshape(order, (G, S, 1))
    expert, claim_weight = (_k_major(ops, v, order3, G, N) for v in (top_expert, weight))
    tokens = ops.broadcast_to(ops.reshape(ops.arange(S), (1, S, 1)), (G, S, K))
    claims = ops.broadcast_to(ops.reshape(ops.arange(N), (1, S, K)), (G, S, K))  # s·K + k
    token, claim = _k_major(ops, tokens, order3, G, N), _k_major(ops, claims, order3, G, N)
    perm = ops.argsort(expert, axis=-1)  # stable, so claims keep their order within an expert
    expert, token, claim_weight, claim = (ops.take_along_axis(v, perm, axis=-1)
                                          for v in (expert, token, claim_weight, claim))
    demand = ops.scatter_add(ops.zeros((G, E), "int"), expert, _ones(ops, (G, N), "int"), axis=-1)
    first = ops.cumsum(demand, axis=-1) - demand
    rank = ops.reshape(ops.arange(N), (1, N)) - ops.take_along_axis(first, expert, axis=-1)
    kept = rank < C
    slot = ops.where(kept, expert * C + rank, E * C)  # dropped claims go to one spare slot
    slot_token = ops.scatter_add(ops.zeros((G, E * C + 1), "int"), slot, token + 1, axis=-1)
    slot_weight = ops.scatter_add(ops.zeros((G, E * C + 1)), slot, claim_weight, axis=-1)
    per_token = ops.scatter_add(ops.zeros((G, S), "int"), token, ops.astype(kept, "int"), axis=-1)
    load = ops.where(demand < C, demand, C)
    choice_slot = ops.reshape(ops.scatter_add(ops.zeros((G, N), "int"), claim, slot, axis=-1),
                              (G, S, K))  # back to token order: each claim id once
    # the weights in token order are the input's: no gradient through the sorts above
    choice_weight = ops.where(choice_slot < E * C, weight, 0.0)
    return (ops.reshape(slot_token[:, : E * C] - 1, (G, E, C)),
            ops.reshape(slot_weight[:, : E * C], (G, E, C)), per_token, load,
            choice_slot, choice_weight)


def _token_choice(spec: TokenChoice, x, params, ops: Ops, mode, noise, validate) -> Plan:
    B, T, D = x.shape
    G, S = group_shape(spec, B, T)
    E, K = spec.num_experts, spec.top_k
    xg = ops.reshape(x, (G, S, D))
    train = mode == "train"
    if train and spec.noise == "jitter":  # Switch: x · U(1-eps, 1+eps), U = Phi(normal draw)
        uniform = 0.5 * (1.0 + ops.erf(_normal(ops, noise, (G, S, D), "jitter") / math.sqrt(2)))
        xg = xg * (1.0 + spec.jitter_eps * (2.0 * uniform - 1.0))
    clean = xg @ params["router_w"]  # (G, S, E)
    _check_finite(ops, clean, validate)
    logits = clean
    if train and spec.noise == "additive":  # V-MoE: sigma = noise_std / E
        logits = clean + (spec.noise_std / E) * _normal(ops, noise, (G, S, E), "additive noise")
    gate_fn = (lambda v: ops.softmax(v, axis=-1)) if spec.gate == "softmax" else ops.sigmoid
    gates = gate_fn(logits)
    top_gate, top_expert = ops.top_k(gates, K, axis=-1)  # (G, S, K), ties: lower expert
    weight = top_gate / ops.sum(top_gate, axis=-1, keepdims=True) if spec.renormalize else top_gate
    C = spec.slots(S)
    slot_token, slot_weight, per_token, load, choice_slot, choice_weight = _claim_slots(
        ops, spec, top_gate, ops.stop_gradient(top_expert), weight, C)

    chosen = top_expert[..., :1] if spec.load_balance_counting == "top1" else top_expert
    hits = ops.reshape(chosen, (G, S * chosen.shape[-1]))
    frac = ops.scatter_add(ops.zeros((G, E)), hits, _ones(ops, hits.shape), axis=-1) / S
    aux = {"load_balance": ops.mean(E * ops.sum(frac * ops.mean(gates, axis=1), axis=-1)),
           "z_loss": ops.mean(ops.logsumexp(clean, axis=-1) ** 2),
           "importance": _variance_ratio(ops, ops.sum(gate_fn(clean), axis=1)),
           "load": ops.zeros(())}
    if train and spec.noise == "additive":  # Shazeer et al.: P(still in the top-K under noise)
        sigma = spec.noise_std / E
        kth = ops.top_k(logits, K, axis=-1)[0][..., K - 1:]
        p_in = 0.5 * (1.0 - ops.erf((kth - clean) / (sigma * math.sqrt(2.0))))
        aux["load"] = _variance_ratio(ops, ops.mean(p_in, axis=1))
    aux["total"] = (spec.load_balance_coef * aux["load_balance"] + spec.z_loss_coef * aux["z_loss"]
                    + spec.importance_coef * aux["importance"] + spec.load_coef * aux["load"])
    stats = {"load": load, "dropped": G * S * K - ops.sum(load),
             "unrouted": ops.sum(ops.astype(per_token == 0, "int")),
             "experts_per_token": ops.reshape(per_token, (B, T))}
    return Plan((G, S), slot_token, slot_weight, choice_slot, choice_weight, aux=aux, stats=stats)


def causal_decisions(ops: Ops, spec, params, x, router_logits=None, x_predictor=None):
    """Per-token routing at sampling time (ExpertChoice, MixtureOfDepths), bool (B, T, O):
    predictor logit > threshold, or (causal="router") router logit > 0. A decoder calls it
    alone to skip a MoD block without routing it (the sampling-time saving)."""
    if spec.causal == "router":
        if router_logits is None:
            w = params["router_w"]
            router_logits = x @ (ops.reshape(w, (w.shape[0], 1)) if len(w.shape) == 1 else w)
        return router_logits > 0.0
    h = x if x_predictor is None else x_predictor
    logits = predictor_logits(ops, spec.predictor, params, h)
    return logits > spec.predictor.threshold


def _predictor_aux(ops: Ops, spec, params, x, x_predictor, router_logits, targets):
    """BCE of the predictor (input under stop-gradient) and of the router against the
    training-mode choices; the targets never carry gradient."""
    targets = ops.stop_gradient(targets)
    aux = {"predictor": ops.zeros(()), "router_bce": bce_with_logits(ops, router_logits, targets)}
    predictor = {}
    if spec.predictor is not None:
        h = x if x_predictor is None else x_predictor
        logits = predictor_logits(ops, spec.predictor, params, h)
        aux["predictor"] = bce_with_logits(ops, logits, targets)
        predictor = {"targets": targets, "logits": logits}
    loss_coef = spec.predictor.loss_coef if spec.predictor is not None else 0.0
    aux["total"] = loss_coef * aux["predictor"] + spec.router_bce_coef * aux["router_bce"]
    return aux, predictor


def _expert_choice(spec: ExpertChoice, x, params, ops: Ops, mode, noise, x_predictor, validate):
    B, T, D = x.shape
    G, S = group_shape(spec, B, T)
    E, C = spec.num_experts, spec.slots(S)
    clean = ops.reshape(x, (G, S, D)) @ params["router_w"]  # (G, S, E)
    _check_finite(ops, clean, validate)
    logits = clean
    if mode == "train" and spec.noise == "additive":
        logits = clean + (spec.noise_std / E) * _normal(ops, noise, (G, S, E), "additive noise")
    gates = ops.transpose(ops.softmax(logits, axis=-1), (0, 2, 1))  # (G, E, S), over experts
    top_weight, top_token = ops.top_k(gates, C, axis=-1)  # ties: lower token first
    top_token = ops.stop_gradient(top_token)
    picked = ops.scatter_add(ops.zeros((G, E, S)), top_token, _ones(ops, (G, E, C)), axis=-1)
    targets = ops.reshape(ops.transpose(picked, (0, 2, 1)), (B, T, E))
    router_logits = ops.reshape(clean, (B, T, E))
    aux, predictor = _predictor_aux(ops, spec, params, x, x_predictor, router_logits, targets)
    if mode == "causal":
        decided = causal_decisions(ops, spec, params, x, router_logits, x_predictor)
        picked = ops.transpose(ops.reshape(decided, (G, S, E)), (0, 2, 1))
        slot_token, slot_weight = _in_time_order(ops, picked, gates)
        picked = ops.astype(picked, "float")
    else:
        slot_token, slot_weight = top_token, top_weight
    per_token = ops.astype(ops.sum(picked, axis=1), "int")  # (G, S)
    stats = {"load": ops.astype(ops.sum(picked, axis=-1), "int"), "dropped": ops.zeros((), "int"),
             "unrouted": ops.sum(ops.astype(per_token == 0, "int")),
             "experts_per_token": ops.reshape(per_token, (B, T))}
    return Plan((G, S), slot_token, slot_weight, aux=aux, stats=stats, predictor=predictor)


def _unit(ops: Ops, v, axis: int):
    """v · rsqrt(Σ v² + 1e-6): eps inside, so a zero vector stays zero (vmoe)."""
    return v / ops.sqrt(ops.sum(v * v, axis=axis, keepdims=True) + 1e-6)


def _soft_moe(spec: SoftMoE, x, params, ops: Ops, mode, noise, validate=True) -> Plan:
    B, T, D = x.shape
    G, S = group_shape(spec, B, T)
    E, P = spec.num_experts, spec.slots_for(S)
    xg = ops.reshape(x, (G, S, D))
    mu = params["slot_mu"]  # (D, E, P)
    if tuple(mu.shape) != (D, E, P):
        raise ValueError(f"slot_mu has shape {tuple(mu.shape)}: expected (D, E, P) = "
                         f"{(D, E, P)} for {S} tokens per group")
    xn = _unit(ops, xg, -1) if spec.normalize_input else xg
    mun = _unit(ops, mu, 0) if spec.normalize_slots else mu
    scale = params["slot_scale"]
    on_input = spec.scale == "input" or (spec.scale == "smaller" and G * S * D < D * E * P)
    if spec.scale != "none":  # the product is the same either way; vmoe scales the smaller
        xn, mun = (xn * scale, mun) if on_input else (xn, mun * scale)
    logits = xn @ ops.reshape(mun, (D, E * P))  # (G, S, E*P)
    _check_finite(ops, logits, validate, "slot_mu and slot_scale")
    if mode == "train" and spec.noise_std > 0:
        logits = logits + spec.noise_std * _normal(ops, noise, (G, S, E * P), "Soft MoE noise")
    dispatch = ops.transpose(ops.softmax(logits, axis=1), (0, 2, 1))  # over tokens
    return Plan((G, S), dispatch=dispatch, combine=ops.softmax(logits, axis=-1),
                aux={"total": ops.zeros(())})


def _mixture_of_depths(spec: MixtureOfDepths, x, params, ops: Ops, mode, x_predictor, validate):
    B, T, D = x.shape
    r = ops.reshape(x @ ops.reshape(params["router_w"], (D, 1)), (B, T))  # scalar router
    _check_finite(ops, r, validate)
    k = spec.tokens(T)
    top = ops.stop_gradient(ops.top_k(r, k, axis=-1)[1])  # ties: lower index
    chosen = ops.scatter_add(ops.zeros((B, T)), top, _ones(ops, (B, k)), axis=-1)
    targets = ops.reshape(chosen, (B, T, 1))
    aux, predictor = _predictor_aux(ops, spec, params, x, x_predictor, ops.reshape(r, (B, T, 1)),
                                    targets)
    if mode == "causal":
        chosen = ops.reshape(causal_decisions(ops, spec, params, x, ops.reshape(r, (B, T, 1)),
                                               x_predictor), (B, T))
    else:
        chosen = chosen > 0.5
    weight = r if spec.weight == "raw" else ops.sigmoid(r)
    slot_token, slot_weight = _in_time_order(ops, ops.reshape(chosen, (B, 1, T)),
                                             ops.reshape(weight, (B, 1, T)))
    if mode != "causal":
        slot_token, slot_weight = slot_token[..., :k], slot_weight[..., :k]
    per_token = ops.astype(chosen, "int")
    stats = {"load": ops.sum(per_token, axis=-1, keepdims=True), "dropped": ops.zeros((), "int"),
             "unrouted": ops.sum(1 - per_token), "experts_per_token": per_token}
    return Plan((B, T), slot_token, slot_weight, aux=aux, stats=stats, predictor=predictor)


def route(spec, x, params: dict, ops: Ops, *, mode: str = "eval", noise=None,
          x_predictor=None, validate: bool = True) -> Plan:
    """Route `x` (B, T, D) under `spec`. mode: "train" (noise on), "eval", or "causal"
    (expert choice and MoD decide each token alone, as at sampling time). `noise` is the
    standard-normal draw for training noise; `x_predictor` the predictor's input (default x)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    if mode == "causal" and not isinstance(spec, (ExpertChoice, MixtureOfDepths)):
        raise ValueError(f"mode 'causal' needs ExpertChoice or MixtureOfDepths, "
                         f"not {type(spec).__name__}")
    if len(x.shape) != 3:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected (B, T, D)")
    if isinstance(spec, TokenChoice):
        return _token_choice(spec, x, params, ops, mode, noise, validate)
    if isinstance(spec, ExpertChoice):
        return _expert_choice(spec, x, params, ops, mode, noise, x_predictor, validate)
    if isinstance(spec, SoftMoE):
        return _soft_moe(spec, x, params, ops, mode, noise, validate)
    if isinstance(spec, MixtureOfDepths):
        return _mixture_of_depths(spec, x, params, ops, mode, x_predictor, validate)
    raise TypeError(f"not a routing spec: {type(spec).__name__}")
