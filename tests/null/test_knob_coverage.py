"""Knob coverage: for every field of every spec dataclass (moe_min/spec.py) and each value it
accepts (Literal and bool fields: all; numeric fields: the representative values in NUMERIC;
`predictor`: None or a Predictor), some corpus case holds that value and its expected output
fails the case (moves past its tolerance) when only that field changes. Likewise each tie and
order rule under each drop priority, and each rounding rule on each scheme that rounds, has a
case whose output the opposite rule would change. Everything is computed with the oracle on
the shipped cases' own arrays; a failure lists the uncovered pairs."""

from __future__ import annotations

import functools
import typing
from dataclasses import fields, replace

import numpy as np
import pytest

from moe_min import oracle
from moe_min.conformance import generate
from moe_min.conformance.case import case_paths, read_case
from moe_min.spec import (ExpertChoice, ExpertMLP, MixtureOfDepths, Predictor, SoftMoE,
                          SpecError, TokenChoice)

SPECS = (TokenChoice, ExpertChoice, SoftMoE, MixtureOfDepths, Predictor, ExpertMLP)
# A few representative values per numeric field: the default and the edges the references use.
NUMERIC = {
    TokenChoice: {"num_experts": (1, 3), "top_k": (1, 2, 3), "capacity_factor": (0.5, 1.0, 1.25),
                  "capacity_multiple_of": (1, 4), "min_capacity": (0, 1),
                  "expert_capacity": (0, 2), "group_size": (0, 4), "noise_std": (1.0, 2.0),
                  "jitter_eps": (0.01, 0.2), "load_balance_coef": (0.0, 0.01, 0.5),
                  "z_loss_coef": (0.0, 0.1), "importance_coef": (0.0, 0.2),
                  "load_coef": (0.0, 0.5)},
    ExpertChoice: {"num_experts": (1, 3), "capacity_factor": (0.5, 1.0, 2.0),
                   "capacity_multiple_of": (1, 2), "min_capacity": (1, 2),
                   "expert_capacity": (0, 2), "group_size": (0, 4), "noise_std": (1.0, 2.0),
                   "router_bce_coef": (0.0, 0.5)},
    SoftMoE: {"num_experts": (1, 3), "slots_per_expert": (1, 2), "capacity_factor": (1.0, 1.5),
              "noise_std": (0.0, 0.5), "group_size": (0, 3)},
    MixtureOfDepths: {"capacity": (0.125, 0.25, 0.5), "min_tokens": (1, 2),
                      "router_bce_coef": (0.0, 0.3)},
    Predictor: {"hidden": (0, 5), "threshold": (0.0, 0.3), "loss_coef": (1.0, 2.0)},
    ExpertMLP: {"hidden": (6, 8)},
}
# By design these never change one layer's output: they say which blocks of a model are
# routed (MixtureOfDepths.is_routed), which tests/null/test_spec.py checks instead.
EXCLUDED = {(MixtureOfDepths, "every"): "which blocks are routed, not how",
            (MixtureOfDepths, "first_routed"): "which blocks are routed, not how"}
NUDGE = 1e-9  # relative: moves a capacity that sits exactly on a rounding boundary, nothing else


@functools.cache
def cases():
    return [read_case(p) for p in case_paths()]


def accepted_values(cls, name):
    if name in NUMERIC[cls]:
        return NUMERIC[cls][name]
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    if hint is bool:
        return (False, True)
    assert name == "predictor", f"{cls.__name__}.{name}: give it representative values"
    return (None, Predictor)  # the class stands for "a Predictor"


def knobs():
    for cls in SPECS:
        for f in fields(cls):
            if (cls, f.name) not in EXCLUDED:
                yield cls, f.name, accepted_values(cls, f.name)


# ----------------------------------------------------------------------------- running a case
def _tokens(case):
    B, T, _ = case.tensors["input/x"].shape
    return B * T


