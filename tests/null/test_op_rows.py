"""The per-op and hook rows themselves: every contract op has rows, their hand-written answers
hold on the NumPy backend in float64 and float32, and the recorder names what was used."""

from __future__ import annotations

import numpy as np
import pytest

from moe_min.backends.ops_numpy import NumpyOps
from moe_min.conformance.hooks import HOOKS, hook_rows
from moe_min.conformance.op_rows import CASES, op_rows
from moe_min.conformance.rows import MissingOp, Recorder
from moe_min.ops import CONTRACT


def test_every_contract_op_has_rows_of_its_own():
    covered = {c.op for c in CASES} | set(HOOKS)
    assert covered == set(CONTRACT), sorted(set(CONTRACT) ^ covered)
    names = [c.quantity for c in CASES]
    assert len(names) == len(set(names)), "two op rows share a name"


def test_op_rows_follow_the_contract_order():
    order = [c.op for c in CASES]
    assert sorted(dict.fromkeys(order), key=CONTRACT.index) == list(dict.fromkeys(order))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numpy_passes_every_op_row_without_autodiff_ones(dtype):
    rows = op_rows(NumpyOps(dtype=dtype))
    assert len(rows) == len(CASES)
    bad = [(r.quantity, r.status, r.detail) for r in rows if r.status != "passed"]
    assert bad == [(c.quantity, "n/a", "NotImplementedError: grad: the numpy backend has no "
                    "autodiff") for c in CASES if c.autodiff]


def test_numpy_hook_rows_pass_or_are_na_for_autodiff():
    rows = {r.quantity: r.status for r in hook_rows(NumpyOps(), [])}
    assert rows == {"grad/quadratic": "n/a", "value_and_grad/quadratic": "n/a",
                    "compile/equals-fn": "passed", "seed/reproducible": "passed",
                    "normal/seeds-differ": "passed", "normal/moments": "passed",
                    "save/safetensors-file": "passed", "load/round-trip": "passed"}


def test_a_wrong_kind_fails_the_row_that_asks_for_it():
    class FloatArange(NumpyOps):
        def arange(self, n):
            return np.arange(n, dtype=np.float64)
    rows = {r.quantity: r for r in op_rows(FloatArange(), only="arange")}
    assert rows["arange/int"].status == "failed"
    assert rows["arange/int"].detail.startswith("dtype float64, expected a 'int' array")


def test_the_recorder_names_the_ops_called_and_a_missing_one():
    class NoErf:
        def __getattr__(self, name):
            if name == "erf":
                raise AttributeError(name)
            return getattr(NumpyOps(), name)
    ops = Recorder(NoErf())
    ops.softmax(ops.asarray(np.zeros(3)), axis=-1)
    with pytest.raises(MissingOp, match="^missing: erf$"):
        ops.erf(ops.asarray(np.zeros(3)))
    assert ops.uses() == ["asarray", "erf", "softmax"] and ops.name == "numpy"
    assert getattr(ops, "grouped_mlp", None) is None and ops.uses()[-1] == "softmax"


def test_test_functions_give_a_backend_one_test_per_op_and_one_for_the_hooks():
    class ExclusiveCumsum(NumpyOps):
        def cumsum(self, x, axis):
            return np.cumsum(x, axis=axis) - x
    from moe_min.conformance.runner import Runner

    tests = Runner(ExclusiveCumsum()).include("^soft_moe__p1$").test_functions()
    assert {"test_conformance__op__cumsum", "test_conformance__op__top_k",
            "test_conformance__hooks", "test_conformance__soft_moe__p1"} <= set(tests)
    assert len(tests) == len({c.op for c in CASES}) + 2
    tests["test_conformance__op__top_k"]()
    tests["test_conformance__hooks"]()
    with pytest.raises(AssertionError, match="cumsum/inclusive: 4/4 elements off"):
        tests["test_conformance__op__cumsum"]()
