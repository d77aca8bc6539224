"""The shipped corpus: every scheme, every knob value, and the edges (ties, capacity below
demand, half-way rounding, capacity 0, uneven groups, one expert, K = E, extreme logits,
batch groups, zero and tiny tokens). Each entry: a name built from spec field words, a seed,
a one-line why. Run `python -m moe_min.conformance.generate` after editing.
"""

from __future__ import annotations

import numpy as np

from moe_min.conformance.generate import build
from moe_min.spec import (ExpertChoice, ExpertMLP, MixtureOfDepths, Predictor, SoftMoE,
                          TokenChoice)


def _tc(**kw):
    return TokenChoice(**{"num_experts": 3, "top_k": 2, "capacity_multiple_of": 1, **kw})


def _ec(**kw):
    return ExpertChoice(**{"num_experts": 3, "group": "sequence", **kw})


def _dup_tokens(rng, x, params):  # tokens 1 and 4 identical: equal gates everywhere
    x[:, 4] = x[:, 1]


def _tie_experts(rng, x, params):  # experts 0 and 2 score every token the same
    params["router_w"][:, 2] = params["router_w"][:, 0]


def _dup_best_token(rng, x, params):  # the highest top-1 gate twice: a BPR tie at the front
    logits = x[0] @ params["router_w"]
    gates = np.exp(logits - logits.max(-1, keepdims=True))
    best = int(np.argmax((gates / gates.sum(-1, keepdims=True)).max(-1)))
    x[:, (best + 3) % x.shape[1]] = x[:, best]


def _tie_at_the_cut(rng, x, params):  # MoD, k = 3: the 3rd and 4th router scores are equal
    order = np.argsort(-(x[0] @ params["router_w"]), kind="stable")
    x[:, order[3]] = x[:, order[2]]


def _zero_and_tiny(rng, x, params):
    x[:, 0] = 0.0
    x[:, 3] *= 1e-4


def _negative_logits(rng, x, params):  # every logit near -60: a naive exp underflows
    x[:] = np.abs(x) + 1.0
    params["router_w"][:] = -np.abs(params["router_w"]) * 8 - 4.0