def _fails(case, out) -> bool:
    """Would a backend that returned `out` fail the case's forward rows?"""
    want = {k: v for k, v in case.group("expect").items() if not k.startswith("grad/")}
    got = {k: v for k, v in out.items() if not k.startswith(oracle.LIBRARY_KEYS)}
    if got.keys() != want.keys():
        return True
    for key in want:
        g, w = np.asarray(got[key], float), want[key].astype(float)
        rtol, atol = case.meta["tolerance"][key]
        if g.shape != w.shape or np.any(np.abs(g - w) > atol + rtol * np.abs(w)):
            return True
    return False


def _run(case, spec, expert, block):
    """The oracle on the case's arrays under spec/expert/block. A training-noise draw is data,
    not a knob: a spec whose noise needs another draw than the case's gets a fixed one."""
    x = case.tensors["input/x"]
    draw = generate._noise(np.random.default_rng(0), spec, *x.shape) \
        if case.meta["mode"] == "train" else None
    noise = case.tensors.get("input/noise")
    if draw is None or noise is None or noise.shape != draw.shape:
        noise = draw
    call = {"mode": case.meta["mode"], "expert": expert, "block": block}
    return generate.run_oracle(spec, call, x, case.group("param"), noise)


def _changes(case, spec, expert, block) -> bool:
    try:
        return _fails(case, _run(case, spec, expert, block))
    except ValueError as e:
        # The case's parameters fit only its own value (num_experts, hidden, slots: a shape
        # pinned by the data), so any other value fails it. Any other refusal (a group size
        # that does not divide the tokens) witnesses nothing.
        return str(e).startswith("params[")


def _companions(obj, name, value, tokens) -> dict:
    """Fields the spec ties to `name`: changing it alone is refused by design, so they follow."""
    fixed_group = next(d for d in range(2, tokens + 1) if tokens % d == 0)
    router = {"causal": "router", "predictor": None,
              "router_bce_coef": getattr(obj, "router_bce_coef", 0.0) or 0.5}
    return {"capacity": {"expert_capacity": 2 if value == "fixed" else 0},
            "expert_capacity": {"capacity": "fixed" if value else "factor"},
            "group": {"group_size": fixed_group if value == "fixed" else 0},
            "group_size": {"group": "fixed" if value else "sequence"},
            "causal": {"predictor": Predictor()} if value == "predictor" else router,
            "predictor": {"causal": "predictor"} if value is not None else router,
            "noise": {"load_coef": 0.0},
            "load_coef": {"noise": "additive"},
            "glu": {"activation": "silu"},
            "activation": {"glu": False}}.get(name, {})


def _with(obj, name, value, tokens):
    """obj with `name` = value (its companions too when the spec needs them), or None."""
    value = Predictor() if value is Predictor else value
    for extra in ({}, _companions(obj, name, value, tokens)):
        try:
            return replace(obj, **{name: value, **extra})
        except SpecError:
            pass
    return None


def _sites(case, cls):
    """Each instance of `cls` in the case, with a function that puts a replacement back:
    new -> (spec, expert, block)."""
    spec, expert, block = case.spec, case.expert, case.block
    if isinstance(spec, cls):
        yield spec, lambda new: (new, expert, block)
    if cls is Predictor and getattr(spec, "predictor", None) is not None:
        yield spec.predictor, lambda new: (replace(spec, predictor=new), expert, block)
    if cls is ExpertMLP and expert is not None:
        yield expert, lambda new: (spec, new, block)
    if cls is ExpertMLP and block is not None:
        yield block["mlp"], lambda new: (spec, expert, {**block, "mlp": new})


def _holds(current, value) -> bool:
    if value is Predictor:
        return isinstance(current, Predictor)
    return type(current) is type(value) and current == value


