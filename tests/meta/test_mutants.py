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
    def argsort(self, x, axis=-1, descending=False):  # quicksort-like: equal keys reversed
        idx = super().argsort(np.flip(x, axis=axis), axis=axis, descending=descending)
        return np.flip(x.shape[axis] - 1 - idx, axis=axis)


class ScatterKeepsLastWrite(NumpyOps):
    def scatter_add(self, x, idx, src, axis):  # plain assignment: repeated indices keep one
        out = np.array(x, copy=True)
        np.put_along_axis(out, idx, np.take_along_axis(out, idx, axis) + src, axis)
        return out


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
