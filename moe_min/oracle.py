"""Independent float64 NumPy oracle: the meaning of docs/conventions.md, written from the
references (shared/reference/routing_semantics.md, mod_and_predictor.md), never from the
lowering. Loops where loops are clearest. May import only math, numpy and moe_min.spec.
It is also a library for others (docs/conventions.md, "The oracle as a library").

Common arguments: `x` [B, T, D] or [T, D] (then B = 1 in every output); `params` name -> array
(the conventions' names without `param/`); `expert` an ExpertMLP, "linear", "identity" or a
callable f(e, h[N, D]) -> [N, D] (see `expert_fn`); `mode` "train" | "eval" (| "causal" for EC
and MoD); `noise` the standard-normal draw, used only in train mode when the spec's noise is
on; `x_predictor` the predictor's input (default x; the predictor loss depends on it alone).
Predictor weights are needed only in causal mode: without them the predictor's loss and
logits are not reported. Bad input raises ValueError naming the value and the accepted range.

Keys returned (the conventions' `expect/` keys without the prefix):
- token_choice: plan/slot_token, plan/slot_weight, y, aux/load_balance, aux/z_loss,
  aux/importance, aux/load, aux/total, stats/load, stats/dropped, stats/unrouted,
  stats/experts_per_token.
- expert_choice: plan/slot_token, plan/slot_weight, y, aux/predictor, aux/router_bce, aux/total,
  stats/load, stats/unrouted, stats/experts_per_token, and with a predictor predictor/targets,
  predictor/logits.
- soft_moe: plan/dispatch, plan/combine, y, aux/total (always 0: no aux loss, vmoe).
- mixture_of_depths: the expert_choice keys with G = B, E = 1.
Integer outputs are int64, the rest float64; aux/* are 0-d; stats/dropped and stats/unrouted
are 0-d totals over all groups. Library keys, outside the corpus (LIBRARY_KEYS): router/logits
[B, T, E] (the logits that route: noise included in train mode; Soft MoE [B, T, E*P], MoD
[B, T, 1] = r), router/gates [B, T, E] (TC, EC; MoD: the combine weight r or sigmoid(r)), and
group_aux/<name> [G] for each aux term but the total (aux/<name> is their mean).
"""

from __future__ import annotations

import math

import numpy as np

from moe_min.spec import ExpertChoice, ExpertMLP, MixtureOfDepths, Predictor, SoftMoE, TokenChoice

# Readings chosen where the conventions leave room (each also commented at its spot):
# - Aux losses are reported in every mode (vmoe computes them in deterministic mode too); a loss
#   that does not apply is 0 (aux/predictor without a predictor, aux/load without additive
#   noise). aux/total skips terms whose coefficient is 0 (vmoe `_weighted_sum`).
# - TC: z-loss and importance use the clean logits/gates (after jitter, before additive noise);
#   top-K, BPR order, weights and load balance use the gates that route (noisy when noise is
#   on): vmoe `nn/routing.py` computes gshard_loss on `gates_softmax_noisy`. The load loss uses
#   the clean logits against the K-th noisy logit (vmoe `_load_auxiliary_loss`).
# - BPR sorts on the top-1 routing gate before any renormalisation.
# - EC/MoD: predictor/targets always come from the top-C / top-k plan of this call's gates
#   (noisy in train, clean otherwise), also in causal mode; router_bce uses the clean logits.
# - EC/MoD causal mode keeps the spec's groups, with C = S; the predictor sees x_predictor.
# - Soft MoE bfloat16 rounding (vmoe `Bfloat16Dispatcher`) applies to x before the dispatch
#   einsum and to the expert outputs before the combine einsum, not to the router logits;
#   `slot_scale` is not needed with scale="none".
# - MoD block MLP: `act(u @ block_w1) @ block_w2`; glu is refused (no block_w3 in the table).

