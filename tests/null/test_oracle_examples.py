"""Worked examples for moe_min/oracle.py, each checked by hand: the expected numbers are written
out as arithmetic in the test, never recomputed by the oracle. Router logits are chosen as logs
(ln 2, ln 3, ...) so that the softmax gates are simple fractions, and experts are "identity-like"
(relu with w1 = I and w2 = c·I, so expert e maps a non-negative h to c_e·h)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_min import oracle
from moe_min.spec import ExpertChoice, ExpertMLP, MixtureOfDepths, Predictor, SoftMoE, TokenChoice

L2, L3, L4, L6 = math.log(2), math.log(3), math.log(4), math.log(6)
TIGHT = dict(rtol=1e-12, atol=1e-14)


def scaled_identity_experts(D, scales):
    """ExpertMLP + params where expert e computes scales[e] * relu(h)."""
    E = len(scales)
    params = {"expert_w1": np.stack([np.eye(D)] * E),
              "expert_w2": np.stack([c * np.eye(D) for c in scales])}
    return ExpertMLP(hidden=D, activation="relu"), params


def tc_case(x, scales, mode="eval", router_w_scale=1.0, **spec):
    """Token choice with router_w = I (logits = x, so D = E) and identity-like experts."""
    x = np.asarray(x, float)
    expert, params = scaled_identity_experts(x.shape[-1], scales)
    params["router_w"] = router_w_scale * np.eye(x.shape[-1])
    return oracle.token_choice(TokenChoice(num_experts=len(scales), **spec), x, params, expert,
                               mode=mode)


# Six tokens, three experts, top-1, C = ceil(6 * 1 * 1.0 / 3) = 2 (multiple_of 1).
# logits = x; softmax([ln a, 0, 0]) = [a, 1, 1] / (a + 2):
#   t0 [ln2,0,0] -> e0 with 2/4 = .5     t3 [0,ln2,0] -> e1 with .5
#   t1 [ln3,0,0] -> e0 with 3/5 = .6     t4 [0,0,ln2] -> e2 with .5
#   t2 [ln6,0,0] -> e0 with 6/8 = .75    t5 [0,ln3,0] -> e1 with .6
SIX = [[L2, 0, 0], [L3, 0, 0], [L6, 0, 0], [0, L2, 0], [0, 0, L2], [0, L3, 0]]
SIX_SPEC = dict(top_k=1, capacity_factor=1.0, capacity_multiple_of=1)


def test_token_choice_drops_by_position_when_over_capacity():
    out = tc_case(SIX, [1.0, 2.0, 3.0], **SIX_SPEC)
    # e0 is wanted by t0, t1, t2: positions 0 and 1 fill its 2 slots, t2 drops.
    assert out["plan/slot_token"].tolist() == [[[0, 1], [3, 5], [4, -1]]]
    np.testing.assert_allclose(out["plan/slot_weight"], [[[.5, .6], [.5, .6], [.5, 0]]], **TIGHT)
    x = np.asarray(SIX)
    expected_y = [.5 * 1 * x[0], .6 * 1 * x[1], 0 * x[2], .5 * 2 * x[3], .5 * 3 * x[4],
                  .6 * 2 * x[5]]
    np.testing.assert_allclose(out["y"][0], expected_y, **TIGHT)
    assert out["stats/load"].tolist() == [[2, 2, 1]]
    assert int(out["stats/dropped"]) == 1 and int(out["stats/unrouted"]) == 1
    assert out["stats/experts_per_token"].tolist() == [[1, 1, 0, 1, 1, 1]]
    assert out["plan/slot_token"].dtype == np.int64 and out["y"].shape == (1, 6, 3)


def test_token_choice_score_priority_drops_the_lowest_top1_gate_instead():
    out = tc_case(SIX, [1.0, 2.0, 3.0], drop_priority="score", **SIX_SPEC)
    # BPR order by top-1 gate, stable: t2 .75, t1 .6, t5 .6, t0 .5, t3 .5, t4 .5.
    # e0 takes t2 then t1, so t0 drops; e1 takes t5 before t3 (BPR reorders slots too).
    assert out["plan/slot_token"].tolist() == [[[2, 1], [5, 3], [4, -1]]]
    np.testing.assert_allclose(out["plan/slot_weight"], [[[.75, .6], [.6, .5], [.5, 0]]], **TIGHT)
    x = np.asarray(SIX)
    np.testing.assert_allclose(out["y"][0, 0], [0, 0, 0], **TIGHT)
    np.testing.assert_allclose(out["y"][0, 2], .75 * x[2], **TIGHT)
    assert out["stats/experts_per_token"].tolist() == [[0, 1, 1, 1, 1, 1]]


# Three tokens, three experts, top-2, one slot each. softmax([ln4, ln2, 0]) = [4, 2, 1] / 7:
#   t0 first e0, second e1;  t1 first e1, second e2;  t2 first e2, second e0.
CYCLE = [[L4, L2, 0], [0, L4, L2], [L2, 0, L4]]


def test_token_choice_second_choice_loses_to_later_tokens_first_choice():
    out = tc_case(CYCLE, [1.0, 2.0, 3.0], top_k=2, capacity="fixed", expert_capacity=1)
    # k-major: all first choices (t0->e0, t1->e1, t2->e2) fill every slot before any second
    # choice is seen, so t0's second choice e1 loses to t1 even though t0 comes first.
    assert out["plan/slot_token"].tolist() == [[[0], [1], [2]]]
    np.testing.assert_allclose(out["plan/slot_weight"], np.full((1, 3, 1), 4 / 7), **TIGHT)
    assert int(out["stats/dropped"]) == 3 and int(out["stats/unrouted"]) == 0
    x = np.asarray(CYCLE)
    np.testing.assert_allclose(out["y"][0], [4 / 7 * 1 * x[0], 4 / 7 * 2 * x[1],
                                             4 / 7 * 3 * x[2]], **TIGHT)


def test_token_choice_renormalises_over_k_before_capacity():
    out = tc_case(CYCLE, [1.0, 1.0, 1.0], top_k=2, capacity="fixed", expert_capacity=1,
                  renormalize=True)
    # Renormalised over the two choices: 4 / (4 + 2) = 2/3, kept although the second dropped.
    np.testing.assert_allclose(out["plan/slot_weight"], np.full((1, 3, 1), 2 / 3), **TIGHT)


def test_token_choice_ties_go_to_the_lower_expert_index():
    out = tc_case([[0.0, 0.0, 0.0]], [1.0, 1.0, 1.0], top_k=2, capacity="dropless")
    # Three equal gates 1/3: the two choices are e0 and e1.
    assert out["plan/slot_token"].tolist() == [[[0], [0], [-1]]]
    np.testing.assert_allclose(out["plan/slot_weight"], [[[1 / 3], [1 / 3], [0]]], **TIGHT)


def test_token_choice_sigmoid_gate_is_not_normalised_across_experts():
    out = tc_case([[0.0, L3]], [1.0, 1.0], top_k=1, gate="sigmoid", capacity="dropless")
    # sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4: top-1 is e1 with weight .75.
    assert out["plan/slot_token"].tolist() == [[[-1], [0]]]
    np.testing.assert_allclose(out["plan/slot_weight"][0, 1, 0], .75, **TIGHT)


def test_token_choice_additive_noise_moves_routing_only_in_train_mode():
    expert, params = scaled_identity_experts(2, [1.0, 1.0])
    params["router_w"] = np.zeros((2, 2))  # clean logits [0, 0]: gates 1/2, tie -> e0
    spec = TokenChoice(num_experts=2, top_k=1, noise="additive", noise_std=2.0,
                       capacity="dropless", load_coef=0.0)
    x = np.ones((1, 2))
    noise = np.asarray([[[0.0, L3]]])  # sigma = 2 / 2 = 1: noisy logits [0, ln 3] -> [1/4, 3/4]
    train = oracle.token_choice(spec, x, params, expert, mode="train", noise=noise)
    evaluate = oracle.token_choice(spec, x, params, expert, mode="eval", noise=noise)
    assert train["plan/slot_token"].tolist() == [[[-1], [0]]]
    np.testing.assert_allclose(train["plan/slot_weight"][0, 1, 0], .75, **TIGHT)
    assert evaluate["plan/slot_token"].tolist() == [[[0], [-1]]]
    np.testing.assert_allclose(evaluate["plan/slot_weight"][0, 0, 0], .5, **TIGHT)
    # Load balance uses the routing (noisy) gates: f = [0, 1], p = [1/4, 3/4] -> 2 * 3/4.
    # z-loss and importance use the clean logits [0, 0]: (ln 2)^2, and I = [1/2, 1/2] -> 0.
    np.testing.assert_allclose(train["aux/load_balance"], 1.5, **TIGHT)
    np.testing.assert_allclose(train["aux/z_loss"], L2**2, **TIGHT)
    np.testing.assert_allclose(train["aux/importance"], 0.0, atol=1e-15)


def test_token_choice_jitter_scales_the_router_input_but_not_the_expert_input():
    expert, params = scaled_identity_experts(2, [1.0, 1.0])
    params["router_w"] = np.eye(2)
    spec = TokenChoice(num_experts=2, top_k=1, noise="jitter", jitter_eps=0.5,
                       capacity="dropless")
    # Phi(40) = 1 in float64, so the router sees x * (1 + 0.5) = [1.5, 0]: gate sigmoid(1.5).
    out = oracle.token_choice(spec, [[1.0, 0.0]], params, expert, mode="train",
                              noise=np.full((1, 1, 2), 40.0))
    gate = 1 / (1 + math.exp(-1.5))
    np.testing.assert_allclose(out["y"][0, 0], [gate * 1.0, 0.0], **TIGHT)  # expert saw x = [1, 0]


def test_capacity_round_is_half_to_even_ceil_rounds_up_and_multiple_of_rounds_up():
    def tc(S, **kw):
        kw = dict(dict(num_experts=2, top_k=1, capacity_factor=1.0, capacity_multiple_of=1), **kw)
        return oracle.capacity(TokenChoice(**kw), S)
    assert tc(5, capacity_rounding="round") == 2  # 5 * 1 * 1.0 / 2 = 2.5 -> 2 (even)
    assert tc(7, capacity_rounding="round") == 4  # 3.5 -> 4 (even)
    assert tc(5, capacity_rounding="ceil") == 3  # 2.5 -> 3
    assert tc(5, capacity_rounding="ceil", capacity_multiple_of=4) == 4  # 3 -> 4
    assert tc(5, capacity_rounding="round", min_capacity=3) == 3  # 2 -> at least 3
    assert tc(5, top_k=2, num_experts=4) == 3  # S*K = 10, 10 / 4 = 2.5 -> ceil 3
    assert tc(5, capacity="fixed", expert_capacity=7, capacity_multiple_of=4) == 7  # no multiple
    assert tc(5, capacity="dropless") == 5
    # Left to right in floating point (vmoe): 100 * 1.1 = 110.00000000000001, / 10 =
    # 11.000000000000002, so ceil gives 12, not 11.
    assert tc(100, num_experts=10, capacity_factor=1.1) == 12
    ec = ExpertChoice(num_experts=1, capacity_factor=4.0, predictor=Predictor())
    assert oracle.capacity(ec, 3) == 3  # 3 * 4 / 1 = 12, but a top-C over 3 tokens: C <= S
    mod = dict(capacity=0.125)
    assert oracle.capacity(MixtureOfDepths(**mod), 20) == 2  # floor(2.5)
    assert oracle.capacity(MixtureOfDepths(**mod, capacity_rounding="round"), 20) == 2
    assert oracle.capacity(MixtureOfDepths(**mod, capacity_rounding="round"), 28) == 4  # 3.5
    assert oracle.capacity(MixtureOfDepths(**mod, capacity_rounding="ceil"), 20) == 3
    assert oracle.capacity(MixtureOfDepths(**mod, min_tokens=5), 4) == 4  # at most T
    assert oracle.capacity(SoftMoE(num_experts=2, slots="factor"), 5) == 2  # round(2.5) = 2
    assert oracle.capacity(SoftMoE(num_experts=4, slots="factor"), 1) == 1  # round(.25) -> 1
    # The plan has exactly C slots per expert.
    out = tc_case(np.zeros((7, 2)), [1.0, 1.0], top_k=1, capacity_factor=1.0,
                  capacity_rounding="round", capacity_multiple_of=1)
    assert out["plan/slot_token"].shape == (1, 2, 4)


def test_token_choice_capacity_rounding_to_zero_drops_everything():
    # S = 2, K = 1, E = 4: 2 / 4 = 0.5 -> round -> 0, min_capacity 0, multiple 1: C = 0.
    out = tc_case(np.ones((2, 4)), [1.0] * 4, top_k=1, capacity_factor=1.0,
                  capacity_rounding="round", min_capacity=0, capacity_multiple_of=1)
    assert out["plan/slot_token"].shape == (1, 4, 0)
    assert np.all(out["y"] == 0)
    assert int(out["stats/dropped"]) == 2 and int(out["stats/unrouted"]) == 2


def test_aux_losses_at_perfect_balance():
    # Two tokens, two experts, logits [ln3, 0] and [0, ln3]: gates [3/4, 1/4] and [1/4, 3/4].
    # top-1 fractions f = [1/2, 1/2], mean gates p = [1/2, 1/2]: 2 * (1/4 + 1/4) = 1.
    # importance I = [1, 1]: std 0 -> 0.  z: logsumexp([ln3, 0]) = ln 4 for both tokens.
    out = tc_case([[L3, 0], [0, L3]], [1.0, 1.0], top_k=1, z_loss_coef=1e-3,
                  importance_coef=5e-3)
    np.testing.assert_allclose(out["aux/load_balance"], 1.0, **TIGHT)
    np.testing.assert_allclose(out["aux/importance"], 0.0, atol=1e-15)
    np.testing.assert_allclose(out["aux/z_loss"], L4**2, **TIGHT)
    assert float(out["aux/load"]) == 0.0  # no additive noise
    np.testing.assert_allclose(out["aux/total"], 0.01 * 1 + 1e-3 * L4**2, **TIGHT)
    assert out["aux/total"].shape == () and out["aux/total"].dtype == np.float64


def test_mixtral_all_k_load_balance_is_k_at_balance():
    # K = 2 of E = 2: f_1 = f_2 = [1/2, 1/2], p = [1/2, 1/2]: 2 * 2 * (1/4 + 1/4) = 2 = K.
    out = tc_case([[L3, 0], [0, L3]], [1.0, 1.0], top_k=2, load_balance_counting="all_k")
    np.testing.assert_allclose(out["aux/load_balance"], 2.0, **TIGHT)


def test_aux_losses_when_unbalanced():
    # Both tokens [3/4, 1/4]: f = [1, 0], p = [3/4, 1/4]: 2 * 3/4 = 1.5.
    # I = [3/2, 1/2]: mean 1, population variance 1/4 -> (std/mean)^2 = 1/4.
    out = tc_case([[L3, 0], [L3, 0]], [1.0, 1.0], top_k=1)
    np.testing.assert_allclose(out["aux/load_balance"], 1.5, **TIGHT)
    np.testing.assert_allclose(out["aux/importance"], 0.25, **TIGHT)


def test_z_loss_is_the_mean_squared_logsumexp():
    # logsumexp([ln3, 0]) = ln 4 = 2 ln 2; logsumexp([0, 0]) = ln 2: mean (4 + 1)/2 (ln 2)^2.
    out = tc_case([[L3, 0], [0, 0]], [1.0, 1.0], top_k=1)
    np.testing.assert_allclose(out["aux/z_loss"], 2.5 * L2**2, **TIGHT)


def test_aux_losses_are_per_group_then_averaged():
    # group="sequence" with B = 2: row 0 balanced (lb 1), row 1 unbalanced (lb 1.5): mean 1.25.
    x = np.asarray([[[L3, 0], [0, L3]], [[L3, 0], [L3, 0]]])
    out = tc_case(x, [1.0, 1.0], top_k=1)
    np.testing.assert_allclose(out["aux/load_balance"], 1.25, **TIGHT)
    np.testing.assert_allclose(out["aux/importance"], 0.125, **TIGHT)  # (0 + 1/4) / 2


def test_load_loss_and_total_by_hand():
    # One token, E = 2, K = 1, sigma = 1 / 2, clean logits [1, 0], noise [0, 1]: noisy logits
    # [1, 1/2]; the threshold is the top noisy logit, 1. With the clean logits:
    # p0 = 1 - Phi(0) = 1/2, p1 = 1 - Phi((1 - 0) / (1/2)) = 1 - Phi(2) = erfc(sqrt 2) / 2 = q.
    # (std/mean)^2 of [1/2, q] = ((1/2 - q) / (1/2 + q))^2.
    expert, params = scaled_identity_experts(2, [1.0, 1.0])
    params["router_w"] = np.eye(2)
    spec = TokenChoice(num_experts=2, top_k=1, noise="additive", load_coef=0.5,
                       z_loss_coef=1e-3, importance_coef=5e-3)
    out = oracle.token_choice(spec, [[1.0, 0.0]], params, expert, mode="train",
                              noise=np.asarray([[[0.0, 1.0]]]))
    q = 0.5 * math.erfc(math.sqrt(2))
    load = ((0.5 - q) / (0.5 + q)) ** 2
    np.testing.assert_allclose(out["aux/load"], load, **TIGHT)
    # Load balance on the noisy gates: f = [1, 0], p0 = 1 / (1 + e^-1/2): 2 p0.
    lb = 2 / (1 + math.exp(-0.5))
    z = math.log(1 + math.e) ** 2  # clean logsumexp([1, 0])
    imp = ((math.e - 1) / (math.e + 1)) ** 2  # one token: I = clean gates [e, 1] / (e + 1)
    np.testing.assert_allclose([out["aux/load_balance"], out["aux/z_loss"],
                                out["aux/importance"]], [lb, z, imp], **TIGHT)
    np.testing.assert_allclose(out["aux/total"], 0.01 * lb + 1e-3 * z + 5e-3 * imp + 0.5 * load,
                               **TIGHT)


# Expert choice: two experts, router_w = I, logits = x, gates = softmax over the two:
#   t0 [ln3, 0] -> [3/4, 1/4]   t1 [0, ln3] -> [1/4, 3/4]   t2 [ln3, 0] -> [3/4, 1/4]
#   t3 [0, 0]   -> [1/2, 1/2]   t4 [0, ln4] -> [1/5, 4/5]
EC_X = [[L3, 0], [0, L3], [L3, 0], [0, 0], [0, L4]]


def ec_case(spec, mode="eval", x=EC_X):
    expert, params = scaled_identity_experts(2, [1.0, 2.0])
    # Predictor 2 -> 2 -> 2: relu(x @ I) @ I - 1/2 = x - 1/2 (x >= 0 here).
    params.update(router_w=np.eye(2), predictor_w1=np.eye(2), predictor_b1=np.zeros(2),
                  predictor_w2=np.eye(2), predictor_b2=np.full(2, -0.5))
    return oracle.expert_choice(spec, np.asarray(x), params, expert, mode=mode)


def test_expert_choice_slots_by_gate_ties_to_lower_token_and_one_token_unpicked():
    spec = ExpertChoice(num_experts=2, capacity="fixed", expert_capacity=2,
                        predictor=Predictor(hidden=2))
    out = ec_case(spec)
    # e0 gates [.75, .25, .75, .5, .2]: t0 and t2 tie at .75 -> t0 first.
    # e1 gates [.25, .75, .25, .5, .8]: t4 (.8) then t1 (.75). t3 is picked by nobody.
    assert out["plan/slot_token"].tolist() == [[[0, 2], [4, 1]]]
    np.testing.assert_allclose(out["plan/slot_weight"], [[[.75, .75], [.8, .75]]], **TIGHT)
    x = np.asarray(EC_X)
    np.testing.assert_allclose(out["y"][0], [.75 * x[0], .75 * 2 * x[1], .75 * x[2], 0 * x[3],
                                             .8 * 2 * x[4]], **TIGHT)
    assert int(out["stats/unrouted"]) == 1
    assert out["stats/experts_per_token"].tolist() == [[1, 1, 1, 0, 1]]
    assert out["stats/load"].tolist() == [[2, 2]]
    targets = [[1, 0], [0, 1], [1, 0], [0, 0], [0, 1]]
    assert out["predictor/targets"][0].tolist() == targets
    # Predictor logits x - 1/2; BCE(z, t) = log(1 + e^z) - z t, mean over 5 tokens x 2 experts.
    z = np.asarray(EC_X) - 0.5
    np.testing.assert_allclose(out["predictor/logits"][0], z, **TIGHT)
    bce = [math.log1p(math.exp(z[s, e])) - z[s, e] * targets[s][e]
           for s in range(5) for e in range(2)]
    np.testing.assert_allclose(out["aux/predictor"], sum(bce) / 10, **TIGHT)
    np.testing.assert_allclose(out["aux/total"], sum(bce) / 10, **TIGHT)  # loss_coef 1


def test_expert_choice_tie_at_the_capacity_boundary_keeps_the_lower_token():
    spec = ExpertChoice(num_experts=2, capacity="fixed", expert_capacity=1, predictor=None,
                        causal="router", router_bce_coef=1.0)
    out = ec_case(spec)
    assert out["plan/slot_token"].tolist() == [[[0], [4]]]  # t0 beats t2 at .75
    assert "predictor/targets" not in out and float(out["aux/predictor"]) == 0.0


def test_expert_choice_causal_mode_decides_each_token_alone_in_time_order():
    pred = ExpertChoice(num_experts=2, capacity="fixed", expert_capacity=2,
                        predictor=Predictor(hidden=2))
    router = ExpertChoice(num_experts=2, capacity="fixed", expert_capacity=2, predictor=None,
                          causal="router", router_bce_coef=1.0)
    # Predictor: chosen by e iff x[e] - 1/2 > 0; router: iff x[e] > 0. Both pick e0: t0, t2 and
    # e1: t1, t4, listed in time order (train order was t4, t1), C = S = 5, padded with -1.
    for spec in (pred, router):
        out = ec_case(spec, mode="causal")
        assert out["plan/slot_token"].tolist() == [[[0, 2, -1, -1, -1], [1, 4, -1, -1, -1]]]
        np.testing.assert_allclose(out["plan/slot_weight"],
                                   [[[.75, .75, 0, 0, 0], [.75, .8, 0, 0, 0]]], **TIGHT)


def test_expert_choice_router_bce_by_hand():
    spec = ExpertChoice(num_experts=2, capacity="fixed", expert_capacity=2, predictor=None,
                        causal="router", router_bce_coef=0.5)
    out = ec_case(spec)
    targets = [[1, 0], [0, 1], [1, 0], [0, 0], [0, 1]]
    z = np.asarray(EC_X)
    bce = [math.log1p(math.exp(z[s, e])) - z[s, e] * targets[s][e]
           for s in range(5) for e in range(2)]
    np.testing.assert_allclose(out["aux/router_bce"], sum(bce) / 10, **TIGHT)
    np.testing.assert_allclose(out["aux/total"], 0.5 * sum(bce) / 10, **TIGHT)


def test_predictor_sees_only_x_predictor():
    spec = ExpertChoice(num_experts=2, capacity="fixed", expert_capacity=2,
                        predictor=Predictor(hidden=2))
    expert, params = scaled_identity_experts(2, [1.0, 2.0])
    params.update(router_w=np.eye(2), predictor_w1=np.eye(2), predictor_b1=np.zeros(2),
                  predictor_w2=np.eye(2), predictor_b2=np.full(2, -0.5))
    held = np.asarray(EC_X)
    a = oracle.expert_choice(spec, held, params, expert, x_predictor=held)
    b = oracle.expert_choice(spec, held + 0.01, params, expert, x_predictor=held)
    assert np.array_equal(a["predictor/logits"], b["predictor/logits"])
    assert float(a["aux/predictor"]) == float(b["aux/predictor"])  # same targets here


# Soft MoE with two slots (E = 2, P = 1) and orthogonal tokens.
def soft_case(spec, x, mu, scales=(1.0, 2.0), scale=1.0, mode="eval", noise=None):
    x = np.asarray(x, float)
    expert, params = scaled_identity_experts(x.shape[-1], list(scales))
    params.update(slot_mu=np.asarray(mu, float), slot_scale=np.asarray(scale))
    return oracle.soft_moe(spec, x, params, expert, mode=mode, noise=noise)


def test_soft_moe_two_slots_by_hand():
    spec = SoftMoE(num_experts=2, normalize_input=False, normalize_slots=False, scale="none")
    mu = np.eye(2)[:, :, None]  # slot 0 = [1, 0], slot 1 = [0, 1]
    out = soft_case(spec, [[L3, 0], [0, L3]], mu)
    # logits[token, slot] = [[ln3, 0], [0, ln3]].
    # dispatch (softmax over tokens, per slot): slot0 [3/4, 1/4], slot1 [1/4, 3/4].
    # combine (softmax over slots, per token): t0 [3/4, 1/4], t1 [1/4, 3/4].
    np.testing.assert_allclose(out["plan/dispatch"], [[[.75, .25], [.25, .75]]], **TIGHT)
    np.testing.assert_allclose(out["plan/combine"], [[[.75, .25], [.25, .75]]], **TIGHT)
    # slot0 = ln3 [3/4, 1/4] -> e0 (x1); slot1 = ln3 [1/4, 3/4] -> e1 (x2) = ln3 [1/2, 3/2].
    # y0 = 3/4 o0 + 1/4 o1 = ln3 [11/16, 9/16]; y1 = 1/4 o0 + 3/4 o1 = ln3 [9/16, 19/16].
    np.testing.assert_allclose(out["y"][0], L3 * np.asarray([[11, 9], [9, 19]]) / 16, **TIGHT)
    assert float(out["aux/total"]) == 0.0


def test_soft_moe_normalises_with_eps_and_scales():
    spec = SoftMoE(num_experts=2)  # normalise both, scale "smaller": sizes equal (4) -> mu side
    mu = np.eye(2)[:, :, None]
    out = soft_case(spec, [[3.0, 0.0], [0.0, 4.0]], mu, scale=2.0)
    a = 3 / math.sqrt(9 + 1e-6) * 2 / math.sqrt(1 + 1e-6)  # logit of t0 with slot 0
    b = 4 / math.sqrt(16 + 1e-6) * 2 / math.sqrt(1 + 1e-6)  # logit of t1 with slot 1
    ea, eb = math.exp(a), math.exp(b)
    np.testing.assert_allclose(out["plan/dispatch"][0], [[ea / (ea + 1), 1 / (ea + 1)],
                                                         [1 / (eb + 1), eb / (eb + 1)]], **TIGHT)
    np.testing.assert_allclose(out["plan/combine"][0], [[ea / (ea + 1), 1 / (ea + 1)],
                                                        [1 / (eb + 1), eb / (eb + 1)]], **TIGHT)
    # A zero token stays zero after normalisation (eps inside the rsqrt): uniform combine.
    zero = soft_case(spec, [[0.0, 0.0], [1.0, 0.0]], mu, scale=2.0)
    np.testing.assert_allclose(zero["plan/combine"][0, 0], [.5, .5], **TIGHT)


def test_soft_moe_noise_adds_noise_std_times_noise_in_train_only():
    spec = SoftMoE(num_experts=2, normalize_input=False, normalize_slots=False, scale="none",
                   noise_std=0.5)
    mu = np.eye(2)[:, :, None]
    noise = np.asarray([[[[2 * L3], [0.0]], [[0.0], [0.0]]]])  # 0.5 * 2 ln3 = ln3 on t0, slot 0
    train = soft_case(spec, [[0.0, 0.0], [0.0, 0.0]], mu, mode="train", noise=noise)
    np.testing.assert_allclose(train["plan/combine"][0, 0], [.75, .25], **TIGHT)
    evaluate = soft_case(spec, [[0.0, 0.0], [0.0, 0.0]], mu, mode="eval")
    np.testing.assert_allclose(evaluate["plan/combine"][0, 0], [.5, .5], **TIGHT)


def test_soft_moe_bfloat16_rounds_to_nearest_even():
    spec = SoftMoE(num_experts=1, round_bf16=True)
    mu = np.ones((1, 1, 1))
    # One token, one slot: dispatch = combine = 1 exactly, the expert is the identity.
    # bfloat16 keeps 7 mantissa bits: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1 (even);
    # 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6 -> 1 + 2^-6 (even).
    for value, rounded in [(1 + 2**-8, 1.0), (1 + 3 * 2**-8, 1 + 2**-6), (1 + 2**-7, 1 + 2**-7)]:
        out = soft_case(spec, [[value]], mu, scales=(1.0,))
        assert float(out["y"][0, 0, 0]) == rounded
        exact = soft_case(SoftMoE(num_experts=1), [[value]], mu, scales=(1.0,))
        assert float(exact["y"][0, 0, 0]) == value


# Mixture-of-Depths.
def mod_params(D, H, router_w, wq=None, wk=None, wv=None, wo=None, w1=None, w2=None):
    rng = np.random.default_rng(0)
    rand = lambda *s: rng.normal(size=s)  # noqa: E731
    return {"router_w": np.asarray(router_w, float), "block_norm1": np.ones(D),
            "block_norm2": np.ones(D), "block_wq": rand(D, D) if wq is None else wq,
            "block_wk": rand(D, D) if wk is None else wk,
            "block_wv": rand(D, D) if wv is None else wv,
            "block_wo": rand(D, D) if wo is None else wo,
            "block_w1": rand(D, H) if w1 is None else w1,
            "block_w2": rand(H, D) if w2 is None else w2,
            "predictor_w1": np.zeros((D, 2)), "predictor_b1": np.zeros(2),
            "predictor_w2": np.zeros((2, 1)), "predictor_b2": np.zeros(1)}


BLOCK = {"heads": 2, "rope_base": 10000.0, "norm_eps": 1e-6, "mlp": ExpertMLP(hidden=8)}


def test_mod_routes_top_k_in_time_order_and_leaves_the_rest_unchanged():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 4))
    x[:, 0] = [0.3, 0.5, -0.2, 0.3, 0.3, 0.0]  # r = x . [1, 0, 0, 0]
    params = mod_params(4, 8, [1.0, 0, 0, 0])
    spec = MixtureOfDepths(capacity=0.5, predictor=Predictor(hidden=2))
    out = oracle.mixture_of_depths(spec, x, params, BLOCK)
    # k = floor(0.5 * 6) = 3: t1 (.5), then the tie at .3 among t0, t3, t4 keeps t0 and t3.
    assert out["plan/slot_token"].tolist() == [[[0, 1, 3]]]  # time order, not score order
    np.testing.assert_allclose(out["plan/slot_weight"], [[[0.3, 0.5, 0.3]]], **TIGHT)
    for t in (2, 4, 5):
        assert np.array_equal(out["y"][0, t], x[t])  # unchosen: exactly x
    assert out["predictor/targets"][0, :, 0].tolist() == [1, 1, 0, 1, 0, 0]
    # Predictor logits are 0: BCE = ln 2 for every token.
    np.testing.assert_allclose(out["aux/predictor"], L2, **TIGHT)
    assert out["stats/load"].tolist() == [[3]] and int(out["stats/unrouted"]) == 3
    # Deleting the unchosen tokens: f computed on the chosen ones alone, at their positions.
    f = oracle.block_branch(BLOCK, params, x[[0, 1, 3]], [0, 1, 3])
    np.testing.assert_allclose(out["y"][0, [0, 1, 3]],
                               x[[0, 1, 3]] + np.asarray([.3, .5, .3])[:, None] * f, **TIGHT)
    other = x.copy()
    other[[2, 4, 5], 1:] = rng.normal(size=(3, 3))  # change the unchosen tokens (r unchanged)
    again = oracle.mixture_of_depths(spec, other, params, BLOCK)
    np.testing.assert_allclose(again["y"][0, [0, 1, 3]], out["y"][0, [0, 1, 3]], **TIGHT)


def test_mod_block_attends_among_chosen_tokens_at_true_positions_by_hand():
    # D = 4, one head (Dh = 4, RoPE pairs dims (0, 2) and (1, 3), angle pos * 1 on pair 0),
    # norm_eps = 0, wq = e0 e0^T, wk = e0 e2^T (k on q's partner dimension, so the sign of the
    # rotation shows), wv = diag(0, 0, 1, 1), wo = I, mlp output 0 (w2 = 0).
    D = 4
    wq, wk = np.zeros((D, D)), np.zeros((D, D))
    wq[0, 0] = wk[0, 2] = 1
    params = mod_params(D, 4, [0, 0, 1.0, 1.0], wq=wq, wk=wk, wv=np.diag([0, 0, 1.0, 1.0]),
                        wo=np.eye(D), w1=np.eye(D), w2=np.zeros((D, D)))
    block = {"heads": 1, "rope_base": 10000.0, "norm_eps": 0.0, "mlp": ExpertMLP(hidden=4)}
    x = np.asarray([[5.0, 0, -1, 0.5],  # r = -0.5
                    [1.0, 0, 1, 0],  # A at position 1, r = 1
                    [0.0, 7, 0.2, 0.3],  # r = 0.5
                    [1.0, 0, 0, 1]])  # B at position 3, r = 1
    out = oracle.mixture_of_depths(MixtureOfDepths(capacity=0.5), x, params, block)
    assert out["plan/slot_token"].tolist() == [[[1, 3]]]  # k = 2
    # rms(A) = A / sqrt(1/2) = sqrt2 A: q_A = [sqrt2, 0, 0, 0], k_A = [0, 0, sqrt2, 0],
    # v_A = [0, 0, sqrt2, 0]; likewise for B with v_B = [0, 0, 0, sqrt2].
    # Rotate-half RoPE, [x1 cos - x2 sin, x2 cos + x1 sin]: at position p
    # q = sqrt2 [cos p, 0, sin p, 0] and k = sqrt2 [-sin p, 0, cos p, 0], so
    # q(p) . k(p') = 2 sin(p - p').
    # Query A (pos 1) sees only itself (B is later): f_A = v_A.
    # Query B (pos 3): score to A = 2 sin(3 - 1) / sqrt(4) = sin 2, to itself sin 0 = 0.
    w_a = math.exp(math.sin(2)) / (math.exp(math.sin(2)) + 1)
    s2 = math.sqrt(2)
    np.testing.assert_allclose(out["y"][0], [x[0], [1, 0, 1 + s2, 0], x[2],
                                             [1, 0, s2 * w_a, 1 + s2 * (1 - w_a)]], **TIGHT)
    sig = oracle.mixture_of_depths(MixtureOfDepths(capacity=0.5, weight="sigmoid"), x, params,
                                   block)
    g = 1 / (1 + math.exp(-1))  # sigmoid(r = 1)
    np.testing.assert_allclose(sig["y"][0, 1], [1, 0, 1 + g * s2, 0], **TIGHT)


def test_mod_block_single_token_by_hand():
    # h = [2, 2, 2, 2], eps 0: rms = 1 -> u = [1, 1, 1, 1]; wv = wo = I -> a = u (attention over
    # itself has weight 1); h + a = [3, 3, 3, 3] -> rms 1 -> relu(1 @ I) @ I = 1: f = 2.
    D = 4
    params = mod_params(D, 4, np.zeros(D), wv=np.eye(D), wo=np.eye(D), w1=np.eye(D),
                        w2=np.eye(D))
    block = {"heads": 2, "rope_base": 10.0, "norm_eps": 0.0, "mlp": ExpertMLP(hidden=4)}
    f = oracle.block_branch(block, params, np.full((1, D), 2.0), [5])
    np.testing.assert_allclose(f, np.full((1, D), 2.0), **TIGHT)


def test_mod_causal_mode_routes_by_router_sign_in_time_order():
    x = np.zeros((5, 4))
    x[:, 0] = [0.5, -1.0, 0.0, 2.0, 0.1]
    params = mod_params(4, 8, [1.0, 0, 0, 0])
    spec = MixtureOfDepths(capacity=0.2, causal="router", router_bce_coef=0.1, predictor=None)
    out = oracle.mixture_of_depths(spec, x, params, BLOCK, mode="causal")
    assert out["plan/slot_token"].tolist() == [[[0, 3, 4, -1, -1]]]  # r > 0, C = T = 5
    np.testing.assert_allclose(out["plan/slot_weight"], [[[0.5, 2.0, 0.1, 0, 0]]], **TIGHT)
    # Targets from the top-k plan (k = floor(0.2 * 5) = 1: t3); router BCE on r.
    r, t = x[:, 0], [0, 0, 0, 1, 0]
    bce = sum(math.log1p(math.exp(r[i])) - r[i] * t[i] for i in range(5)) / 5
    np.testing.assert_allclose(out["aux/router_bce"], bce, **TIGHT)
    np.testing.assert_allclose(out["aux/total"], 0.1 * bce, **TIGHT)


@pytest.mark.parametrize("call, match", [
    (lambda: tc_case(np.zeros(3), [1.0], top_k=1), r"x\.shape = \(3,\)"),
    (lambda: tc_case(np.zeros((1, 1, 2, 2)), [1.0], top_k=1), r"x\.shape = \(1, 1, 2, 2\)"),
    (lambda: tc_case([[np.nan, 0.0]], [1.0, 1.0]), "x contains NaN"),
    (lambda: tc_case([[1e200, 0.0]], [1.0, 1.0], router_w_scale=1e200), "router logits"),
    (lambda: tc_case(np.zeros((6, 2)), [1.0, 1.0], group="fixed", group_size=4),
     r"group_size = 4 does not divide B\*T = 6"),
    (lambda: tc_case(np.zeros((2, 2)), [1.0, 1.0], mode="causal"), "mode = 'causal'"),
])
@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_bad_token_choice_inputs_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_params_and_modes_raise_value_error_naming_them():
    expert, params = scaled_identity_experts(3, [1.0, 1.0])
    params["router_w"] = np.zeros((2, 3))  # [E, D] instead of [D, E]
    with pytest.raises(ValueError, match=r"router_w.*\(2, 3\).*expected \(3, 2\)"):
        oracle.token_choice(TokenChoice(num_experts=2), np.zeros((4, 3)), params, expert)
    del params["router_w"]
    with pytest.raises(ValueError, match="router_w.*missing"):
        oracle.token_choice(TokenChoice(num_experts=2), np.zeros((4, 3)), params, expert)
    with pytest.raises(ValueError, match=r"expert_w1.*expected \(2, 4, 3\)"):
        oracle.token_choice(TokenChoice(num_experts=2), np.zeros((4, 4)), params, expert)
    with pytest.raises(ValueError, match="mode = 'causal'"):
        soft_case(SoftMoE(num_experts=2), np.zeros((2, 2)), np.eye(2)[:, :, None], mode="causal")
    spec = ExpertChoice(num_experts=2, predictor=Predictor(hidden=2))
    with pytest.raises(ValueError, match="mode = 'sample'"):
        ec_case(spec, mode="sample")
    expert, params = scaled_identity_experts(2, [1.0, 1.0])
    with pytest.raises(ValueError, match=r"x_predictor.shape = \(1, 4, 2\)"):
        oracle.expert_choice(spec, np.ones((5, 2)), {**params, "router_w": np.eye(2)}, expert,
                             x_predictor=np.ones((4, 2)))


def test_missing_or_misshapen_noise_raises_value_error():
    expert, params = scaled_identity_experts(2, [1.0, 1.0])
    params["router_w"] = np.eye(2)
    spec = TokenChoice(num_experts=2, noise="additive")
    with pytest.raises(ValueError, match=r"noise.*\(1, 3, 2\)"):
        oracle.token_choice(spec, np.ones((3, 2)), params, expert, mode="train")
    with pytest.raises(ValueError, match=r"noise\.shape = \(3, 3\)"):
        oracle.token_choice(spec, np.ones((3, 2)), params, expert, mode="train",
                            noise=np.ones((3, 3)))
    # eval needs no noise; a [T, E] noise is accepted for a [T, D] x.
    oracle.token_choice(spec, np.ones((3, 2)), params, expert, mode="eval")
    oracle.token_choice(spec, np.ones((3, 2)), params, expert, mode="train", noise=np.ones((3, 2)))


def test_bad_mod_block_raises_value_error():
    params = mod_params(4, 8, np.zeros(4))
    with pytest.raises(ValueError, match="heads = 3"):
        oracle.mixture_of_depths(MixtureOfDepths(), np.ones((4, 4)), params,
                                 dict(BLOCK, heads=3))
    with pytest.raises(ValueError, match="block_w1.*expected \\(4, 8\\)"):
        oracle.mixture_of_depths(MixtureOfDepths(), np.ones((4, 4)),
                                 dict(params, block_w1=np.ones((4, 2))), BLOCK)
    with pytest.raises(ValueError, match="mode = 'causal!'"):
        oracle.mixture_of_depths(MixtureOfDepths(), np.ones((4, 4)), params, BLOCK,
                                 mode="causal!")


def test_ties_among_many_tokens_go_to_the_lower_index():
    # 40 tokens alternating [ln3, 0] (gates 3/4, 1/4) and [0, 0] (gates 1/2, 1/2). Introsort
    # is stable only for short arrays; with 40 interleaved ties it is not.
    x = np.asarray([[L3, 0.0], [0.0, 0.0]] * 20)
    evens, odds = list(range(0, 40, 2)), list(range(1, 40, 2))
    expert, params = scaled_identity_experts(2, [1.0, 1.0])
    params["router_w"] = np.eye(2)
    # EC, C = 40 * 1 / 2 = 20: e0 takes the 20 tokens at 3/4, e1 the 20 at 1/2, in index order.
    spec = ExpertChoice(num_experts=2, capacity_factor=1.0, predictor=None, causal="router",
                        router_bce_coef=1.0)
    out = oracle.expert_choice(spec, x, params, expert)
    assert out["plan/slot_token"].tolist() == [[evens, odds]]
    # Causal (router logit > 0): e0 takes every [ln3, 0] token, in time order; e1 none.
    causal = oracle.expert_choice(spec, x, params, expert, mode="causal")
    assert causal["plan/slot_token"].tolist() == [[evens + [-1] * 20, [-1] * 40]]
    # BPR: the 3/4 tokens first (stable: index order) fill e0's 20 slots; the 1/2 tokens tie
    # between experts, pick e0 (lower index) and all drop.
    tc = oracle.token_choice(TokenChoice(num_experts=2, top_k=1, drop_priority="score",
                                         capacity_factor=1.0, capacity_multiple_of=1),
                             x, params, expert)
    assert tc["plan/slot_token"].tolist() == [[evens, [-1] * 20]]
    assert int(tc["stats/dropped"]) == 20
    # MoD, k = 10 of r alternating 1, 0: the ten lowest-index tokens with r = 1.
    r_x = np.zeros((40, 4))
    r_x[::2, 0] = 1.0
    mod = oracle.mixture_of_depths(MixtureOfDepths(capacity=0.25), r_x,
                                   mod_params(4, 8, [1.0, 0, 0, 0]), BLOCK)
    assert mod["plan/slot_token"].tolist() == [[evens[:10]]]
