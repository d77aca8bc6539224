"""The shipped corpus is exactly what the generator writes, and it covers what it claims."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moe_min.conformance.case import CASES_DIR, case_paths, read_case
from moe_min.tensorio import load_safetensors
from moe_min.conformance.corpus import all_cases
from moe_min.conformance.generate import write_corpus
from moe_min.spec import ExpertChoice, MixtureOfDepths, SoftMoE, TokenChoice


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    return root


def test_regenerated_corpus_matches_the_shipped_one(regenerated):
    shipped = {p.relative_to(CASES_DIR) for p in case_paths()}
    fresh = {p.relative_to(regenerated) for p in case_paths(regenerated)}
    assert fresh == shipped, f"stale or missing cases: {sorted(fresh ^ shipped)}"
    for rel in sorted(shipped):
        want, want_meta = load_safetensors(CASES_DIR / rel)
        got, got_meta = load_safetensors(regenerated / rel)
        # the checksum covers float bytes, which BLAS may change in the last bits between
        # machines (compared with a tolerance below); read_case checks each file's own
        assert {**got_meta, "checksum": ""} == {**want_meta, "checksum": ""}, rel
        assert got.keys() == want.keys(), rel
        for key in want:
            if want[key].dtype.kind in "iub":
                np.testing.assert_array_equal(got[key], want[key], err_msg=f"{rel} {key}")
            else:  # float64 BLAS may differ in the last bits between machines
                np.testing.assert_allclose(got[key], want[key], rtol=1e-12, atol=1e-13,
                                           err_msg=f"{rel} {key}")


def test_generation_is_byte_reproducible(tmp_path):
    cases = [c for c, _ in zip(all_cases(), range(4))]
    a, b = tmp_path / "a", tmp_path / "b"
    write_corpus(a, cases)
    write_corpus(b, [c for c, _ in zip(all_cases(), range(4))])
    for p in case_paths(a):
        assert p.read_bytes() == (b / p.relative_to(a)).read_bytes(), p.name


def test_every_scheme_has_cases_and_names_are_unique():
    cases = [read_case(p) for p in case_paths()]
    names = [c.name for c in cases]
    assert len(names) == len(set(names))
    kinds = {type(c.spec) for c in cases}
    assert kinds == {TokenChoice, ExpertChoice, SoftMoE, MixtureOfDepths}
    for c in cases:
        assert c.meta["why"] and c.meta["tolerance"], c.name
        assert c.name.startswith(c.meta["scheme"] + "__")


def _values(cases, cls, field):
    return {getattr(c.spec, field) for c in cases if isinstance(c.spec, cls)}


def test_every_literal_and_bool_knob_value_is_exercised():
    import typing
    from dataclasses import fields

    cases = [read_case(p) for p in case_paths()]
    for cls in (TokenChoice, ExpertChoice, SoftMoE, MixtureOfDepths):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            hint = hints[f.name]
            choices = typing.get_args(hint) if typing.get_origin(hint) is typing.Literal else \
                (True, False) if hint is bool else ()
            missing = set(choices) - _values(cases, cls, f.name)
            assert not missing, f"{cls.__name__}.{f.name}: no case with {sorted(missing)}"
    modes = {(c.meta["scheme"], c.meta["mode"]) for c in cases}
    for scheme in ("expert_choice", "mixture_of_depths"):
        assert {(scheme, m) for m in ("train", "eval", "causal")} <= modes


def _case(name):
    return next(read_case(p) for p in case_paths() if p.stem == name)


def test_cases_show_what_their_why_claims():
    score, position = _case("token_choice__k2_cf0.5_drop-score"), _case(
        "token_choice__k2_cf0.5_drop-position")
    np.testing.assert_array_equal(score.tensors["input/x"], position.tensors["input/x"])
    assert not np.array_equal(score.tensors["expect/plan/slot_token"],
                              position.tensors["expect/plan/slot_token"])
    assert score.tensors["expect/stats/dropped"] > 0
    zero = _case("token_choice__k2_capacity0_all-drop")
    assert zero.tensors["expect/plan/slot_token"].size == 0
    assert not zero.tensors["expect/y"].any()
    assert _case("expert_choice__cf0.5_unrouted").tensors["expect/stats/unrouted"] > 0
    assert _case("token_choice__k2_fixed-capacity_above-S").tensors["expect/stats/dropped"] == 0
    ties = _case("token_choice__k2_ties_experts")
    assert ties.meta["gradients"] is False and not any(k.startswith("expect/grad/")
                                                       for k in ties.tensors)
    grads = [k for k in _case("mixture_of_depths__cap0.25_train").tensors if "grad/" in k]
    assert "expect/grad/router_w" in grads and "expect/grad/x" in grads
    assert json.loads(json.dumps(ties.meta)) == ties.meta