F64 = np.float64
LIBRARY_KEYS = ("router/", "group_aux/")  # returned for callers, not stored in the corpus


# ----------------------------------------------------------------------------- elementwise
def _phi(x):
    """Standard normal CDF 0.5 (1 + erf(x / sqrt 2)); numpy has no erf (math.erf: ~1 ulp)."""
    return 0.5 * (1.0 + np.vectorize(math.erf, otypes=[F64])(np.asarray(x, F64) / math.sqrt(2)))


def _sigmoid(x):
    e = np.exp(-np.abs(x))  # never overflows
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def activation(name: str, x) -> np.ndarray:
    """relu; gelu (exact erf); gelu_tanh; silu = x * sigmoid(x) (docs/conventions.md)."""
    x = np.asarray(x, F64)
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "gelu":  # exact: 0.5 x (1 + erf(x / sqrt 2)) = x Phi(x)
        return x * _phi(x)
    if name == "gelu_tanh":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if name == "silu":
        return x * _sigmoid(x)
    raise ValueError(f"activation {name!r}: expected 'relu', 'gelu', 'gelu_tanh' or 'silu'")


def _softmax(z, axis):
    e = np.exp(z - np.max(z, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def _logsumexp(z, axis):
    m = np.max(z, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(z - m), axis=axis))


def _bce(logits, targets):
    """Binary cross-entropy with logits per element, stable: max(z,0) - z t + log1p(e^-|z|)."""
    z = logits
    return np.maximum(z, 0.0) - z * targets + np.log1p(np.exp(-np.abs(z)))


def _cv2(v) -> float:
    """(std / mean)^2 with the population std (ddof 0), as vmoe's importance and load losses."""
    return float(np.var(v) / np.mean(v) ** 2)


def _bf16(a):
    """Round to bfloat16: nearest-even on the float32 bit pattern (vmoe `_cast_to_bfloat16`)."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).astype(F64)


# ----------------------------------------------------------------------------- sizes
def capacity(spec, tokens: int) -> int:
    """Slots per expert C (TC, EC) for a group of `tokens`, Soft MoE's P, or MoD's k (tokens = T).

    Re-derived from the spec's fields (routing_semantics.md §1), never from its helpers."""
    if isinstance(spec, MixtureOfDepths):
        raw = spec.capacity * tokens
        k = {"floor": math.floor, "ceil": math.ceil, "round": round}[spec.capacity_rounding](raw)
        return min(max(k, spec.min_tokens), tokens)
    if isinstance(spec, SoftMoE):  # P: explicit, or max(1, round(S cf / E)) with half-even round
        per_factor = max(1, round(tokens * spec.capacity_factor / spec.num_experts))
        return spec.slots_per_expert if spec.slots == "per_expert" else per_factor
    if isinstance(spec, TokenChoice) and spec.capacity == "dropless":
        return tokens  # K distinct experts per token: an expert never sees more than S
    if spec.capacity == "fixed":
        c = spec.expert_capacity  # explicit capacity skips the formula and the multiple
    else:
        demand = tokens * spec.top_k if isinstance(spec, TokenChoice) else tokens
        raw = demand * spec.capacity_factor / spec.num_experts  # left to right, as vmoe
        c = math.ceil(raw) if spec.capacity_rounding == "ceil" else round(raw)  # round: half-even
        m, c = spec.capacity_multiple_of, max(c, spec.min_capacity)
        c = -(-c // m) * m  # round UP to a multiple of m
    return min(c, tokens) if isinstance(spec, ExpertChoice) else c  # EC: a top-C over S tokens


def predictor_width(predictor: Predictor, model_dim: int) -> int:
    """Hidden width Hp of the predictor: `hidden`, or D // 2 (at least 1) when hidden is 0."""
    return predictor.hidden if predictor.hidden > 0 else max(1, model_dim // 2)


# ----------------------------------------------------------------------------- input checks
def _finite(a, what):
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{what} contains NaN or inf: expected finite values")


def _tokens(x, what="x", like=None):
    """x as float64 [B, T, D] (a [T, D] input is B = 1); `like`: the shape it must have."""
    x = np.asarray(x, F64)
    x = x[None] if x.ndim == 2 else x
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(f"{what}.shape = {x.shape}: expected [T, D] or [B, T, D], all >= 1")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{what}.shape = {x.shape}: expected x's shape {like.shape}")
    _finite(x, what)
    return x


def _param(params, name, shape):
    if name not in params:
        raise ValueError(f"params[{name!r}] is missing: expected an array of shape {shape}")
    a = np.asarray(params[name], F64)
    if a.shape != tuple(shape):
        raise ValueError(f"params[{name!r}].shape = {a.shape}: expected {tuple(shape)}")
    return a


def _noise(noise, shape, scheme):
    if noise is None:
        raise ValueError(f"{scheme}: mode='train' with noise on needs noise: expected a "
                         f"standard-normal array of shape {shape}")
    n = np.asarray(noise, F64)
    if n.shape == shape[1:] and shape[0] == 1:
        n = n[None]  # x was [T, D]: the noise may omit B as well
    if n.shape != shape:
        raise ValueError(f"{scheme}: noise.shape = {n.shape}: expected {shape}")
    _finite(n, "noise")
    return n


def _groups(spec, B, T):
    """(G, S): groups are a row-major reshape of the B*T tokens (docs/conventions.md, Groups)."""
    if spec.group == "sequence":
        return B, T
    if spec.group == "batch":
        return 1, B * T
    if (B * T) % spec.group_size:
        raise ValueError(f"group_size = {spec.group_size} does not divide B*T = {B * T}: "
                         "expected a divisor of the token count")
    return B * T // spec.group_size, spec.group_size


def _prepare(spec, x, params, expert, mode, modes, scheme):
    """Shared checks of TC, EC and Soft MoE: mode, x, the expert, groups -> x, G, S, f."""
    if mode not in modes:
        raise ValueError(f"{scheme}: mode = {mode!r}: expected one of {', '.join(modes)}")
    x = _tokens(x)
    B, T, D = x.shape
    return (x, *_groups(spec, B, T), expert_fn(expert, params, spec.num_experts, D))


# ----------------------------------------------------------------------------- shared pieces
def expert_fn(expert, params: dict, num_experts: int, model_dim: int):
    """f(e, h[N, D]) -> [N, D], expert e's function. `expert` is an ExpertMLP (act(h @ w1[e]) @
    w2[e], or SwiGLU when `glu`), "linear" (h @ expert_w1[e], w1 [E, D, D]), "identity" (h; no
    parameters) or a callable f(e, h) of the caller's, whose output must be finite and [N, D]."""
    E, D = num_experts, model_dim
    if isinstance(expert, ExpertMLP):
        H = expert.hidden
        w1, w2 = _param(params, "expert_w1", (E, D, H)), _param(params, "expert_w2", (E, H, D))
        if expert.glu:
            w3 = _param(params, "expert_w3", (E, D, H))
            return lambda e, h: (activation("silu", h @ w1[e]) * (h @ w3[e])) @ w2[e]
        return lambda e, h: activation(expert.activation, h @ w1[e]) @ w2[e]
    kind = expert if isinstance(expert, str) else None
    if kind == "identity":
        return lambda e, h: h
    if kind == "linear":
        w = _param(params, "expert_w1", (E, D, D))
        return lambda e, h: h @ w[e]
    if callable(expert):
        return lambda e, h: _user_output(expert(e, h), h, f"expert({e}, h)")
    raise ValueError(f"expert = {expert!r}: expected an ExpertMLP, 'linear', 'identity' or a "
                     "callable f(e, h[N, D]) -> [N, D]")


def _user_output(out, like, what):
    """A caller's function must map rows to rows of the same width, finite."""
    out = np.asarray(out, F64)
    if out.shape != like.shape:
        raise ValueError(f"{what} returned shape {out.shape}: expected {like.shape} (its input's)")
    _finite(out, f"{what}'s output")
    return out


def _apply_slots(f, xg, slot_token, slot_weight):
    """y[g, s] = sum over the slots (e, c) holding s of weight * expert_e(x[g, s])."""
    y = np.zeros_like(xg)
    for g, e in np.ndindex(slot_token.shape[:2]):
        full = slot_token[g, e] >= 0  # empty slots add nothing
        toks = slot_token[g, e][full]
        if toks.size:
            np.add.at(y[g], toks, slot_weight[g, e][full][:, None] * f(e, xg[g, toks]))
    return y


def _predictor_logits(pred, params, xp, out, mode):
    """act(h @ w1 + b1) @ w2 + b2 -> [B, T, out] (docs/conventions.md, Parameters); None
    without a predictor, or outside causal mode when its weights are not given."""
    if pred is None or (mode != "causal" and "predictor_w1" not in params):
        return None
    D = xp.shape[-1]
    hp = predictor_width(pred, D)
    w1, b1 = _param(params, "predictor_w1", (D, hp)), _param(params, "predictor_b1", (hp,))
    w2, b2 = _param(params, "predictor_w2", (hp, out)), _param(params, "predictor_b2", (out,))
    return activation(pred.activation, xp @ w1 + b1) @ w2 + b2


def _top_in_order(scores, k, axis=-1):
    """Indices of the k highest scores, highest first, equal scores lower index first."""
    return np.argsort(-scores, axis=axis, kind="stable").take(range(k), axis=axis)


def _causal_slots(decide):
    """decide[G, S, E] -> slot_token[G, E, S]: each expert's chosen tokens in time order, then
    -1 (a stable argsort of "not chosen" puts the chosen first, each part in time order)."""
    d = np.swapaxes(decide, 1, 2)
    order = np.argsort(~d, axis=-1, kind="stable")
    return np.where(np.take_along_axis(d, order, -1), order, -1)


def _sparse_plan(slot_token, weights):
    """Slot weights (weights[G, S, E] at each slot's token, 0 when empty) and the training-mode
    targets[G, S, E] (1 iff expert e's slots hold token s)."""
    G, S, E = weights.shape
    slot_weight = np.zeros(slot_token.shape, F64)
    targets = np.zeros((G, S, E), F64)
    for g, e in np.ndindex(G, E):
        toks = slot_token[g, e][slot_token[g, e] >= 0]
        slot_weight[g, e, : toks.size] = weights[g, toks, e]
        targets[g, toks, e] = 1.0
    return slot_weight, targets


def _stats(slot_token, B, T):
    S = B * T // slot_token.shape[0]  # a group's tokens are consecutive in row-major order
    per_token = np.stack([np.bincount(st[st >= 0], minlength=S) for st in slot_token])
    per_token = per_token.astype(np.int64)
    return {"stats/load": (slot_token >= 0).sum(-1).astype(np.int64),
            "stats/unrouted": np.asarray((per_token == 0).sum(), np.int64),
            "stats/experts_per_token": per_token.reshape(B, T)}


def _total(*terms):
    """Sum of coef * loss over terms with coef > 0 (vmoe `_weighted_sum` skips zero weights)."""
    return np.asarray(sum(c * v for c, v in terms if c > 0), F64)


# ----------------------------------------------------------------------------- token choice
def token_choice(spec: TokenChoice, x, params: dict, expert, *, mode: str = "eval",
                 noise=None) -> dict:
    """Top-K token choice with capacity (routing_semantics.md §2)."""
    x, G, S, f = _prepare(spec, x, params, expert, mode, ("train", "eval"), "token_choice")
    (B, T, D), E, K = x.shape, spec.num_experts, spec.top_k
    w = _param(params, "router_w", (D, E))
    noisy = mode == "train" and spec.noise != "none"
    x_router = x
    if noisy and spec.noise == "jitter":  # Switch: router input * U(1-eps, 1+eps); experts see x
        u = 2.0 * _phi(_noise(noise, (B, T, D), "token_choice")) - 1.0
        x_router = x * (1.0 + spec.jitter_eps * u)
    logits = x_router @ w
    _finite(logits, "router logits")
    route_logits = logits
    if noisy and spec.noise == "additive":  # V-MoE: sigma = noise_std / E, before the gate
        sigma = spec.noise_std / E
        route_logits = logits + sigma * _noise(noise, (B, T, E), "token_choice")
    gate = _softmax if spec.gate == "softmax" else (lambda z, axis: _sigmoid(z))
    clean = gate(logits, -1).reshape(G, S, E)
    gates = gate(route_logits, -1).reshape(G, S, E)
    lg, rg = logits.reshape(G, S, E), route_logits.reshape(G, S, E)
    C = capacity(spec, S)
    slot_token = np.full((G, E, C), -1, np.int64)
    slot_weight = np.zeros((G, E, C), F64)
    dropped = 0
    lb, z, imp, load = [], [], [], []
    for g in range(G):
        choice = _top_in_order(gates[g], K)  # [S, K], equal gates: lower expert first
        weight = np.take_along_axis(gates[g], choice, 1)
        if spec.renormalize:  # over the K choices, before capacity (§2.1)
            weight = weight / weight.sum(1, keepdims=True)
        order = np.arange(S)
        if spec.drop_priority == "score":  # BPR: stable sort by descending top-1 gate (§2.3)
            order = np.argsort(-gates[g].max(1), kind="stable")
        fill = np.zeros(E, np.int64)
        for k in range(K):  # k-major: every first choice before any second choice (§2.3)
            for s in order:
                e = choice[s, k]
                if fill[e] < C:
                    slot_token[g, e, fill[e]] = s
                    slot_weight[g, e, fill[e]] = weight[s, k]
                    fill[e] += 1
                else:  # dropped: never re-routed, the token's other weights unchanged
                    dropped += 1
        # Load balance: f from the top-K choices before capacity (top-1 = first max on ties).
        p = gates[g].mean(0)
        ks = range(K) if spec.load_balance_counting == "all_k" else range(1)
        share = sum(np.bincount(choice[:, k], minlength=E) / S for k in ks)
        lb.append(E * float(np.sum(share * p)))
        z.append(float(np.mean(_logsumexp(lg[g], -1) ** 2)))  # ST-MoE, on the clean logits
        imp.append(_cv2(clean[g].sum(0)))  # V-MoE: clean gates
        if noisy and spec.noise == "additive":  # V-MoE load loss (§2.4)
            thr = -np.sort(-rg[g], axis=1)[:, K - 1]  # K-th largest noisy logit
            prob = 1.0 - _phi((thr[:, None] - lg[g]) / sigma)  # clean logits (vmoe)
            load.append(_cv2(prob.mean(0)))
        else:
            load.append(0.0)
    y = _apply_slots(f, x.reshape(G, S, D), slot_token, slot_weight)
    aux = {"load_balance": (spec.load_balance_coef, lb), "z_loss": (spec.z_loss_coef, z),
           "importance": (spec.importance_coef, imp), "load": (spec.load_coef, load)}
    out = {"plan/slot_token": slot_token, "plan/slot_weight": slot_weight,
           "y": y.reshape(B, T, D), "router/logits": route_logits,
           "router/gates": gates.reshape(B, T, E)}
    # per group, then the mean over groups (§2.4)
    out.update({f"group_aux/{k}": np.asarray(v, F64) for k, (_, v) in aux.items()})
    out.update({f"aux/{k}": np.asarray(np.mean(v), F64) for k, (_, v) in aux.items()})
    out["aux/total"] = _total(*[(c, np.mean(v)) for c, v in aux.values()])
    out.update(_stats(slot_token, B, T))
    out["stats/dropped"] = np.asarray(dropped, np.int64)
    return out


# ----------------------------------------------------------------------------- expert choice
def expert_choice(spec: ExpertChoice, x, params: dict, expert, *, mode: str = "eval",
                  noise=None, x_predictor=None) -> dict:
    """Each expert takes its top-C tokens of the group (arXiv:2202.09368 §3.2); causal mode
    decides each token alone (mod_and_predictor.md §7.4)."""
    x, G, S, f = _prepare(spec, x, params, expert, mode, ("train", "eval", "causal"),
                          "expert_choice")
    xp = x if x_predictor is None else _tokens(x_predictor, "x_predictor", like=x)
    (B, T, D), E = x.shape, spec.num_experts
    w = _param(params, "router_w", (D, E))
    logits = x @ w
    _finite(logits, "router logits")
    route_logits = logits
    if mode == "train" and spec.noise == "additive":
        route_logits = logits + (spec.noise_std / E) * _noise(noise, (B, T, E), "expert_choice")
    gates = _softmax(route_logits, -1).reshape(G, S, E)  # over experts; the combine weight
    # Slot c of expert e holds its c-th highest gate over the group's tokens, ties lower token.
    slot_token = _top_in_order(np.swapaxes(gates, 1, 2), capacity(spec, S))
    _, targets = _sparse_plan(slot_token, gates)  # predictor targets: the top-C plan
    pred = _predictor_logits(spec.predictor, params, xp, E, mode)
    if mode == "causal":  # chosen iff predictor logit > threshold, or router logit > 0
        decide = pred > spec.predictor.threshold if spec.causal == "predictor" else logits > 0
        slot_token = _causal_slots(decide.reshape(G, S, E))
    slot_weight, _ = _sparse_plan(slot_token, gates)  # the gate, not renormalised (§3)
    y = _apply_slots(f, x.reshape(G, S, D), slot_token, slot_weight)
    out = {"plan/slot_token": slot_token, "plan/slot_weight": slot_weight,
           "y": y.reshape(B, T, D), "router/logits": route_logits,
           "router/gates": gates.reshape(B, T, E)}
    out.update(_causal_aux(spec, logits, pred, targets.reshape(B, T, E), G))
    out.update(_stats(slot_token, B, T))
    return out


def _causal_aux(spec, router_logits, pred, targets, G):
    """Router BCE (clean logits) and predictor BCE (stop-gradient input), means over all
    tokens and outputs, and per group. Without a predictor its loss is 0; with one but no
    weights (allowed outside causal mode) it is not reported, and aux/total leaves it out."""
    terms = {"router_bce": (spec.router_bce_coef, _bce(router_logits, targets))}
    if spec.predictor is None:
        terms["predictor"] = (0.0, np.zeros(targets.shape))
    elif pred is not None:
        terms["predictor"] = (spec.predictor.loss_coef, _bce(pred, targets))
    out = {f"aux/{k}": np.asarray(np.mean(v), F64) for k, (_, v) in terms.items()}
    out.update({f"group_aux/{k}": v.reshape(G, -1).mean(1) for k, (_, v) in terms.items()})
    out["aux/total"] = _total(*[(c, float(np.mean(v))) for c, v in terms.values()])
    if spec.predictor is not None:
        out["predictor/targets"] = targets
    if pred is not None:
        out["predictor/logits"] = pred
    return out


# ----------------------------------------------------------------------------- soft MoE
def soft_moe(spec: SoftMoE, x, params: dict, expert, *, mode: str = "eval",
             noise=None) -> dict:
    """Soft MoE (vmoe `projects/soft_moe/router.py`, routing_semantics.md §4)."""
    x, G, S, f = _prepare(spec, x, params, expert, mode, ("train", "eval"), "soft_moe")
    (B, T, D), E, P = x.shape, spec.num_experts, capacity(spec, S)
    mu = _param(params, "slot_mu", (D, E, P))
    xg = x.reshape(G, S, D)
    xu = xg / np.sqrt(np.sum(xg**2, -1, keepdims=True) + 1e-6) if spec.normalize_input else xg
    mu_u = mu / np.sqrt(np.sum(mu**2, 0, keepdims=True) + 1e-6) if spec.normalize_slots else mu
    side = spec.scale
    if side == "smaller":  # vmoe: scale the smaller operand, inputs iff inputs.size < mu.size
        side = "input" if x.size < mu.size else "slots"
    if side != "none":
        scale = _param(params, "slot_scale", ())
        xu, mu_u = (xu * scale, mu_u) if side == "input" else (xu, mu_u * scale)
    logits = np.einsum("gsd,dep->gsep", xu, mu_u)
    _finite(logits, "router logits")
    logits = logits.reshape(G, S, E * P)  # slot index e * P + p
    if mode == "train" and spec.noise_std > 0:  # N(0, noise_std), no 1/E here (vmoe)
        logits = logits + spec.noise_std * _noise(noise, (B, T, E, P), "soft_moe").reshape(
            G, S, E * P)
    dispatch = np.swapaxes(_softmax(logits, 1), 1, 2)  # [G, E*P, S]: over tokens
    combine = _softmax(logits, 2)  # [G, S, E*P]: over all slots jointly
    round_ = _bf16 if spec.round_bf16 else (lambda a: a)
    slots = np.einsum("gns,gsd->gnd", dispatch, round_(xg))  # slots get the raw x
    outs = np.concatenate([f(e, slots[:, e * P:(e + 1) * P].reshape(G * P, D))
                           .reshape(G, P, D) for e in range(E)], axis=1)
    y = np.einsum("gsn,gnd->gsd", combine, round_(outs))
    return {"plan/dispatch": dispatch, "plan/combine": combine, "y": y.reshape(B, T, D),
            "aux/total": np.asarray(0.0, F64), "router/logits": logits.reshape(B, T, E * P)}


# ----------------------------------------------------------------------------- mixture of depths
def _rms(v, g, eps):
    return v / np.sqrt(np.mean(v**2, -1, keepdims=True) + eps) * g


def _rope(v, pos, base):
    """Rotate-half RoPE on [k, heads, Dh]: angle pos * base^(-2i/Dh), i < Dh/2."""
    half = v.shape[-1] // 2
    ang = pos[:, None] * base ** (-2.0 * np.arange(half) / v.shape[-1])  # [k, Dh/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = v[..., :half], v[..., half:]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1)


def _block_params(block, params, D):
    if not {"heads", "rope_base", "norm_eps", "mlp"} <= set(block):
        raise ValueError(f"block keys = {sorted(block)}: expected heads, rope_base, norm_eps, mlp")
    heads, base, eps, mlp = block["heads"], block["rope_base"], block["norm_eps"], block["mlp"]
    if not isinstance(heads, (int, np.integer)) or heads < 1 or D % heads or (D // heads) % 2:
        raise ValueError(f"block heads = {heads!r} with D = {D}: expected an int >= 1 that "
                         "divides D into an even head width (rotate-half RoPE)")
    if not isinstance(mlp, ExpertMLP) or mlp.glu:
        raise ValueError(f"block mlp = {mlp!r}: expected an ExpertMLP with glu=False (the "
                         "conventions have no block_w3)")
    p = {n: _param(params, f"block_{n}", s) for n, s in [
        ("norm1", (D,)), ("wq", (D, D)), ("wk", (D, D)), ("wv", (D, D)), ("wo", (D, D)),
        ("norm2", (D,)), ("w1", (D, mlp.hidden)), ("w2", (mlp.hidden, D))]}
    return heads, float(base), float(eps), mlp, p


def block_branch(block: dict, params: dict, h, positions) -> np.ndarray:
    """MoD's f(h, pos): pre-norm attention + MLP without the residual, over the chosen tokens
    h[k, D] at their true positions pos[k] (docs/conventions.md, MoD block branch)."""
    h, pos = np.asarray(h, F64), np.asarray(positions, F64)
    k, D = h.shape
    heads, base, eps, mlp, p = _block_params(block, params, D)
    dh = D // heads
    u = _rms(h, p["norm1"], eps)
    q = _rope((u @ p["wq"]).reshape(k, heads, dh), pos, base)
    kk = _rope((u @ p["wk"]).reshape(k, heads, dh), pos, base)
    v = (u @ p["wv"]).reshape(k, heads, dh)
    scores = np.einsum("qhd,khd->hqk", q, kk) / math.sqrt(dh)
    scores = np.where(pos[None, None, :] > pos[None, :, None], -np.inf, scores)  # key after query
    attn = np.einsum("hqk,khd->qhd", _softmax(scores, -1), v).reshape(k, D)
    a = attn @ p["wo"]
    return a + activation(mlp.activation, _rms(h + a, p["norm2"], eps) @ p["w1"]) @ p["w2"]


def _branch(block, params, D):
    """MoD's f(h, positions): the caller's callable, or the conventions' block, whose
    parameters are checked now, so that they fail even when nothing is routed."""
    if callable(block):
        return lambda h, pos: _user_output(block(h, pos), h, "block(h, positions)")
    _block_params(block, params, D)
    return lambda h, pos: block_branch(block, params, h, pos)


def mixture_of_depths(spec: MixtureOfDepths, x, params: dict, block, *, mode: str = "eval",
                      x_predictor=None) -> dict:
    """Top-k tokens of each sequence by r = x . w go through the block (arXiv:2404.02258 §3.4);
    causal mode decides each token alone (§3.5). `block`: the block dict of the conventions,
    or a callable f(h[k, D], positions[k]) -> [k, D] of the caller's (the branch, no residual)."""
    modes = ("train", "eval", "causal")
    if mode not in modes:
        raise ValueError(f"mixture_of_depths: mode = {mode!r}: expected one of {', '.join(modes)}")
    x = _tokens(x)
    xp = x if x_predictor is None else _tokens(x_predictor, "x_predictor", like=x)
    B, T, D = x.shape
    r = x @ _param(params, "router_w", (D,))  # [B, T]
    branch = _branch(block, params, D)
    _finite(r, "router logits")
    # Per sequence (G = B, E = 1): the top-k by r, ties lower index, kept in time order (P4).
    slot_token = np.sort(_top_in_order(r[:, None, :], capacity(spec, T)), axis=-1)
    weight = (r if spec.weight == "raw" else _sigmoid(r))[..., None]  # [B, T, 1]
    _, targets = _sparse_plan(slot_token, weight)  # per row, never flattened (P7)
    pred = _predictor_logits(spec.predictor, params, xp, 1, mode)
    if mode == "causal":
        decide = pred > spec.predictor.threshold if spec.causal == "predictor" else r[..., None] > 0
        slot_token = _causal_slots(decide)
    slot_weight, _ = _sparse_plan(slot_token, weight)
    y = x.copy()
    for b in range(B):
        idx = slot_token[b, 0][slot_token[b, 0] >= 0]
        if idx.size:  # attention only among the chosen, at their true positions (P10)
            f = branch(x[b, idx], idx)
            y[b, idx] = x[b, idx] + weight[b, idx] * f  # residual added once (P6)
    out = {"plan/slot_token": slot_token, "plan/slot_weight": slot_weight, "y": y,
           "router/logits": r[..., None], "router/gates": weight}
    out.update(_causal_aux(spec, r[..., None], pred, targets, B))
    out.update(_stats(slot_token, B, T))
    return out