def token_choice_cases():
    yield build("k1_fixed2_drop-position", _tc(top_k=1, capacity="fixed", expert_capacity=2),
                seed=1, why="Switch/HF: top-1, explicit capacity below demand, drop by position")
    yield build("k2_cf1_ceil_mult4", TokenChoice(num_experts=3, capacity_factor=1.0), T=8, seed=2,
                why="vmoe defaults: ceil, multiple_of 4")
    yield build("k2_round_half-even_2.5", _tc(capacity_rounding="round", capacity_factor=0.625),
                seed=3, why="S*K*cf/E = 6*2*0.625/3 = 2.5 rounds half-to-even to 2")
    yield build("k2_round_half-even_3.5", _tc(capacity_rounding="round", capacity_factor=0.875),
                seed=4, why="6*2*0.875/3 = 3.5 rounds half-to-even to 4")
    yield build("k2_cf0.5_drop-score", _tc(capacity_factor=0.5, drop_priority="score"), T=8,
                seed=5, why="BPR: stable sort by descending top-1 gate decides who drops")
    yield build("k2_cf0.5_drop-position", _tc(capacity_factor=0.5), T=8, seed=5,
                why="same inputs as drop-score, position priority: a different set drops")
    yield build("k2_dropless_renormalize", _tc(capacity="dropless", renormalize=True), T=8,
                seed=6, why="Mixtral: dropless, top-2 weights renormalised")
    yield build("k2_renormalize_drop", _tc(capacity_factor=0.75, renormalize=True), seed=7,
                why="renormalise before capacity: a dropped choice keeps its partner's weight")
    yield build("k2_sigmoid", _tc(gate="sigmoid"), seed=8, why="independent sigmoid gates")
    yield build("k2_noise-additive_train", _tc(noise="additive", load_coef=0.5,
                importance_coef=0.3), mode="train", seed=9,
                why="V-MoE: noisy gates route, clean gates give importance; the load loss")
    yield build("k2_noise-additive_eval", _tc(noise="additive", load_coef=0.5), seed=9,
                why="evaluation ignores the noise knob")
    yield build("k1_noise-jitter_train", _tc(top_k=1, noise="jitter", jitter_eps=0.2),
                mode="train", seed=10, why="Switch input jitter on the router input only")
    yield build("k2_aux_all-k_zloss", _tc(load_balance_counting="all_k", z_loss_coef=0.1,
                load_balance_coef=0.5, importance_coef=0.2), seed=11,
                why="Mixtral's K-counting balance loss, z-loss and importance with gradients")
    yield build("k2_ties_experts", _tc(capacity_factor=0.75), inputs=_tie_experts, ties=True,
                seed=12, why="tied experts: the lower expert index wins the top-k")
    yield build("k1_ties_tokens_drop-score", _tc(top_k=1, capacity="fixed", expert_capacity=1,
                drop_priority="score"), inputs=_dup_tokens, ties=True, seed=13,
                why="duplicated tokens under BPR: the stable sort keeps position order")
    yield build("k2_ties_tokens_drop-position", _tc(capacity_factor=0.5), inputs=_dup_tokens,
                ties=True, seed=14, why="duplicated tokens, position priority")
    yield build("k2_capacity0_all-drop", _tc(capacity_factor=0.1, capacity_rounding="round",
                min_capacity=0), seed=15,
                why="round(0.4) = 0 slots with min_capacity 0: every choice drops, y = 0")
    yield build("k2_min-capacity", _tc(capacity_factor=0.1, capacity_rounding="round",
                min_capacity=1), seed=15,
                why="the same rounding clamped to one slot per expert")
    yield build("k2_uneven_T7_E3", _tc(capacity_factor=1.0), T=7, seed=16,
                why="tokens not divisible by experts: 7*2/3 -> ceil 5")
    yield build("k1_one-expert", _tc(num_experts=1, top_k=1, capacity_factor=0.5), seed=17,
                why="one expert: gate 1 for everyone, half the tokens drop")
    yield build("k3_equals_E", _tc(top_k=3, capacity_factor=1.0), seed=18,
                why="K = E: every token picks every expert")
    yield build("k1_huge-logits", _tc(top_k=1, capacity_factor=1.0), router_scale=80.0,
                grads=False, seed=19, why="saturated softmax: gates exactly 0/1 in float32")
    yield build("k2_negative-logits", _tc(), inputs=_negative_logits, seed=20,
                why="every logit far below 0: the softmax must subtract its max")
    yield build("k2_group-batch_B2", _tc(group="batch", capacity_factor=0.75), B=2, seed=21,
                why="one group over the whole batch: capacity from B*T")
    yield build("k2_group-sequence_B2", _tc(capacity_factor=0.75), B=2, seed=21,
                why="same inputs, per-sequence groups: different drops")
    yield build("k2_group-fixed4_B2", _tc(group="fixed", group_size=4, capacity_factor=0.75),
                B=2, seed=22, why="fixed groups of 4 tokens that cut across sequences")
    yield build("k2_fixed-capacity_above-S", _tc(capacity="fixed", expert_capacity=9), seed=23,
                why="explicit capacity above S: nothing drops")
    yield build("k2_glu", _tc(), expert=ExpertMLP(hidden=6, activation="silu", glu=True),
                seed=24, why="SwiGLU experts")
    for act in ("gelu", "gelu_tanh", "silu"):
        yield build(f"k2_act-{act}", _tc(), expert=ExpertMLP(hidden=6, activation=act),
                    seed=25, why=f"{act} experts")
    yield build("k2_no-noise_lb0_train", _tc(capacity_factor=0.75, load_balance_coef=0.0),
                mode="train", seed=26, why="training without noise routes as in evaluation; "
                "a zero coefficient leaves its term out of aux/total")
    yield build("k2_noise-additive-std2_train", _tc(noise="additive", noise_std=2.0),
                mode="train", seed=27, why="V-MoE noise at twice the default scale: sigma = 2/E")
    yield build("k2_noise-jitter_train", _tc(noise="jitter"), mode="train", seed=28,
                why="Switch's default jitter, eps 0.01: small, yet it moves the gates")
    yield build("k2_ties_experts_drop-score", _tc(capacity_factor=0.75, drop_priority="score"),
                inputs=_tie_experts, ties=True, seed=29,
                why="tied experts under BPR: the lower expert index still wins the top-k")
    yield build("k1_ties_best-tokens_drop-score", _tc(top_k=1, capacity="fixed",
                expert_capacity=1, drop_priority="score"), inputs=_dup_best_token, ties=True,
                seed=13, why="the two highest top-1 gates are equal and want the same single "
                "slot: the stable BPR sort gives it to the earlier token")


