"""The suite can see faults: each mutant is the NumPy backend (or the lowering under it) with
one deliberate bug, and the conformance run must fail it on the quantity the bug touches."""

from __future__ import annotations

import numpy as np
import pytest

from moe_min import routing
from moe_min.backends.ops_numpy import NumpyOps
from moe_min.conformance.runner import Runner
from moe_min.spec import ExpertChoice, TokenChoice


class TieFlip(NumpyOps):
    def top_k(self, x, k, axis=-1):  # equal values: HIGHER index first
        flipped = np.flip(x, axis=axis)
        idx = np.take(np.argsort(-flipped, axis=axis, kind="stable"), np.arange(k), axis=axis)
        idx = x.shape[axis] - 1 - idx
        return np.take_along_axis(x, idx, axis=axis), idx


class SoftmaxWrongAxis(NumpyOps):
    def softmax(self, x, axis):
        return super().softmax(x, axis - 1 if axis < 0 else axis + 1)


class UnstableArgsort(NumpyOps):
    def argsort(self, x, axis=-1, descending=False):  # sorted, but equal keys reversed
        idx = super().argsort(np.flip(x, axis=axis), axis=axis, descending=descending)
        return x.shape[axis] - 1 - idx


class ScatterKeepsLastWrite(NumpyOps):
    def scatter_add(self, x, idx, src, axis):  # plain assignment: repeated indices keep one
        out = np.array(x, copy=True)
        np.put_along_axis(out, idx, np.take_along_axis(out, idx, axis) + src, axis)
        return out


def test_unstable_argsort_mutant_still_sorts():
    x = np.array([[2, 0, 1, 0, 2, 1]])
    np.testing.assert_array_equal(UnstableArgsort().argsort(x), [[3, 1, 5, 2, 4, 0]])


def _rows(ops, include):
    return Runner(ops).include(include).run()


def _failed(rows):
    return {(r.case, r.quantity) for r in rows if r.status == "failed"}


@pytest.mark.parametrize("mutant, include, quantity", [
    (TieFlip, "ties", "plan/slot_token"),
    (SoftmaxWrongAxis, "token_choice__k2_cf1", "plan/slot_weight"),
    (UnstableArgsort, "token_choice__k2_cf0.5_drop", "plan/slot_token"),
    (ScatterKeepsLastWrite, "token_choice__k2_dropless", "y"),
])
def test_broken_backend_fails_the_suite(mutant, include, quantity):
    failed = _failed(_rows(mutant(), include))
    assert any(q == quantity for _, q in failed), sorted(failed)


def test_correct_backend_passes_the_same_selection():
    assert not _failed(_rows(NumpyOps(), "ties|token_choice__k2"))


@pytest.mark.parametrize("cls, include", [(TokenChoice, "token_choice__k2_cf0.5"),
                                          (ExpertChoice, "expert_choice__cf0.5")])
def test_capacity_off_by_one_fails(monkeypatch, cls, include):
    original = cls.slots
    monkeypatch.setattr(cls, "slots", lambda self, n: original(self, n) + 1)
    failed = _failed(_rows(NumpyOps(), include))
    assert any(q == "plan/slot_token" for _, q in failed), sorted(failed)


def test_k_major_order_replaced_by_token_major_fails(monkeypatch):
    def token_major(ops, v, order3, G, N):  # all of token 0's choices, then token 1's, ...
        return ops.reshape(ops.take_along_axis(v, order3, axis=1), (G, N))
    monkeypatch.setattr(routing, "_k_major", token_major)
    failed = _failed(_rows(NumpyOps(), "token_choice__k2_cf0.5_drop-position"))
    assert ("token_choice__k2_cf0.5_drop-position", "plan/slot_token") in failed


def _wrap(monkeypatch, module, name, make):
    original = getattr(module, name)
    monkeypatch.setattr(module, name, make(original))


def test_missing_renormalisation_fails(monkeypatch):
    from dataclasses import replace

    _wrap(monkeypatch, routing, "_token_choice",
          lambda orig: lambda spec, *a: orig(replace(spec, renormalize=False), *a))
    failed = _failed(_rows(NumpyOps(), "renormalize"))
    assert ("token_choice__k2_dropless_renormalize", "plan/slot_weight") in failed


def test_soft_moe_combine_normalised_per_expert_fails(monkeypatch):
    def per_expert(orig):
        def soft(spec, x, params, ops, *a):
            plan = orig(spec, x, params, ops, *a)
            G, S, EP = plan.combine.shape
            logits = np.log(plan.combine).reshape(G, S, spec.num_experts, -1)
            plan.combine = ops.softmax(logits, axis=-1).reshape(G, S, EP)
            return plan
        return soft
    _wrap(monkeypatch, routing, "_soft_moe", per_expert)
    failed = _failed(_rows(NumpyOps(), "soft_moe__p2"))
    assert ("soft_moe__p2_B2", "plan/combine") in failed and ("soft_moe__p2_B2", "y") in failed


def test_mod_residual_added_twice_fails(monkeypatch):
    from moe_min import layers

    _wrap(monkeypatch, layers, "apply_mod", lambda orig: lambda ops, b, p, x, plan:
          orig(ops, b, p, x, plan) + x)
    failed = _failed(_rows(NumpyOps(), "mixture_of_depths__cap0.5_sigmoid"))
    assert ("mixture_of_depths__cap0.5_sigmoid_B2", "y") in failed


def test_predictor_fed_the_block_output_fails(monkeypatch):
    from moe_min.conformance import runner

    def fed_output(orig):
        def forward(spec, x, params, ops, **kw):
            out = orig(spec, x, params, ops, **kw)
            return orig(spec, x, params, ops, **{**kw, "x_predictor": out["y"]})
        return forward
    _wrap(monkeypatch, runner, "forward", fed_output)
    failed = _failed(_rows(NumpyOps(), "mixture_of_depths__causal_predictor"))
    case = "mixture_of_depths__causal_predictor"
    assert (case, "predictor/logits") in failed and (case, "aux/predictor") in failed


def test_router_gradient_dropped_fails(monkeypatch, autodiff_ops):
    ops = autodiff_ops
    _wrap(monkeypatch, routing, "_in_time_order", lambda orig: lambda o, chosen, weight:
          orig(o, chosen, o.stop_gradient(weight)))
    failed = _failed(Runner(ops).include("mixture_of_depths__cap0.25_train").run())
    assert ("mixture_of_depths__cap0.25_train", "grad/router_w") in failed
