"""The oracle as a library for others (docs/conventions.md, "The oracle as a library"): expert
kinds and callables, the router and per-group keys it returns, and the knobs it does not ask
for when they do not apply. Expected numbers are worked out by hand or from a second,
independent route to the same quantity (one group run alone), never from the same call."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_min import oracle
from moe_min.conformance.case import case_paths, read_case
from moe_min.spec import ExpertChoice, ExpertMLP, MixtureOfDepths, Predictor, SoftMoE, TokenChoice

L3 = math.log(3)
TIGHT = dict(rtol=1e-12, atol=1e-14)
# Three tokens, two experts, router_w = I: softmax([ln3, 0]) = [3/4, 1/4], [0, 0] -> [1/2, 1/2]
X = np.asarray([[L3, 0.0], [0.0, L3], [0.0, 0.0]])
ROUTER = {"router_w": np.eye(2)}


def test_identity_expert_returns_the_weighted_token():
    out = oracle.token_choice(TokenChoice(num_experts=2, top_k=1, capacity="dropless"), X,
                              ROUTER, "identity")
    # top-1 weights .75, .75 and .5 (tie -> e0): y = weight * x, no expert parameter needed
    np.testing.assert_allclose(out["y"][0], [0.75 * X[0], 0.75 * X[1], 0.5 * X[2]], **TIGHT)


def test_linear_expert_is_one_matrix_per_expert():
    w = np.stack([2 * np.eye(2), np.asarray([[0.0, 1.0], [1.0, 0.0]])])  # e0 doubles, e1 swaps
    out = oracle.token_choice(TokenChoice(num_experts=2, top_k=1, capacity="dropless"), X,
                              {**ROUTER, "expert_w1": w}, "linear")
    np.testing.assert_allclose(out["y"][0], [0.75 * 2 * X[0], 0.75 * X[1][::-1], 0.5 * 2 * X[2]],
                               **TIGHT)
    with pytest.raises(ValueError, match=r"w1.\]\.shape = \(2, 2, 3\): expected \(2, 2, 2\)"):
        oracle.token_choice(TokenChoice(num_experts=2, top_k=1), X,
                            {**ROUTER, "expert_w1": np.zeros((2, 2, 3))}, "linear")


def test_callable_expert_receives_the_expert_index_and_its_rows():
    seen = []

    def expert(e, h):
        seen.append((e, h.copy()))
        return (e + 1) * h

    spec = ExpertChoice(num_experts=2, capacity="fixed", expert_capacity=1, predictor=None,
                        causal="router", router_bce_coef=1.0)
    out = oracle.expert_choice(spec, X, ROUTER, expert)
    # e0 takes t0 (.75), e1 takes t1 (.75); each sees exactly its token's row
    assert [(e, h.tolist()) for e, h in seen] == [(0, [X[0].tolist()]), (1, [X[1].tolist()])]
    np.testing.assert_allclose(out["y"][0], [0.75 * X[0], 0.75 * 2 * X[1], [0, 0]], **TIGHT)


def test_callable_expert_matches_the_built_in_mlp_it_reimplements():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3))
    params = {"slot_mu": rng.normal(size=(3, 2, 1)), "slot_scale": np.asarray(1.3),
              "expert_w1": rng.normal(size=(2, 3, 4)), "expert_w2": rng.normal(size=(2, 4, 3))}
    spec = SoftMoE(num_experts=2)
    mlp = oracle.soft_moe(spec, x, params, ExpertMLP(hidden=4, activation="gelu"))
    mine = oracle.soft_moe(spec, x, {k: params[k] for k in ("slot_mu", "slot_scale")},
                           lambda e, h: oracle.activation("gelu", h @ params["expert_w1"][e])
                           @ params["expert_w2"][e])
    np.testing.assert_allclose(mine["y"], mlp["y"], **TIGHT)


@pytest.mark.parametrize("expert, match", [
    (lambda e, h: h[:, :1], r"expert\(0, h\) returned shape \(2, 1\): expected \(2, 2\)"),
    (lambda e, h: h * np.nan, r"expert\(0, h\)'s output contains NaN or inf"),
    ("quadratic", r"expert = 'quadratic': expected an ExpertMLP, 'linear', 'identity' or a"),
])
def test_a_bad_expert_is_a_one_line_error_naming_it(expert, match):
    with pytest.raises(ValueError, match=match) as err:
        oracle.token_choice(TokenChoice(num_experts=2, top_k=1), X, ROUTER, expert)
    assert "\n" not in str(err.value)


def test_callable_mod_block_gets_the_chosen_rows_at_their_true_positions():
    x = np.zeros((5, 2))
    x[:, 0] = [0.1, 0.9, -1.0, 0.5, 0.2]  # r = x . [1, 0]: top-2 are t1 and t3
    seen = []

    def block(h, positions):
        seen.append((h.copy(), list(positions)))
        return np.ones_like(h)

    spec = MixtureOfDepths(capacity=0.4, predictor=None, causal="router", router_bce_coef=1.0)
    out = oracle.mixture_of_depths(spec, x, {"router_w": np.asarray([1.0, 0.0])}, block)
    assert seen[0][1] == [1, 3] and np.array_equal(seen[0][0], x[[1, 3]])
    want = x.copy()
    want[[1, 3]] += np.asarray([0.9, 0.5])[:, None]  # x + r * f with f = 1
    np.testing.assert_allclose(out["y"][0], want, **TIGHT)
    with pytest.raises(ValueError, match=r"block\(h, positions\) returned shape \(2, 1\)"):
        oracle.mixture_of_depths(spec, x, {"router_w": np.asarray([1.0, 0.0])},
                                 lambda h, pos: h[:, :1])


def test_router_logits_and_gates_are_the_ones_that_route():
    spec = TokenChoice(num_experts=2, top_k=1, capacity="dropless", noise="additive",
                       noise_std=2.0)
    noise = np.asarray([[[0.0, 1.0], [0.0, 0.0], [1.0, 0.0]]])
    train = oracle.token_choice(spec, X, ROUTER, "identity", mode="train", noise=noise)
    # sigma = noise_std / E = 1: logits = x + noise
    np.testing.assert_allclose(train["router/logits"][0], X + noise[0], **TIGHT)
    gates = np.exp(X + noise[0]) / np.exp(X + noise[0]).sum(-1, keepdims=True)
    np.testing.assert_allclose(train["router/gates"][0], gates, **TIGHT)
    evaluate = oracle.token_choice(spec, X, ROUTER, "identity")
    np.testing.assert_allclose(evaluate["router/gates"][0], [[.75, .25], [.25, .75], [.5, .5]],
                               **TIGHT)
    mod = oracle.mixture_of_depths(MixtureOfDepths(capacity=0.5, weight="sigmoid",
                                                   predictor=None, causal="router",
                                                   router_bce_coef=1.0),
                                   X, {"router_w": np.asarray([1.0, 0.0])}, lambda h, p: h)
    np.testing.assert_allclose(mod["router/logits"][0, :, 0], X[:, 0], **TIGHT)
    np.testing.assert_allclose(mod["router/gates"][0, :, 0], [0.75, 0.5, 0.5], **TIGHT)  # sig


def _one_group_at_a_time(run, x):
    return [run(x[b:b + 1]) for b in range(x.shape[0])]


@pytest.mark.parametrize("scheme", ["token_choice", "expert_choice", "mixture_of_depths"])
def test_group_aux_terms_are_each_group_alone_and_aux_is_their_mean(scheme):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 6, 4))
    params = {"router_w": rng.normal(size=(4, 3)), "predictor_w1": rng.normal(size=(4, 2)),
              "predictor_b1": rng.normal(size=2), "predictor_w2": rng.normal(size=(2, 3)),
              "predictor_b2": rng.normal(size=3)}
    if scheme == "token_choice":
        spec = TokenChoice(num_experts=3, top_k=2, capacity_factor=0.5, z_loss_coef=0.1,
                           importance_coef=0.2)
        names = ("load_balance", "z_loss", "importance", "load")

        def run(v):
            return oracle.token_choice(spec, v, params, "identity")
    elif scheme == "expert_choice":
        spec = ExpertChoice(num_experts=3, group="sequence", router_bce_coef=0.5,
                            predictor=Predictor(hidden=2))
        names = ("predictor", "router_bce")

        def run(v):
            return oracle.expert_choice(spec, v, params, "identity")
    else:
        params = {"router_w": params["router_w"][:, 0], "predictor_w1": params["predictor_w1"],
                  "predictor_b1": params["predictor_b1"],
                  "predictor_w2": params["predictor_w2"][:, :1],
                  "predictor_b2": params["predictor_b2"][:1]}
        spec = MixtureOfDepths(capacity=0.5, router_bce_coef=0.5, predictor=Predictor(hidden=2))
        names = ("predictor", "router_bce")

        def run(v):
            return oracle.mixture_of_depths(spec, v, params, lambda h, p: h)
    out, alone = run(x), _one_group_at_a_time(run, x)
    for name in names:
        per_group = out[f"group_aux/{name}"]
        assert per_group.shape == (3,)
        np.testing.assert_allclose(per_group, [float(a[f"aux/{name}"]) for a in alone], **TIGHT)
        np.testing.assert_allclose(out[f"aux/{name}"], per_group.mean(), **TIGHT)
    assert len(set(np.round(out["group_aux/" + names[0]], 12))) == 3  # the groups do differ


def test_noise_std_is_not_required_with_noise_off():
    out = oracle.token_choice(TokenChoice(num_experts=2, top_k=1, noise_std=0.0), X, ROUTER,
                              "identity", mode="train")
    # C = ceil(3 * 1 * 1.25 / 2) = 2, up to the multiple 4; the tie t2 goes to e0
    assert out["plan/slot_token"].tolist() == [[[0, 2, -1, -1], [1, -1, -1, -1]]]
    oracle.expert_choice(ExpertChoice(num_experts=2, noise_std=0.0), X, ROUTER, "identity",
                         mode="train")


def test_predictor_weights_are_needed_only_in_causal_mode():
    spec = ExpertChoice(num_experts=2, capacity="fixed", expert_capacity=1, router_bce_coef=0.5,
                        predictor=Predictor(hidden=2))
    out = oracle.expert_choice(spec, X, ROUTER, "identity", mode="train")
    # no weights: no predictor loss or logits (not a false 0), the total is the router term
    assert "aux/predictor" not in out and "predictor/logits" not in out
    assert out["predictor/targets"][0].tolist() == [[1, 0], [0, 1], [0, 0]]
    np.testing.assert_allclose(out["aux/total"], 0.5 * out["aux/router_bce"], **TIGHT)
    with pytest.raises(ValueError, match=r"params\['predictor_w1'\] is missing"):
        oracle.expert_choice(spec, X, ROUTER, "identity", mode="causal")
    mod = MixtureOfDepths(capacity=0.5)
    out = oracle.mixture_of_depths(mod, X, {"router_w": np.ones(2)}, lambda h, p: h)
    assert "aux/predictor" not in out and float(out["aux/total"]) == 0.0


def test_library_keys_stay_out_of_the_corpus():
    for path in case_paths():
        case = read_case(path)
        assert not [k for k in case.tensors if k.startswith(
            tuple(f"expect/{p}" for p in oracle.LIBRARY_KEYS))], case.name