def expert_choice_cases():
    yield build("cf2_train", _ec(), mode="train", seed=30, why="EC-CF2 per sequence")
    yield build("cf1_batch_B2", _ec(capacity_factor=1.0, group="batch"), B=2, seed=31,
                why="the paper's batch-wide top-C")
    yield build("cf0.5_unrouted", _ec(capacity_factor=0.5), T=8, seed=32,
                why="small capacity: some tokens get no expert (residual only)")
    yield build("ties_tokens", _ec(capacity_factor=1.0), inputs=_dup_tokens, ties=True, seed=33,
                why="duplicated tokens: the lower token index takes the slot")
    yield build("causal_predictor", _ec(), mode="causal", seed=34,
                why="sampling: each token routed by the predictor alone")
    yield build("causal_router", _ec(causal="router", router_bce_coef=0.5, predictor=None),
                mode="causal", seed=35, why="sampling by router logits > 0 (BCE-trained)")
    yield build("router-bce_train", _ec(router_bce_coef=0.5), mode="train", seed=36,
                why="router BCE and predictor losses with their gradients")
    yield build("noise-additive_train", _ec(noise="additive", noise_std=2.0), mode="train",
                seed=37, why="vmoe-style noise on expert-choice logits")
    yield build("capacity-clamped-to-S", _ec(capacity_factor=6.0), seed=38,
                why="C = 6*6/3 = 12 > S = 6: every expert takes every token")
    yield build("fixed-capacity", _ec(capacity="fixed", expert_capacity=2), seed=39,
                why="explicit C")
    yield build("round_mult2", _ec(capacity_rounding="round", capacity_factor=1.25,
                capacity_multiple_of=2), seed=40, why="6*1.25/3 = 2.5 -> 2 (half-even), x2 -> 2")
    yield build("group-fixed4_B2", _ec(group="fixed", group_size=4), B=2, seed=41,
                why="fixed groups across sequences")
    yield build("predictor-silu-wide", _ec(predictor=Predictor(hidden=5, activation="silu",
                threshold=0.3, loss_coef=2.0)), mode="causal", seed=42,
                why="predictor width, activation, threshold and coefficient knobs")
    yield build("no-predictor_eval", _ec(predictor=None, causal="router", router_bce_coef=1.0),
                seed=43, why="an encoder-style EC layer without a predictor")
    yield build("one-expert", _ec(num_experts=1, capacity_factor=0.5), seed=44,
                why="one expert: every gate is exactly 1, so the top-C is the first C tokens")
    yield build("cf0.25_min-capacity2", _ec(capacity_factor=0.25, min_capacity=2), seed=45,
                why="ceil(6*0.25/3) = 1 slot, clamped up to min_capacity = 2")
    yield build("noise-additive_cf0.5_train", _ec(noise="additive", capacity_factor=0.5),
                mode="train", seed=46, why="default noise scale (sigma = 1/E) with C = 1: the "
                "noisy gates pick each expert's one token")
    yield build("round_half-even_3.5", _ec(capacity_rounding="round", capacity_factor=1.75),
                seed=47, why="6*1.75/3 = 3.5 rounds half-to-even up to 4")


def soft_moe_cases():
    soft = dict(num_experts=3)
    yield build("p1", SoftMoE(**soft), seed=50, why="one slot per expert (the paper's best)")
    yield build("p2_B2", SoftMoE(**soft, slots_per_expert=2), B=2, seed=51,
                why="two slots per expert, two sequences")
    yield build("factor1.5", SoftMoE(**soft, slots="factor", capacity_factor=1.5), seed=52,
                why="P = round(6*1.5/3) = 3")
    yield build("zero-and-tiny-tokens", SoftMoE(**soft), inputs=_zero_and_tiny, seed=53,
                why="eps inside the rsqrt: a zero token stays zero, a tiny one stays small")
    yield build("no-normalisation", SoftMoE(**soft, normalize_input=False, normalize_slots=False),
                seed=54, why="raw logits x . mu")
    for scale in ("input", "slots", "none"):
        yield build(f"scale-{scale}", SoftMoE(**soft, scale=scale), seed=55,
                    why="scale placement: input/slots equal, none drops the scalar")
    yield build("noise_train", SoftMoE(**soft, noise_std=0.5), mode="train", seed=56,
                why="additive N(0, noise_std) on the logits")
    yield build("bf16", SoftMoE(**soft, round_bf16=True), seed=57, grads=False,
                why="vmoe wrapper: data rounded to bfloat16 before each einsum (forward only: "
                "frameworks pass gradients straight through a rounding step, differences see 0)")
    yield build("group-batch_B2", SoftMoE(**soft, group="batch"), B=2, seed=58,
                why="slots mix tokens of both sequences")
    yield build("group-fixed3_B2", SoftMoE(**soft, group="fixed", group_size=3), B=2, seed=60,
                why="fixed groups of 3 tokens: slots never mix across a group")
    yield build("glu", SoftMoE(**soft), expert=ExpertMLP(hidden=6, activation="silu", glu=True),
                seed=59, why="SwiGLU experts")
    yield build("one-expert_train", SoftMoE(num_experts=1), mode="train", seed=61,
                why="one expert, one slot; training mode with noise_std 0 adds no noise")
    yield build("factor1_half-even_2.5", SoftMoE(num_experts=2, slots="factor"), T=5, seed=62,
                why="P = round(5*1.0/2) = round(2.5) = 2 (half-to-even)")
    yield build("factor1_half-even_3.5", SoftMoE(num_experts=2, slots="factor"), T=7, seed=63,
                why="P = round(7*1.0/2) = round(3.5) = 4 (half-to-even)")