def _alternatives(value, values):
    others = [v for v in values if not _holds(v, value) and v is not value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return others
    near = [value - 1, value + 1] if isinstance(value, int) else [value / 2, value * 2, 0.0]
    return others + [v for v in near if v != value]


def witness(case, cls, name, value, values) -> bool:
    for current, put_back in _sites(case, cls):
        if not _holds(getattr(current, name), value):
            continue
        for other in _alternatives(value, values):
            changed = _with(current, name, other, _tokens(case))
            if changed is not None and _changes(case, *put_back(changed)):
                return True
    return False


# ----------------------------------------------------------------------------- rule probes
def _top(scores, k, lower_first=True):
    """Indices of the k largest scores on the last axis; equal scores: lower index first, or
    (lower_first=False) higher index first."""
    if lower_first:
        return np.argsort(-scores, axis=-1, kind="stable")[..., :k]
    return scores.shape[-1] - 1 - np.argsort(-scores[..., ::-1], axis=-1, kind="stable")[..., :k]


def _groups(case):
    spec, n = case.spec, _tokens(case)
    B = case.tensors["input/x"].shape[0]
    size = {"sequence": n // B, "batch": n}.get(getattr(spec, "group", "sequence"),
                                                   getattr(spec, "group_size", 0))
    return n // size, size


def _claimed(gates, K, C, priority, expert_ties_lower=True, token_ties_lower=True,
             k_major=True):
    """slot_token[G, E, C] by the test's own reading of the token-choice claim rule, each part
    switchable: top-K ties, the priority order (and its ties), k-major claims."""
    G, S, E = gates.shape
    slots = np.full((G, E, C), -1)
    for g, gg in enumerate(gates):
        choice = _top(gg, K, expert_ties_lower)
        if priority == "score":  # V-MoE's BPR: descending top-1 gate
            order = _top(gg.max(1), S, token_ties_lower)
        else:
            order = np.arange(S) if token_ties_lower else np.arange(S)[::-1]
        claims = [(s, k) for k in range(K) for s in order] if k_major else \
            [(s, k) for s in order for k in range(K)]
        fill = np.zeros(E, int)
        for s, k in claims:
            e = choice[s, k]
            if fill[e] < C:
                slots[g, e, fill[e]] = s
                fill[e] += 1
    return slots


def _oracle(case):
    return _run(case, case.spec, case.expert, case.block)


def _tc_plan(case, **flip):
    out = _oracle(case)
    G, S = _groups(case)
    return out, _claimed(out["router/gates"].reshape(G, S, -1), case.spec.top_k,
                         out["plan/slot_token"].shape[-1], case.spec.drop_priority, **flip)


def tc_probe(case, rule):
    """Would flipping `rule` change the token-choice plan (slot_token is compared exactly)?"""
    flip = {"expert ties": dict(expert_ties_lower=False),
            "token order": dict(token_ties_lower=False), "k-major": dict(k_major=False)}[rule]
    out, flipped = _tc_plan(case, **flip)
    return not np.array_equal(flipped, out["plan/slot_token"])


def top_c_probe(case):
    """EC: would sending equal gates to the higher token change the plan (slot c holds the
    c-th highest)? MoD: would it change the chosen set (the plan is in time order)?"""
    out = _oracle(case)
    if isinstance(case.spec, ExpertChoice):
        G, S = _groups(case)
        scores = np.swapaxes(out["router/gates"].reshape(G, S, -1), 1, 2)  # [G, E, S]
        k = oracle.capacity(case.spec, S)
        return not np.array_equal(_top(scores, k), _top(scores, k, lower_first=False))
    scores = out["router/logits"][..., 0]  # [B, T]
    k = oracle.capacity(case.spec, scores.shape[-1])
    return not np.array_equal(np.sort(_top(scores, k), -1),
                              np.sort(_top(scores, k, lower_first=False), -1))


def rounding_probe(case, direction):
    """Does a capacity factor a hair above (+1) or below (-1) change the case's output? Only
    at an exact rounding boundary, which is where each rounding rule shows."""
    name = "capacity" if isinstance(case.spec, MixtureOfDepths) else "capacity_factor"
    nudged = getattr(case.spec, name) * (1 + direction * NUDGE)
    if nudged > 1 and name == "capacity":
        return False
    return _changes(case, replace(case.spec, **{name: nudged}), case.expert, case.block)


def _rounds(case, rule):
    spec = case.spec
    if isinstance(spec, SoftMoE):
        return spec.slots == "factor" and rule == "round"  # P = round(S cf / E), half-even
    if isinstance(spec, MixtureOfDepths):
        return spec.capacity_rounding == rule
    return spec.capacity == "factor" and spec.capacity_rounding == rule


ROUNDING = {  # rule -> (nudge direction, what the opposite reading would do)
    "round": ((+1, "half-way rounds down to even (2.5 -> 2), half-up gives 3"),
              (-1, "half-way rounds up to even (3.5 -> 4), half-down gives 3")),
    "ceil": ((+1, "an exact integer stays (5.0 -> 5), not one up"),),
    "floor": ((-1, "an exact integer stays (3.0 -> 3), not one down"),),
}


def rules():
    """(description, scheme class, probe(case) -> bool) for every tie, order and rounding rule."""
    for priority in ("position", "score"):
        for rule, says in (("expert ties", "equal gates go to the lower expert"),
                           ("token order", "claims in priority order, ties by position"),
                           ("k-major", "every first choice claims before any second")):
            yield (f"token choice, drop_priority={priority}: {says}", TokenChoice,
                   lambda c, p=priority, r=rule: c.spec.drop_priority == p and tc_probe(c, r))
    for cls in (ExpertChoice, MixtureOfDepths):
        yield (f"{cls.__name__}: equal scores go to the lower token", cls,
               lambda c: c.meta["mode"] != "causal" and top_c_probe(c))
    hints = {cls: typing.get_args(typing.get_type_hints(cls)["capacity_rounding"])
             for cls in (TokenChoice, ExpertChoice, MixtureOfDepths)}
    for cls, rounding in [*hints.items(), (SoftMoE, ("round",))]:
        for rule in rounding:
            for direction, says in ROUNDING[rule]:
                knob = "slots='factor'" if cls is SoftMoE else f"capacity_rounding={rule}"
                yield (f"{cls.__name__} {knob}: {says}", cls,
                       lambda c, r=rule, d=direction: _rounds(c, r) and rounding_probe(c, d))


# ----------------------------------------------------------------------------- the tests
def test_the_oracle_reproduces_every_case_so_a_change_means_the_knob():
    for case in cases():
        assert not _fails(case, _oracle(case)), case.name


def test_the_rule_probes_read_the_rules_as_the_oracle_does():
    for case in cases():
        if not isinstance(case.spec, TokenChoice):
            continue
        out, plan = _tc_plan(case)
        assert np.array_equal(plan, out["plan/slot_token"]), case.name


def test_every_knob_value_changes_some_case():
    uncovered = [f"{cls.__name__}.{name} = {value.__name__ if value is Predictor else value!r}"
                 for cls, name, values in knobs() for value in values
                 if not any(witness(c, cls, name, value, values) for c in cases())]
    assert not uncovered, "no corpus case changes with:\n" + "\n".join(uncovered)


def test_every_tie_order_and_rounding_rule_changes_some_case():
    uncovered = [says for says, cls, probe in rules()
                 if not any(isinstance(c.spec, cls) and probe(c) for c in cases())]
    assert not uncovered, "no corpus case shows:\n" + "\n".join(uncovered)


@pytest.mark.parametrize("cls, name", sorted(EXCLUDED, key=str))
def test_excluded_fields_indeed_never_change_a_layer(cls, name):
    for case in cases():
        if isinstance(case.spec, cls):
            other = replace(case.spec, **{name: getattr(case.spec, name) + 3})
            assert not _fails(case, _run(case, other, case.expert, case.block)), case.name
