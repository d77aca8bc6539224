"""moe_min/spec.py: exact JSON round trips, strict parsing, errors that name class, field,
value and range, and the capacity arithmetic on hand-computed values."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from moe_min.spec import (
    ExpertChoice,
    ExpertMLP,
    MixtureOfDepths,
    Predictor,
    SoftMoE,
    SpecError,
    TokenChoice,
    from_dict,
    from_json,
)

NON_DEFAULT = [
    TokenChoice(
        num_experts=4,
        top_k=1,
        gate="sigmoid",
        renormalize=True,
        capacity="fixed",
        capacity_factor=2.5,
        capacity_rounding="round",
        capacity_multiple_of=1,
        min_capacity=0,
        expert_capacity=3,
        group="fixed",
        group_size=16,
        drop_priority="score",
        noise="additive",
        noise_std=0.5,
        jitter_eps=0.2,
        load_balance_coef=0.0,
        load_balance_counting="all_k",
        z_loss_coef=1e-3,
        importance_coef=0.005,
        load_coef=0.005,
    ),
    TokenChoice(capacity="dropless", noise="jitter", renormalize=True),
    ExpertChoice(
        num_experts=2,
        capacity="fixed",
        capacity_factor=1.5,
        capacity_rounding="round",
        capacity_multiple_of=2,
        min_capacity=4,
        expert_capacity=6,
        group="sequence",
        noise="additive",
        noise_std=2.0,
        router_bce_coef=0.25,
        predictor=Predictor(hidden=7, activation="gelu_tanh", threshold=-0.5, loss_coef=0.3),
    ),
    ExpertChoice(causal="router", router_bce_coef=0.1, predictor=None),
    SoftMoE(
        num_experts=3,
        slots="factor",
        slots_per_expert=2,
        capacity_factor=0.5,
        normalize_input=False,
        normalize_slots=False,
        scale="input",
        noise_std=0.1,
        round_bf16=True,
        group="batch",
    ),
    MixtureOfDepths(
        capacity=0.5,
        capacity_rounding="round",
        min_tokens=0,
        every=3,
        first_routed=0,
        weight="sigmoid",
        causal="predictor",
        router_bce_coef=1.0,
        predictor=Predictor(hidden=3),
    ),
    MixtureOfDepths(causal="router", router_bce_coef=0.5, predictor=None),
    Predictor(hidden=5, activation="silu", threshold=0.25, loss_coef=0.0),
    ExpertMLP(hidden=64, activation="silu", glu=True),
    ExpertMLP(hidden=1, activation="gelu"),
]
DEFAULTS = [TokenChoice(), ExpertChoice(), SoftMoE(), MixtureOfDepths(), Predictor(), ExpertMLP()]


def _id(spec):
    return type(spec).__name__


@pytest.mark.parametrize("spec", DEFAULTS + NON_DEFAULT, ids=_id)
def test_spec_round_trips_exactly_through_json(spec):
    text = spec.to_json()
    back = from_json(text)
    assert type(back) is type(spec) and back == spec, (spec, back)
    assert back.to_json() == text
    assert from_dict(json.loads(text)) == spec
    data = json.loads(text)
    assert data["kind"] == type(spec).__name__ and list(data) == sorted(data)


def test_nested_predictor_is_stored_as_its_own_kind():
    data = json.loads(NON_DEFAULT[2].to_json())
    assert data["predictor"] == {
        "kind": "Predictor",
        "hidden": 7,
        "activation": "gelu_tanh",
        "threshold": -0.5,
        "loss_coef": 0.3,
    }
    assert json.loads(NON_DEFAULT[3].to_json())["predictor"] is None


def test_spec_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TokenChoice().top_k = 1


def test_unknown_key_is_an_error_naming_it():
    data = json.loads(TokenChoice().to_json()) | {"capacity_factr": 2.0}
    with pytest.raises(SpecError, match=r"TokenChoice: unknown key\(s\) \['capacity_factr'\]"):
        from_json(json.dumps(data))


def test_unknown_key_in_nested_predictor_is_an_error_naming_it():
    data = json.loads(ExpertChoice().to_json())
    data["predictor"]["hiden"] = 4
    with pytest.raises(SpecError, match=r"Predictor: unknown key\(s\) \['hiden'\]"):
        from_json(json.dumps(data))


@pytest.mark.parametrize(
    "data",
    [{"kind": "TopKRouter"}, {"num_experts": 8}, [1, 2]],
    ids=["unknown", "missing", "not-a-dict"],
)
def test_unknown_or_missing_kind_is_an_error_naming_it(data):
    shown = repr(data.get("kind") if isinstance(data, dict) else data)
    with pytest.raises(SpecError, match=r"spec kind .*expected one of .*TokenChoice") as err:
        from_dict(data)
    assert shown in str(err.value)


def test_invalid_json_is_a_spec_error():
    with pytest.raises(SpecError, match="not valid JSON"):
        from_json("{kind: TokenChoice")


def test_non_string_kind_is_a_spec_error():
    with pytest.raises(SpecError, match="spec kind"):
        from_json('{"kind": ["TokenChoice"]}')


def test_huge_integer_for_a_float_field_is_a_spec_error():
    with pytest.raises(SpecError, match="capacity_factor"):
        TokenChoice(capacity_factor=10**400)


NAN = float("nan")
BAD = [  # (class, kwargs, field, value, words from the accepted range)
    (TokenChoice, {"gate": "tanh"}, "gate", "tanh", "one of 'softmax', 'sigmoid'"),
    (TokenChoice, {"num_experts": 0, "top_k": 0}, "num_experts", 0, ">= 1"),
    (TokenChoice, {"top_k": True}, "top_k", True, "an integer"),
    (TokenChoice, {"num_experts": 8.0}, "num_experts", 8.0, "an integer"),
    (TokenChoice, {"top_k": 3, "num_experts": 2}, "top_k", 3, "1 <= top_k <= num_experts (2)"),
    (TokenChoice, {"top_k": 0}, "top_k", 0, "1 <= top_k <= num_experts (8)"),
    (TokenChoice, {"renormalize": 1}, "renormalize", 1, "True or False"),
    (TokenChoice, {"capacity_factor": -1.0}, "capacity_factor", -1.0, "> 0"),
    (TokenChoice, {"capacity_factor": True}, "capacity_factor", True, "a number"),
    (TokenChoice, {"capacity_factor": "1.25"}, "capacity_factor", "1.25", "a number"),
    (TokenChoice, {"capacity_multiple_of": 0}, "capacity_multiple_of", 0, ">= 1"),
    (TokenChoice, {"min_capacity": -1}, "min_capacity", -1, ">= 0"),
    (TokenChoice, {"noise_std": NAN}, "noise_std", NAN, "a finite number"),
    (TokenChoice, {"noise_std": math.inf}, "noise_std", math.inf, "a finite number"),
    (TokenChoice, {"jitter_eps": 1.0}, "jitter_eps", 1.0, "0 <= jitter_eps < 1"),
    (TokenChoice, {"noise": "jitter", "jitter_eps": 0.0}, "jitter_eps", 0.0,
     "0 < jitter_eps < 1 when noise='jitter'"),
    (TokenChoice, {"noise": "additive", "noise_std": 0.0}, "noise_std", 0.0,
     "> 0 when noise='additive'"),
    (TokenChoice, {"noise_std": -1.0}, "noise_std", -1.0, ">= 0.0"),
    (ExpertChoice, {"noise": "additive", "noise_std": 0.0}, "noise_std", 0.0,
     "> 0 when noise='additive'"),
    (TokenChoice, {"z_loss_coef": -1e-3}, "z_loss_coef", -1e-3, ">= 0.0"),
    (TokenChoice, {"group_size": 4}, "group_size", 4, "> 0 exactly when group='fixed'"),
    (TokenChoice, {"group": "fixed"}, "group_size", 0, "> 0 exactly when group='fixed'"),
    (TokenChoice, {"load_coef": 0.1}, "load_coef", 0.1, "0 unless noise='additive'"),
    (TokenChoice, {"load_coef": 0.1, "noise": "jitter"}, "load_coef", 0.1, "noise='additive'"),
    (ExpertChoice, {"capacity": "dropless"}, "capacity", "dropless", "one of 'factor', 'fixed'"),
    (ExpertChoice, {"num_experts": -2}, "num_experts", -2, ">= 1"),
    (ExpertChoice, {"capacity_factor": 0}, "capacity_factor", 0.0, "> 0"),
    (ExpertChoice, {"noise": "jitter"}, "noise", "jitter", "one of 'none', 'additive'"),
    (ExpertChoice, {"causal": "router"}, "router_bce_coef", 0.0, "> 0 when causal='router'"),
    (ExpertChoice, {"router_bce_coef": -1.0}, "router_bce_coef", -1.0, ">= 0.0"),
    (ExpertChoice, {"predictor": None}, "predictor", None, "a Predictor when causal='predictor'"),
    (
        ExpertChoice,
        {"predictor": TokenChoice()},
        "predictor",
        TokenChoice(),
        "Predictor or NoneType",
    ),
    (ExpertChoice, {"group": "fixed", "group_size": -1}, "group_size", -1, "> 0 exactly when"),
    (SoftMoE, {"slots": "per_token"}, "slots", "per_token", "one of 'per_expert', 'factor'"),
    (SoftMoE, {"slots_per_expert": 0}, "slots_per_expert", 0, ">= 1"),
    (SoftMoE, {"capacity_factor": -0.5}, "capacity_factor", -0.5, "> 0"),
    (SoftMoE, {"noise_std": -0.1}, "noise_std", -0.1, ">= 0.0"),
    (SoftMoE, {"scale": "both"}, "scale", "both", "one of 'smaller', 'input', 'slots', 'none'"),
    (SoftMoE, {"round_bf16": "no"}, "round_bf16", "no", "True or False"),
    (SoftMoE, {"group": "fixed"}, "group_size", 0, "> 0 exactly when group='fixed'"),
    (MixtureOfDepths, {"capacity": 0.0}, "capacity", 0.0, "0 < capacity <= 1"),
    (MixtureOfDepths, {"capacity": 1.5}, "capacity", 1.5, "0 < capacity <= 1"),
    (MixtureOfDepths, {"capacity": NAN}, "capacity", NAN, "a finite number"),
    (
        MixtureOfDepths,
        {"capacity_rounding": "up"},
        "capacity_rounding",
        "up",
        "one of 'floor', 'ceil', 'round'",
    ),
    (MixtureOfDepths, {"every": 0}, "every", 0, ">= 1"),
    (MixtureOfDepths, {"min_tokens": -1}, "min_tokens", -1, ">= 0"),
    (MixtureOfDepths, {"first_routed": -1}, "first_routed", -1, ">= 0"),
    (MixtureOfDepths, {"weight": "softmax"}, "weight", "softmax", "one of 'raw', 'sigmoid'"),
    (MixtureOfDepths, {"causal": "router"}, "router_bce_coef", 0.0, "> 0 when causal='router'"),
    (Predictor, {"hidden": -1}, "hidden", -1, ">= 0"),
    (Predictor, {"activation": "tanh"}, "activation", "tanh", "'relu', 'gelu', 'gelu_tanh'"),
    (Predictor, {"threshold": NAN}, "threshold", NAN, "a finite number"),
    (Predictor, {"loss_coef": -1.0}, "loss_coef", -1.0, ">= 0.0"),
    (ExpertMLP, {"hidden": 0}, "hidden", 0, ">= 1"),
    (ExpertMLP, {"hidden": 2.0}, "hidden", 2.0, "an integer"),
    (ExpertMLP, {"glu": True}, "activation", "relu", "'silu' when glu=True"),
    (ExpertMLP, {"glu": True, "activation": "gelu"}, "activation", "gelu", "'silu' when glu"),
]


@pytest.mark.parametrize(
    "cls, kwargs, name, value, accepted", BAD, ids=[f"{c.__name__}-{k}" for c, _, k, *_ in BAD]
)
def test_bad_value_error_names_class_field_value_and_range(cls, kwargs, name, value, accepted):
    with pytest.raises(SpecError) as err:
        cls(**kwargs)
    message = str(err.value)
    assert message.startswith(f"{cls.__name__}.{name} = {value!r}: expected "), message
    assert accepted in message, message
    assert isinstance(err.value, ValueError)


def test_bad_value_from_json_is_the_same_error():
    with pytest.raises(SpecError, match=r"TokenChoice\.top_k = 9: expected 1 <= top_k"):
        from_json('{"kind": "TokenChoice", "top_k": 9}')


def test_int_for_a_float_field_is_stored_and_serialised_as_float():
    spec = TokenChoice(capacity_factor=2, noise_std=1)
    assert type(spec.capacity_factor) is float and type(spec.noise_std) is float
    assert spec == TokenChoice(capacity_factor=2.0)
    assert json.loads(spec.to_json())["capacity_factor"] == 2.0
    assert '"capacity_factor": 2.0' in spec.to_json()
    assert from_json('{"kind": "TokenChoice", "capacity_factor": 2}').to_json() == spec.to_json()
    assert type(MixtureOfDepths(capacity=1).capacity) is float


def _tc(**kw):
    base = {"num_experts": 4, "top_k": 1, "capacity_factor": 1.0, "capacity_multiple_of": 1}
    return TokenChoice(**(base | kw))


@pytest.mark.parametrize(
    "spec, tokens, slots",
    [
        (TokenChoice(), 16, 8),  # 16*2*1.25/8 = 5 -> ceil 5 -> multiple of 4: 8
        (TokenChoice(), 4, 4),  # 1.25 -> 2 -> 4
        (TokenChoice(), 32, 12),  # 10 -> 12
        (_tc(capacity_rounding="round"), 10, 2),  # 2.5 -> 2 (half to even)
        (_tc(capacity_rounding="round"), 14, 4),  # 3.5 -> 4 (half to even)
        (_tc(capacity_rounding="round"), 6, 2),  # 1.5 -> 2
        (_tc(capacity_rounding="round"), 11, 3),  # 2.75 -> 3
        (_tc(), 10, 3),  # ceil 2.5
        (_tc(), 12, 3),  # exact
        (_tc(top_k=2), 10, 5),  # 10*2/4
        (_tc(top_k=2, capacity_multiple_of=4), 10, 8),  # 5 -> 8
        (_tc(top_k=2, capacity_multiple_of=4), 8, 4),  # already a multiple
        (_tc(num_experts=8, min_capacity=3), 8, 3),  # 1 -> at least 3
        (_tc(num_experts=8, min_capacity=3, capacity_multiple_of=4), 8, 4),  # min, then multiple
        (_tc(num_experts=8, capacity_factor=0.5, capacity_rounding="round", min_capacity=0), 4, 0),
        (
            _tc(num_experts=8, capacity_factor=0.5, capacity_rounding="round"),
            4,
            1,
        ),  # min_capacity 1
        (_tc(capacity="fixed", expert_capacity=7), 100, 7),
        (_tc(capacity="fixed", expert_capacity=7), 3, 7),  # token choice: not capped at S
        (_tc(capacity="dropless"), 37, 37),
        (TokenChoice(capacity="dropless"), 5, 5),
    ],
)
def test_token_choice_slots(spec, tokens, slots):
    assert spec.slots(tokens) == slots


@pytest.mark.parametrize(
    "spec, tokens, slots",
    [
        (ExpertChoice(), 16, 4),  # 16*2/8
        (ExpertChoice(), 5, 2),  # 1.25 -> ceil 2
        (ExpertChoice(capacity_rounding="round", num_experts=4, capacity_factor=1.0), 10, 2),
        (ExpertChoice(capacity_rounding="round", num_experts=4, capacity_factor=1.0), 14, 4),
        (ExpertChoice(num_experts=4, capacity_factor=1.0, capacity_multiple_of=4), 20, 8),  # 5 -> 8
        (ExpertChoice(num_experts=8, capacity_factor=1.0, min_capacity=2), 8, 2),
        (ExpertChoice(num_experts=2, capacity_factor=4.0), 6, 6),  # 12, capped at S
        (ExpertChoice(num_experts=2, capacity_factor=1.0, capacity_multiple_of=4), 6, 4),
        (ExpertChoice(num_experts=2, capacity_factor=1.0, capacity_multiple_of=4), 7, 4),  # 4 <= 7
        (ExpertChoice(num_experts=2, capacity_factor=1.0, capacity_multiple_of=8), 7, 7),  # 8 -> 7
        (ExpertChoice(capacity="fixed", expert_capacity=10), 4, 4),  # capped at S
        (ExpertChoice(capacity="fixed", expert_capacity=3), 40, 3),
    ],
)
def test_expert_choice_slots_are_capped_at_the_group(spec, tokens, slots):
    assert spec.slots(tokens) == slots


@pytest.mark.parametrize(
    "spec, tokens, slots",
    [
        (SoftMoE(slots_per_expert=3), 100, 3),
        (SoftMoE(), 7, 1),
        (SoftMoE(slots="factor", num_experts=4), 10, 2),  # round(2.5) half to even
        (SoftMoE(slots="factor", num_experts=4), 14, 4),  # round(3.5)
        (SoftMoE(slots="factor", num_experts=4, capacity_factor=2.0), 10, 5),
        (SoftMoE(slots="factor", num_experts=4), 1, 1),  # round(0.25) = 0 -> at least 1
    ],
)
def test_soft_moe_slots_per_expert(spec, tokens, slots):
    assert spec.slots_for(tokens) == slots


@pytest.mark.parametrize(
    "spec, seq_len, k",
    [
        (MixtureOfDepths(), 16, 2),  # 0.125*16
        (MixtureOfDepths(), 12, 1),  # floor 1.5
        (MixtureOfDepths(capacity_rounding="ceil"), 12, 2),
        (MixtureOfDepths(capacity_rounding="round"), 12, 2),  # 1.5 -> 2 (half to even)
        (MixtureOfDepths(capacity_rounding="round"), 20, 2),  # 2.5 -> 2 (half to even)
        (MixtureOfDepths(capacity_rounding="round"), 28, 4),  # 3.5 -> 4
        (MixtureOfDepths(), 4, 1),  # floor 0.5 = 0 -> min_tokens 1
        (MixtureOfDepths(min_tokens=0), 4, 0),
        (MixtureOfDepths(min_tokens=10), 4, 4),  # never more than the sequence
        (MixtureOfDepths(capacity=1.0), 9, 9),
        (MixtureOfDepths(capacity=0.5, capacity_rounding="ceil"), 7, 4),
    ],
)
def test_mixture_of_depths_tokens(spec, seq_len, k):
    assert spec.tokens(seq_len) == k


@pytest.mark.parametrize(
    "spec, routed",
    [
        (MixtureOfDepths(), [False, True, False, True, False, True]),  # every other, block 0 dense
        (MixtureOfDepths(first_routed=0), [True, False, True, False, True, False]),
        (MixtureOfDepths(every=1, first_routed=0), [True] * 6),
        (MixtureOfDepths(every=3, first_routed=2), [False, False, True, False, False, True]),
    ],
)
def test_mixture_of_depths_routes_every_other_block(spec, routed):
    assert [spec.is_routed(b) for b in range(6)] == routed


def test_predictor_width_defaults_to_half_the_model_dim():
    assert Predictor().width(64) == 32
    assert Predictor().width(1) == 1
    assert Predictor(hidden=16).width(64) == 16


@pytest.mark.parametrize("cls", [TokenChoice, ExpertChoice])
def test_expert_capacity_is_given_exactly_when_capacity_is_fixed(cls):
    with pytest.raises(SpecError, match=r"expert_capacity = 0: expected > 0 exactly when"):
        cls(capacity="fixed")
    with pytest.raises(SpecError, match=r"expert_capacity = 5: expected > 0 exactly when"):
        cls(expert_capacity=5)
    assert cls(capacity="fixed", expert_capacity=5).slots(100) == 5


def test_router_causal_rule_refuses_an_unused_predictor():
    from moe_min.spec import MixtureOfDepths

    with pytest.raises(SpecError, match=r"predictor = Predictor.*None when causal='router'"):
        MixtureOfDepths(causal="router", router_bce_coef=0.1)
    assert MixtureOfDepths(causal="router", router_bce_coef=0.1, predictor=None).predictor is None


def test_noise_knobs_are_not_required_when_their_noise_is_off():
    # noise_std scales additive noise only, jitter_eps jitter only: 0 is accepted without them
    assert TokenChoice(noise="none", noise_std=0.0, jitter_eps=0.0).noise_std == 0.0
    assert TokenChoice(noise="jitter", noise_std=0.0).jitter_eps == 0.01
    assert TokenChoice(noise="additive", jitter_eps=0.0).noise_std == 1.0
    assert ExpertChoice(noise="none", noise_std=0.0).noise_std == 0.0