def mixture_of_depths_cases():
    mlp = ExpertMLP(hidden=8)
    yield build("cap0.25_train", MixtureOfDepths(capacity=0.25), T=8, mode="train", seed=70,
                expert=mlp, why="k = 2 of 8, raw router weight, predictor loss")
    yield build("cap0.5_sigmoid_B2", MixtureOfDepths(capacity=0.5, weight="sigmoid"), B=2, T=6,
                seed=71, expert=mlp, why="sigmoid weight, per-sequence top-k in a batch")
    yield build("causal_predictor", MixtureOfDepths(capacity=0.5), T=8, mode="causal", seed=72,
                expert=mlp, why="sampling: the predictor decides, chosen tokens in time order")
    yield build("causal_router", MixtureOfDepths(capacity=0.5, causal="router",
                router_bce_coef=0.3, predictor=None), T=8, mode="causal", seed=73, expert=mlp,
                why="paper method 1: r > 0 means routed")
    yield build("ties", MixtureOfDepths(capacity=0.5), inputs=_dup_tokens, ties=True, T=6,
                seed=74, expert=mlp, why="equal router scores: the lower index is chosen")
    yield build("cap0.3_ceil", MixtureOfDepths(capacity=0.3, capacity_rounding="ceil"), T=6,
                seed=75, expert=mlp, why="k = ceil(1.8) = 2")
    yield build("cap0.3_round", MixtureOfDepths(capacity=0.3, capacity_rounding="round"), T=5,
                seed=76, expert=mlp, why="k = round(1.5) = 2 (half-even)")
    yield build("min-tokens", MixtureOfDepths(capacity=0.1, min_tokens=2), T=6, seed=77,
                expert=mlp, why="floor(0.6) = 0 clamped up to min_tokens = 2")
    yield build("gelu_heads1", MixtureOfDepths(capacity=0.5), T=6, heads=1, seed=78,
                expert=ExpertMLP(hidden=8, activation="gelu"), why="one head, exact GELU MLP")
    yield build("cap0.125_T8", MixtureOfDepths(), T=8, seed=79, expert=mlp,
                why="the defaults: k = floor(0.125*8) = 1 of 8, the paper's best capacity")
    yield build("cap0.3_floor", MixtureOfDepths(capacity=0.3, predictor=Predictor(
                activation="gelu")), T=6, seed=80, expert=mlp,
                why="k = floor(1.8) = 1; a GELU predictor")
    yield build("cap0.5_ceil_exact", MixtureOfDepths(capacity=0.5, capacity_rounding="ceil",
                predictor=Predictor(activation="gelu_tanh")), T=6, seed=81, expert=mlp,
                why="k = ceil(3.0) = 3: an exact product is not rounded up; a tanh-GELU predictor")
    yield build("cap0.5_round_2.5", MixtureOfDepths(capacity=0.5, capacity_rounding="round"),
                T=5, seed=82, expert=mlp, why="k = round(2.5) = 2 (half-to-even)")
    yield build("ties_at-the-cut", MixtureOfDepths(capacity=0.5), inputs=_tie_at_the_cut,
                ties=True, T=6, seed=83, expert=mlp,
                why="the 3rd and 4th router scores are equal and k = 3: the lower index is in")


def all_cases():
    for group in (token_choice_cases, expert_choice_cases, soft_moe_cases,
                  mixture_of_depths_cases):
        yield from group()
