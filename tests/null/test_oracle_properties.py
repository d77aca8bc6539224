"""Hypothesis invariants of moe_min/oracle.py: plans respect capacity and never repeat a token,
soft weights are convex, permutations commute with routing, causal modes never look ahead, and
the oracle's capacity agrees with the spec's own helpers (two independent implementations)."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from moe_min import oracle
from moe_min.spec import ExpertChoice, ExpertMLP, MixtureOfDepths, Predictor, SoftMoE, TokenChoice

SETTINGS = settings(max_examples=40, deadline=None)
seeds = st.integers(0, 2**32 - 1)


def expert_params(rng, E, D, H=3, glu=False):
    params = {"expert_w1": rng.normal(size=(E, D, H)), "expert_w2": rng.normal(size=(E, H, D))}
    if glu:
        params["expert_w3"] = rng.normal(size=(E, D, H))
    return ExpertMLP(hidden=H, activation="silu" if glu else "gelu", glu=glu), params


@st.composite
def group_shapes(draw):
    """(B, T, group kwargs) with a fixed group size that divides B*T."""
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    group = draw(st.sampled_from(["sequence", "batch", "fixed"]))
    if group != "fixed":
        return B, T, {"group": group}
    size = draw(st.sampled_from([d for d in range(1, B * T + 1) if (B * T) % d == 0]))
    return B, T, {"group": "fixed", "group_size": size}


@st.composite
def token_choice_specs(draw):
    E = draw(st.integers(1, 4))
    kw = {"num_experts": E, "top_k": draw(st.integers(1, E)),
          "gate": draw(st.sampled_from(["softmax", "sigmoid"])),
          "renormalize": draw(st.booleans()),
          "capacity": draw(st.sampled_from(["factor", "fixed", "dropless"])),
          "capacity_factor": draw(st.sampled_from([0.25, 0.5, 1.0, 1.25, 2.0])),
          "capacity_rounding": draw(st.sampled_from(["ceil", "round"])),
          "capacity_multiple_of": draw(st.integers(1, 4)), "min_capacity": draw(st.integers(0, 2)),
          "drop_priority": draw(st.sampled_from(["position", "score"]))}
    kw["expert_capacity"] = draw(st.integers(1, 5)) if kw["capacity"] == "fixed" else 0
    return kw


def kept_pairs(slot_token):
    """{(group, token, expert)} for every filled slot."""
    g, e, c = np.nonzero(slot_token >= 0)
    return set(zip(g.tolist(), slot_token[g, e, c].tolist(), e.tolist(), strict=True))


@SETTINGS
@given(token_choice_specs(), group_shapes(), seeds, st.booleans())
def test_token_choice_plan_respects_capacity_and_top_k(kw, shape, seed, glu):
    B, T, group = shape
    spec = TokenChoice(**kw, **group)
    rng = np.random.default_rng(seed)
    D = 3
    expert, params = expert_params(rng, spec.num_experts, D, glu=glu)
    params["router_w"] = rng.normal(size=(D, spec.num_experts))
    x = rng.normal(size=(B, T, D))
    out = oracle.token_choice(spec, x, params, expert)
    st_, sw = out["plan/slot_token"], out["plan/slot_weight"]
    G, E, C = st_.shape
    S = B * T // G
    assert C == oracle.capacity(spec, S)
    filled = st_ >= 0
    # Filled slots form a prefix of each expert's row (never more than C, no holes).
    assert np.all(filled[..., 1:] <= filled[..., :-1])
    assert np.all(sw[~filled] == 0)
    logits = (x @ params["router_w"]).reshape(G, S, E)
    gates = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True) if spec.gate == "softmax"
             else 1 / (1 + np.exp(-logits)))
    for g, e in np.ndindex(G, E):
        toks = st_[g, e][filled[g, e]]
        assert len(set(toks.tolist())) == toks.size  # no token twice in one expert
    pairs = kept_pairs(st_)
    assert len(pairs) == int(filled.sum())  # every kept (token, expert) pair appears once
    for g, s, e in pairs:  # ... and is one of the token's top-K choices
        top = np.argsort(-gates[g, s], kind="stable")[: spec.top_k]
        assert e in top
        weight = sw[g, e][list(st_[g, e]).index(s)]
        expected = gates[g, s, e] / (gates[g, s, top].sum() if spec.renormalize else 1.0)
        np.testing.assert_allclose(weight, expected, rtol=1e-12)
    assert len(pairs) + int(out["stats/dropped"]) == G * S * spec.top_k
    per_token = out["stats/experts_per_token"].reshape(G, S)
    assert int(per_token.sum()) == len(pairs)
    assert int(out["stats/unrouted"]) == int((per_token == 0).sum())
    assert out["stats/load"].tolist() == filled.sum(-1).tolist()


@SETTINGS
@given(token_choice_specs(), group_shapes(), seeds)
def test_token_choice_drops_nothing_when_capacity_covers_demand(kw, shape, seed):
    B, T, group = shape
    S_max = B * T
    if kw["capacity"] != "dropless":  # an expert never sees more than S tokens
        kw = dict(kw, capacity="fixed", expert_capacity=S_max)
    spec = TokenChoice(**kw, **group)
    rng = np.random.default_rng(seed)
    expert, params = expert_params(rng, spec.num_experts, 2)
    params["router_w"] = rng.normal(size=(2, spec.num_experts))
    out = oracle.token_choice(spec, rng.normal(size=(B, T, 2)), params, expert)
    assert int(out["stats/dropped"]) == 0 and int(out["stats/unrouted"]) == 0
    assert np.all(out["stats/experts_per_token"] == spec.top_k)


@SETTINGS
@given(st.integers(1, 4), st.integers(2, 7), st.sampled_from([1, 2]), seeds)
def test_permuting_tokens_permutes_the_plan_under_score_priority(E, T, K, seed):
    # BPR orders tokens by their top-1 gate, not their position, so with distinct gates a
    # permutation of the group's tokens permutes the plan slot for slot (capacity binding).
    K = min(K, E)
    rng = np.random.default_rng(seed)
    spec = TokenChoice(num_experts=E, top_k=K, capacity_factor=0.5, capacity_multiple_of=1,
                       drop_priority="score")
    expert, params = expert_params(rng, E, 3)
    params["router_w"] = rng.normal(size=(3, E))
    x = rng.normal(size=(1, T, 3))
    gates = np.exp(x[0] @ params["router_w"])
    assume(len(np.unique(gates.max(-1) / gates.sum(-1))) == T)  # no ties in the top-1 gates
    perm = rng.permutation(T)
    a = oracle.token_choice(spec, x, params, expert)
    b = oracle.token_choice(spec, x[:, perm], params, expert)
    inverse = np.argsort(perm)  # old token j sits at new index inverse[j]
    st_a = a["plan/slot_token"]
    assert b["plan/slot_token"].tolist() == np.where(st_a >= 0, inverse[st_a], -1).tolist()
    np.testing.assert_allclose(b["plan/slot_weight"], a["plan/slot_weight"], rtol=1e-12)
    np.testing.assert_allclose(b["y"], a["y"][:, perm], rtol=1e-10, atol=1e-12)


@SETTINGS
@given(st.integers(1, 4), st.integers(1, 7), seeds)
def test_permuting_tokens_permutes_kept_pairs_under_position_priority_without_drops(E, T, seed):
    # Position priority reorders slots under a permutation, but with capacity >= demand the set
    # of (token, expert) pairs and the output are permuted exactly.
    rng = np.random.default_rng(seed)
    spec = TokenChoice(num_experts=E, top_k=min(2, E), capacity="dropless")
    expert, params = expert_params(rng, E, 3)
    params["router_w"] = rng.normal(size=(3, E))
    x = rng.normal(size=(1, T, 3))
    perm = rng.permutation(T)
    a = oracle.token_choice(spec, x, params, expert)
    b = oracle.token_choice(spec, x[:, perm], params, expert)
    inverse = np.argsort(perm)
    assert kept_pairs(b["plan/slot_token"]) == {(g, int(inverse[s]), e)
                                                for g, s, e in kept_pairs(a["plan/slot_token"])}
    np.testing.assert_allclose(b["y"], a["y"][:, perm], rtol=1e-10, atol=1e-12)


def ec_setup(rng, E, D, predictor=True):
    expert, params = expert_params(rng, E, D)
    params["router_w"] = rng.normal(size=(D, E))
    if predictor:
        params.update(predictor_w1=rng.normal(size=(D, 2)), predictor_b1=rng.normal(size=2),
                      predictor_w2=rng.normal(size=(2, E)), predictor_b2=rng.normal(size=E))
    return expert, params


@SETTINGS
@given(st.integers(1, 4), group_shapes(), st.sampled_from([0.5, 1.0, 2.0, 4.0]),
       st.sampled_from(["ceil", "round"]), st.integers(0, 2), seeds, st.booleans())
def test_expert_choice_fills_exactly_c_slots_by_descending_gate(E, shape, cf, rounding, low, seed,
                                                                train):
    B, T, group = shape
    spec = ExpertChoice(num_experts=E, capacity_factor=cf, capacity_rounding=rounding,
                        min_capacity=low, noise="additive", predictor=Predictor(hidden=2),
                        **group)
    rng = np.random.default_rng(seed)
    expert, params = ec_setup(rng, E, 3)
    noise = rng.normal(size=(B, T, E))
    out = oracle.expert_choice(spec, rng.normal(size=(B, T, 3)), params, expert,
                               mode="train" if train else "eval", noise=noise)
    st_, sw = out["plan/slot_token"], out["plan/slot_weight"]
    G, _, C = st_.shape
    assert C == oracle.capacity(spec, B * T // G) and np.all(st_ >= 0)  # every expert full
    assert np.all(out["stats/load"] == C)
    for g, e in np.ndindex(G, E):
        assert len(set(st_[g, e].tolist())) == C
    assert np.all(np.diff(sw, axis=-1) <= 0)  # slot c holds the c-th highest gate
    assert int(out["predictor/targets"].sum()) == G * E * C


@SETTINGS
@given(st.integers(1, 4), st.integers(2, 7), seeds)
def test_permuting_tokens_permutes_the_expert_choice_plan(E, T, seed):
    rng = np.random.default_rng(seed)
    spec = ExpertChoice(num_experts=E, capacity_factor=1.0, group="sequence", predictor=None,
                        causal="router", router_bce_coef=1.0)
    expert, params = ec_setup(rng, E, 3, predictor=False)
    x = rng.normal(size=(1, T, 3))
    logits = x[0] @ params["router_w"]
    gates = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assume(all(len(np.unique(gates[:, e])) == T for e in range(E)))  # no ties per expert
    perm = rng.permutation(T)
    a = oracle.expert_choice(spec, x, params, expert)
    b = oracle.expert_choice(spec, x[:, perm], params, expert)
    assert b["plan/slot_token"].tolist() == np.argsort(perm)[a["plan/slot_token"]].tolist()
    np.testing.assert_allclose(b["y"], a["y"][:, perm], rtol=1e-10, atol=1e-12)


@SETTINGS
@given(st.integers(1, 4), group_shapes(), st.integers(1, 3), seeds, st.booleans(),
       st.sampled_from(["smaller", "input", "slots", "none"]))
def test_soft_moe_dispatch_and_combine_rows_sum_to_one(E, shape, P, seed, bf16, scale):
    B, T, group = shape
    spec = SoftMoE(num_experts=E, slots_per_expert=P, round_bf16=bf16, scale=scale,
                   noise_std=0.5, **group)
    rng = np.random.default_rng(seed)
    expert, params = expert_params(rng, E, 3)
    params.update(slot_mu=rng.normal(size=(3, E, P)), slot_scale=np.asarray(rng.uniform(0.5, 2)))
    out = oracle.soft_moe(spec, rng.normal(size=(B, T, 3)), params, expert, mode="train",
                          noise=rng.normal(size=(B, T, E, P)))
    G = out["plan/dispatch"].shape[0]
    assert out["plan/dispatch"].shape == (G, E * P, B * T // G)
    np.testing.assert_allclose(out["plan/dispatch"].sum(-1), 1.0, rtol=1e-12)
    np.testing.assert_allclose(out["plan/combine"].sum(-1), 1.0, rtol=1e-12)
    assert np.all(out["plan/dispatch"] > 0) and np.all(out["plan/combine"] > 0)


BLOCK = {"heads": 2, "rope_base": 100.0, "norm_eps": 1e-6, "mlp": ExpertMLP(hidden=5)}


def mod_setup(rng, D=4):
    params = {"router_w": rng.normal(size=D), "block_norm1": rng.uniform(0.5, 1.5, D),
              "block_norm2": rng.uniform(0.5, 1.5, D), "block_w1": rng.normal(size=(D, 5)),
              "block_w2": rng.normal(size=(5, D)),
              "predictor_w1": rng.normal(size=(D, 2)), "predictor_b1": rng.normal(size=2),
              "predictor_w2": rng.normal(size=(2, 1)), "predictor_b2": rng.normal(size=1)}
    params.update({f"block_w{n}": rng.normal(size=(D, D)) / 2 for n in "qkvo"})
    return params


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 9), st.sampled_from([0.125, 0.3, 0.5, 1.0]),
       st.sampled_from(["floor", "ceil", "round"]), st.integers(0, 2), seeds)
def test_mod_train_mode_routes_exactly_k_per_row_in_increasing_order(B, T, cap, rounding, low,
                                                                     seed):
    spec = MixtureOfDepths(capacity=cap, capacity_rounding=rounding, min_tokens=low)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, 4))
    out = oracle.mixture_of_depths(spec, x, mod_setup(rng), BLOCK, mode="train")
    st_ = out["plan/slot_token"]
    k = oracle.capacity(spec, T)
    assert st_.shape == (B, 1, k)
    assert np.all(np.diff(st_, axis=-1) > 0)  # strictly increasing: time order (P4)
    assert np.all(out["predictor/targets"].sum((1, 2)) == k)  # exactly k per row (P13)
    unchosen = out["predictor/targets"][..., 0] == 0
    assert np.array_equal(out["y"][unchosen], x[unchosen])


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 8), seeds, st.sampled_from(["train", "causal"]))
def test_mod_with_zero_router_and_raw_weight_is_the_identity(B, T, seed, mode):
    spec = MixtureOfDepths(capacity=0.5, causal="router", router_bce_coef=1.0, predictor=None)
    rng = np.random.default_rng(seed)
    params = dict(mod_setup(rng), router_w=np.zeros(4))
    x = rng.normal(size=(B, T, 4))
    out = oracle.mixture_of_depths(spec, x, params, BLOCK, mode=mode)
    assert np.array_equal(out["y"], x)  # residual exactly once, r = 0 (P6)


@SETTINGS
@given(st.integers(1, 3), st.integers(2, 8), seeds, st.sampled_from(["predictor", "router"]),
       st.sampled_from(["sequence", "batch"]))
def test_causal_expert_choice_decisions_never_look_ahead(B, T, seed, causal, group):
    rng = np.random.default_rng(seed)
    E = 3
    spec = ExpertChoice(num_experts=E, group=group, causal=causal, router_bce_coef=1.0,
                        predictor=Predictor(hidden=2) if causal == "predictor" else None)
    expert, params = ec_setup(rng, E, 3, predictor=causal == "predictor")
    x = rng.normal(size=(B, T, 3))
    t = int(rng.integers(0, T - 1))
    later = x.copy()
    later[:, t + 1:] = rng.normal(size=later[:, t + 1:].shape)
    a = oracle.expert_choice(spec, x, params, expert, mode="causal")
    b = oracle.expert_choice(spec, later, params, expert, mode="causal")
    assert np.array_equal(a["stats/experts_per_token"][:, : t + 1],
                          b["stats/experts_per_token"][:, : t + 1])
    np.testing.assert_allclose(a["y"][:, : t + 1], b["y"][:, : t + 1], rtol=1e-12, atol=1e-14)


@SETTINGS
@given(st.integers(1, 3), st.integers(2, 8), seeds, st.sampled_from(["predictor", "router"]))
def test_causal_mod_decisions_and_outputs_never_look_ahead(B, T, seed, causal):
    rng = np.random.default_rng(seed)
    spec = MixtureOfDepths(causal=causal, router_bce_coef=1.0,
                           predictor=Predictor(hidden=2) if causal == "predictor" else None)
    params = mod_setup(rng)
    x = rng.normal(size=(B, T, 4))
    t = int(rng.integers(0, T - 1))
    later = x.copy()
    later[:, t + 1:] = rng.normal(size=later[:, t + 1:].shape)
    a = oracle.mixture_of_depths(spec, x, params, BLOCK, mode="causal")
    b = oracle.mixture_of_depths(spec, later, params, BLOCK, mode="causal")
    assert np.array_equal(a["stats/experts_per_token"][:, : t + 1],
                          b["stats/experts_per_token"][:, : t + 1])
    np.testing.assert_allclose(a["y"][:, : t + 1], b["y"][:, : t + 1], rtol=1e-12, atol=1e-14)


@SETTINGS
@given(st.integers(2, 4), st.integers(1, 7), seeds)
def test_predictor_loss_of_a_batch_is_the_mean_of_its_rows(B, T, seed):
    # P7: targets are built per sequence; flattening the batch would break this equality.
    rng = np.random.default_rng(seed)
    mod = MixtureOfDepths(capacity=0.5, router_bce_coef=0.5)
    params = mod_setup(rng)
    x = rng.normal(size=(B, T, 4))
    whole = oracle.mixture_of_depths(mod, x, params, BLOCK, mode="train")
    rows = [oracle.mixture_of_depths(mod, x[b], params, BLOCK, mode="train") for b in range(B)]
    for key in ("aux/predictor", "aux/router_bce", "aux/total"):
        np.testing.assert_allclose(whole[key], np.mean([r[key] for r in rows]), rtol=1e-12)
    ec = ExpertChoice(num_experts=3, group="sequence", predictor=Predictor(hidden=2))
    expert, params = ec_setup(rng, 3, 4)
    whole = oracle.expert_choice(ec, x, params, expert)
    rows = [oracle.expert_choice(ec, x[b], params, expert) for b in range(B)]
    np.testing.assert_allclose(whole["aux/predictor"], np.mean([r["aux/predictor"] for r in rows]),
                               rtol=1e-12)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 600), st.integers(1, 9), st.integers(1, 4),
       st.floats(0.01, 8.0, allow_nan=False), st.sampled_from(["ceil", "round"]),
       st.integers(1, 8), st.integers(0, 5), st.integers(1, 50),
       st.sampled_from(["factor", "fixed", "dropless"]))
def test_oracle_capacity_agrees_with_the_spec_helpers(S, E, K, cf, rounding, multiple, low,
                                                      explicit, kind):
    K = min(K, E)
    explicit = explicit if kind == "fixed" else 0  # expert_capacity only with capacity='fixed'
    tc = TokenChoice(num_experts=E, top_k=K, capacity=kind, capacity_factor=cf,
                     capacity_rounding=rounding, capacity_multiple_of=multiple,
                     min_capacity=low, expert_capacity=explicit)
    assert oracle.capacity(tc, S) == tc.slots(S)
    ec = ExpertChoice(num_experts=E, capacity="fixed" if kind == "fixed" else "factor",
                      capacity_factor=cf, capacity_rounding=rounding,
                      capacity_multiple_of=multiple, min_capacity=low, expert_capacity=explicit)
    assert oracle.capacity(ec, S) == ec.slots(S)
    for slots in ("per_expert", "factor"):
        soft = SoftMoE(num_experts=E, slots=slots, slots_per_expert=multiple, capacity_factor=cf)
        assert oracle.capacity(soft, S) == soft.slots_for(S)
    for mod_rounding in ("floor", "ceil", "round"):
        mod = MixtureOfDepths(capacity=min(cf / 8, 1.0), capacity_rounding=mod_rounding,
                              min_tokens=low)
        assert oracle.capacity(mod, S) == mod.tokens(S)
    pred = Predictor(hidden=explicit % 7)
    assert oracle.predictor_width(pred, S) == pred.width(S)
