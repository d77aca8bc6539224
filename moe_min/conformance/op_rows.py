"""Per-op rows: small hand-checked cases for every array op of the contract (moe_min/ops.py),
run before the corpus, so a broken op fails under its own name before the cases that use it.

Each `OpCase` calls one op on a few values and states the answer, written out by hand (or by
plain NumPy on literal data where a transposition is clearer than a table); nothing here
calls the backend to produce an expectation. The answer's NumPy dtype also states the kind the
result must have ("float", "int", "bool"). Rows are named `op`, `<op>/<subcase>`; the training
hooks have their own rows (hooks.py). May import: moe_min.ops, moe_min.conformance.rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_min.conformance.rows import Recorder, Row, compare, one_line

EXACT = (0.0, 0.0)  # integers, booleans, data moved without arithmetic, small exact sums
# float32 compute: 1e-5 relative is ~80 ulps, 1e-6 absolute covers results that should be 0
# (cos(π/2) from a float32 π) and tinygrad's erf (|error| < 1.5e-7)
FLOAT = (1e-5, 1e-6)


@dataclass(frozen=True)
class OpCase:
    op: str  # the contract op under test
    name: str  # the subcase
    why: str  # what the row pins down, shown when it fails
    run: Callable[[Any], Any]  # ops -> the op's result (a tuple where `parts` names them)
    want: Any  # np.ndarray, or a tuple of them; its dtype kind is the kind asked for
    tol: tuple = EXACT
    parts: tuple[str, ...] = ()  # names of a tuple result's parts (top_k: values, indices)
    host: bool = False  # the result is a host value (to_numpy, all_finite): not converted
    autodiff: bool = False  # needs ops.grad: NotImplementedError means "n/a"

    @property
    def quantity(self) -> str:
        return f"{self.op}/{self.name}"


def _f(v):
    return np.array(v, np.float64)


def _i(v):
    return np.array(v, np.int64)


def _b(v):
    return np.array(v, bool)


def _a(o, v, dtype=None):
    """A backend array from literal values (floats -> "float", ints -> "int", bools -> "bool")."""
    return o.asarray(np.array(v), dtype)


def _grad(o, fn, w, x):
    g = o.grad(fn, {"w": _a(o, w)}, _a(o, x))
    return g["w"], g["x"]


def _scatter_and_x(o, x, idx, src):
    """scatter_add's result and x itself afterwards (the op must not write into x)."""
    x = _a(o, x)
    return o.scatter_add(x, _a(o, idx), _a(o, src), 0), x


X23 = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
X234 = np.arange(24.0).reshape(2, 3, 4)
TIES = [3.0, 1.0, 2.0, 1.0, 3.0]
E, PI = math.e, math.pi

CASES = [
    # conversion and creation: asarray(x, dtype=None) maps NumPy kinds to the contract's
    OpCase("asarray", "float-kind", "dtype=None: a float array becomes 'float'",
           lambda o: _a(o, [1.5, -2.0]), _f([1.5, -2.0])),
    OpCase("asarray", "int-kind", "dtype=None: an int64 array becomes 'int'",
           lambda o: _a(o, [3, -1]), _i([3, -1])),
    OpCase("asarray", "int32-kind", "dtype=None: an int32 array becomes 'int' too",
           lambda o: o.asarray(np.array([7, 0], np.int32)), _i([7, 0])),
    OpCase("asarray", "bool-kind", "dtype=None: a bool array becomes 'bool'",
           lambda o: _a(o, [True, False]), _b([True, False])),
    OpCase("asarray", "explicit-float", "dtype='float' converts ints",
           lambda o: _a(o, [1, 2], "float"), _f([1.0, 2.0])),
    OpCase("asarray", "backend-array", "asarray of a backend array keeps values and kind",
           lambda o: o.asarray(_a(o, [[1, 2]])), _i([[1, 2]])),
    OpCase("asarray", "scalar", "a 0-d array stays 0-d",
           lambda o: _a(o, 2.5), _f(2.5)),
    OpCase("to_numpy", "ndarray", "to_numpy returns a NumPy array of the same shape",
           lambda o: o.to_numpy(_a(o, X23)), _f(X23), host=True),
    OpCase("zeros", "float", "default dtype is 'float'", lambda o: o.zeros((2, 3)),
           _f(np.zeros((2, 3)))),
    OpCase("zeros", "int", "dtype='int'", lambda o: o.zeros((3,), "int"), _i([0, 0, 0])),
    OpCase("zeros", "bool", "dtype='bool' is all False", lambda o: o.zeros((2,), "bool"),
           _b([False, False])),
    OpCase("zeros", "scalar", "shape () is a 0-d array", lambda o: o.zeros(()), _f(0.0)),
    OpCase("arange", "int", "0..n-1 in the int dtype", lambda o: o.arange(4), _i([0, 1, 2, 3])),
    OpCase("astype", "bool-to-int", "True -> 1", lambda o: o.astype(_a(o, [True, False]), "int"),
           _i([1, 0])),
    OpCase("astype", "int-to-float", "positions to float (RoPE)",
           lambda o: o.astype(_a(o, [2, -3]), "float"), _f([2.0, -3.0])),
    OpCase("astype", "float-to-int", "whole floats (counts) to ints",
           lambda o: o.astype(_a(o, [3.0, 0.0, 2.0]), "int"), _i([3, 0, 2])),
    OpCase("astype", "bool-to-float", "a mask to 1.0 / 0.0",
           lambda o: o.astype(_a(o, [True, False]), "float"), _f([1.0, 0.0])),
    # shape
    OpCase("reshape", "row-major", "(2, 3) -> (3, 2) in row-major order",
           lambda o: o.reshape(_a(o, X23), (3, 2)), _f([[1, 2], [3, 4], [5, 6]])),
    OpCase("reshape", "to-scalar", "(1,) -> ()", lambda o: o.reshape(_a(o, [4.0]), ()), _f(4.0)),
    OpCase("transpose", "2d", "out[j, i] = x[i, j]", lambda o: o.transpose(_a(o, X23), (1, 0)),
           _f([[1, 4], [2, 5], [3, 6]])),
    OpCase("transpose", "3d", "axes (1, 2, 0): out[j, k, i] = x[i, j, k]",
           lambda o: o.transpose(_a(o, X234), (1, 2, 0)), np.transpose(X234, (1, 2, 0))),
    OpCase("concatenate", "axis0", "rows appended",
           lambda o: o.concatenate([_a(o, X23), _a(o, [[7.0, 8.0, 9.0]])], 0),
           _f(X23 + [[7, 8, 9]])),
    OpCase("concatenate", "axis-1-int", "negative axis; ints stay ints",
           lambda o: o.concatenate([_a(o, [[1], [2]]), _a(o, [[3, 4], [5, 6]])], -1),
           _i([[1, 3, 4], [2, 5, 6]])),
    OpCase("broadcast_to", "row", "(1, 3) -> (2, 3)",
           lambda o: o.broadcast_to(_a(o, [[1.0, 2.0, 3.0]]), (2, 3)), _f([[1, 2, 3]] * 2)),
    OpCase("broadcast_to", "new-axis", "(2,) -> (3, 2): leading axes added",
           lambda o: o.broadcast_to(_a(o, [5, 6]), (3, 2)), _i([[5, 6]] * 3)),
    # elementwise (expected values: the functions' values to 16 digits)
    OpCase("exp", "values", "e^x to float32 precision",
           lambda o: o.exp(_a(o, [0.0, 1.0, -1.0, -50.0])),
           _f([1.0, E, 1 / E, 1.9287498479639178e-22]), FLOAT),
    OpCase("log", "values", "natural log, tiny inputs too",
           lambda o: o.log(_a(o, [1.0, E, 0.5, 1e-30])),
           _f([0.0, 1.0, -0.6931471805599453, -69.07755278982137]), FLOAT),
    OpCase("sqrt", "values", "sqrt(0) is 0", lambda o: o.sqrt(_a(o, [0.0, 4.0, 2.0, 1e-6])),
           _f([0.0, 2.0, 1.4142135623730951, 1e-3]), FLOAT),
    OpCase("tanh", "values", "large |x| saturates to ±1, no NaN",
           lambda o: o.tanh(_a(o, [0.0, 0.5, -1.0, 20.0, -20.0])),
           _f([0.0, 0.46211715726000974, -0.7615941559557649, 1.0, -1.0]), FLOAT),
    OpCase("erf", "values", "the exact erf (gelu), not an approximation",
           lambda o: o.erf(_a(o, [0.0, 0.5, -1.0, 3.0])),
           _f([0.0, 0.5204998778130465, -0.8427007929497149, 0.9999779095030014]), FLOAT),
    OpCase("sigmoid", "values", "large |x| gives 0 or 1, no NaN",
           lambda o: o.sigmoid(_a(o, [0.0, 2.0, -2.0, 100.0, -100.0])),
           _f([0.5, 0.8807970779778823, 0.11920292202211755, 1.0, 0.0]), FLOAT),
    OpCase("cos", "values", "radians (RoPE angles)",
           lambda o: o.cos(_a(o, [0.0, PI / 2, PI, 1.0, 10.0])),
           _f([1.0, 0.0, -1.0, 0.5403023058681398, -0.8390715290764524]), (1e-5, 1e-5)),
    OpCase("sin", "values", "radians (RoPE angles)",
           lambda o: o.sin(_a(o, [0.0, PI / 2, PI, 1.0, 10.0])),
           _f([0.0, 1.0, 0.0, 0.8414709848078965, -0.5440211108893698]), (1e-5, 1e-5)),
    OpCase("maximum", "scalar", "relu: maximum(x, 0.0)",
           lambda o: o.maximum(_a(o, [-1.0, 0.5, 2.0]), 0.0), _f([0.0, 0.5, 2.0])),
    OpCase("maximum", "broadcast", "(2, 1) against (1, 3)",
           lambda o: o.maximum(_a(o, [[1.0], [3.0]]), _a(o, [[0.0, 2.0, 4.0]])),
           _f([[1, 2, 4], [3, 3, 4]])),
    OpCase("where", "broadcast", "cond (2, 1), a (1, 3), b a Python float",
           lambda o: o.where(_a(o, [[True], [False]]), _a(o, [[1.0, 2.0, 3.0]]), 0.0),
           _f([[1, 2, 3], [0, 0, 0]])),
    OpCase("where", "int-scalars", "two Python ints give an 'int' array",
           lambda o: o.where(_a(o, [True, False, True]), 0, 1), _i([0, 1, 0])),
    OpCase("where", "int-array", "an int array and -1 stay 'int'",
           lambda o: o.where(_a(o, [True, False]), _a(o, [4, 5]), -1), _i([4, -1])),
    # reductions
    OpCase("sum", "all", "axis=None: every element, a 0-d result",
           lambda o: o.sum(_a(o, X23)), _f(21.0)),
    OpCase("sum", "axis0", "over the first axis",
           lambda o: o.sum(_a(o, X23), axis=0), _f([5, 7, 9])),
    OpCase("sum", "keepdims", "the summed axis kept as size 1",
           lambda o: o.sum(_a(o, X23), axis=-1, keepdims=True), _f([[6], [15]])),
    OpCase("sum", "int", "a sum of ints stays 'int'",
           lambda o: o.sum(_a(o, [[1, 2], [3, 4]]), axis=-1), _i([3, 7])),
    OpCase("mean", "all", "axis=None: a 0-d result", lambda o: o.mean(_a(o, X23)), _f(3.5), FLOAT),
    OpCase("mean", "keepdims", "the averaged axis kept as size 1",
           lambda o: o.mean(_a(o, X23), axis=1, keepdims=True),
           _f([[2.0], [5.0]]), FLOAT),
    OpCase("max", "axis", "negative values too",
           lambda o: o.max(_a(o, [[1.0, 5.0, 3.0], [-2.0, -7.0, -1.0]]), axis=-1),
           _f([5.0, -1.0])),
    OpCase("max", "all-keepdims", "the reduced axis kept as size 1",
           lambda o: o.max(_a(o, X23), axis=0, keepdims=True), _f([[4, 5, 6]])),
    OpCase("logsumexp", "large", "no overflow at 1000: 1000 + ln 2; no underflow to -inf",
           lambda o: o.logsumexp(_a(o, [[1000.0, 1000.0], [-1000.0, 0.0]]), axis=-1),
           _f([1000.6931471805599, 0.0]), FLOAT),
    OpCase("logsumexp", "keepdims", "ln(1 + 3) along axis 0",
           lambda o: o.logsumexp(_a(o, [[0.0], [math.log(3.0)]]), axis=0, keepdims=True),
           _f([[math.log(4.0)]]), FLOAT),
    OpCase("softmax", "large", "no overflow at 1000",
           lambda o: o.softmax(_a(o, [[1000.0, 1000.0, 0.0]]), axis=-1), _f([[0.5, 0.5, 0.0]]),
           FLOAT),
    OpCase("softmax", "axis0", "over the first axis: [1, 3] / 4",
           lambda o: o.softmax(_a(o, [[0.0, 0.0], [math.log(3.0), 0.0]]), axis=0),
           _f([[0.25, 0.5], [0.75, 0.5]]), FLOAT),
    OpCase("softmax", "masked", "a -1e9 floor (attention's mask) gets weight 0",
           lambda o: o.softmax(_a(o, [-1e9, 0.0, 0.0]), axis=-1), _f([0.0, 0.5, 0.5]), FLOAT),
    OpCase("all_finite", "finite", "a Python bool", lambda o: o.all_finite(_a(o, X23)),
           np.bool_(True), host=True),
    OpCase("all_finite", "inf", "inf is not finite", lambda o: o.all_finite(_a(o, [1.0, np.inf])),
           np.bool_(False), host=True),
    OpCase("all_finite", "nan", "NaN is not finite", lambda o: o.all_finite(_a(o, [np.nan, 1.0])),
           np.bool_(False), host=True),
    # order and indexing
    OpCase("matmul", "2d", "a plain matrix product",
           lambda o: o.matmul(_a(o, [[1.0, 2.0], [3.0, 4.0]]), _a(o, [[5.0, 6.0], [7.0, 8.0]])),
           _f([[19, 22], [43, 50]])),
    OpCase("matmul", "batched-by-2d", "(2, 1, 2) @ (2, 3): the matrix broadcasts",
           lambda o: o.matmul(_a(o, [[[1.0, 2.0]], [[0.0, -1.0]]]), _a(o, X23)),
           _f([[[9, 12, 15]], [[-4, -5, -6]]])),
    OpCase("matmul", "batched", "(2, 1, 2) @ (2, 2, 1): one product per batch entry",
           lambda o: o.matmul(_a(o, [[[1.0, 2.0]], [[3.0, 4.0]]]),
                              _a(o, [[[1.0], [1.0]], [[2.0], [0.0]]])), _f([[[3]], [[6]]])),
    OpCase("argsort", "ascending-ties", "stable: equal keys keep index order",
           lambda o: o.argsort(_a(o, TIES)), _i([1, 3, 2, 0, 4])),
    OpCase("argsort", "descending-ties", "stable in descending order too: ties by index",
           lambda o: o.argsort(_a(o, TIES), descending=True), _i([0, 4, 2, 1, 3])),
    OpCase("argsort", "int-keys", "int keys (the lowering sorts where(chosen, 0, 1))",
           lambda o: o.argsort(_a(o, [[1, 0, 1, 0]]), axis=-1), _i([[1, 3, 0, 2]])),
    OpCase("argsort", "axis0", "along the first axis, each column alone",
           lambda o: o.argsort(_a(o, [[2.0, 1.0], [1.0, 1.0], [2.0, 0.0]]), axis=0),
           _i([[1, 2], [0, 0], [2, 1]])),
    OpCase("top_k", "ties", "descending; equal values: lower index first",
           lambda o: o.top_k(_a(o, [[1.0, 3.0, 3.0, 2.0]]), 2),
           (_f([[3.0, 3.0]]), _i([[1, 2]])), parts=("values", "indices")),
    OpCase("top_k", "tie-at-the-cut", "three equal candidates for one place: the lowest index",
           lambda o: o.top_k(_a(o, [2.0, 5.0, 2.0, 2.0]), 2),
           (_f([5.0, 2.0]), _i([1, 0])), parts=("values", "indices")),
    OpCase("top_k", "axis0", "along the first axis, each column alone",
           lambda o: o.top_k(_a(o, [[1.0, 4.0], [3.0, 4.0], [3.0, 0.0]]), 2, axis=0),
           (_f([[3.0, 4.0], [3.0, 4.0]]), _i([[1, 0], [2, 1]])), parts=("values", "indices")),
    OpCase("top_k", "3d-last-axis", "k = n on (1, 2, 3): a full stable descending sort",
           lambda o: o.top_k(_a(o, [[[0.5, 0.5, 1.0], [0.0, 2.0, 0.0]]]), 3),
           (_f([[[1.0, 0.5, 0.5], [2.0, 0.0, 0.0]]]), _i([[[2, 0, 1], [1, 0, 2]]])),
           parts=("values", "indices")),
    OpCase("take", "repeated-rows", "whole rows, an index repeated; the last row reachable",
           lambda o: o.take(_a(o, [[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), _a(o, [2, 0, 2]), 0),
           _f([[5, 6], [1, 2], [5, 6]])),
    OpCase("take", "2d-index", "an index of any shape: out has idx's shape + the rest",
           lambda o: o.take(_a(o, [[1.0, 2.0], [3.0, 4.0]]), _a(o, [[1, 1], [0, 1]]), 0),
           _f([[[3, 4], [3, 4]], [[1, 2], [3, 4]]])),
    OpCase("take", "axis1", "columns: whole slices along axis 1",
           lambda o: o.take(_a(o, X23), _a(o, [2, 0]), 1), _f([[3, 1], [6, 4]])),
    OpCase("take_along_axis", "same-shape", "out[i, j] = x[i, idx[i, j]]",
           lambda o: o.take_along_axis(_a(o, X23), _a(o, [[2, 0], [1, 1]]), -1),
           _f([[3, 1], [5, 5]])),
    OpCase("take_along_axis", "broadcast-index", "idx (2, 2, 1) on x (2, 3, 2), axis 1: idx "
           "broadcasts on the last axis",
           lambda o: o.take_along_axis(_a(o, X234[:, :, :2]), _a(o, [[[2], [0]], [[1], [1]]]), 1),
           _f([[[8, 9], [0, 1]], [[16, 17], [16, 17]]])),
    OpCase("take_along_axis", "int", "ints stay ints",
           lambda o: o.take_along_axis(_a(o, [[10, 20, 30]]), _a(o, [[2, 2, 0]]), 1),
           _i([[30, 30, 10]])),
    OpCase("scatter_add", "repeated", "repeated indices accumulate (1 + 2 at index 1)",
           lambda o: o.scatter_add(o.zeros((4,)), _a(o, [1, 1, 3]), _a(o, [1.0, 2.0, 5.0]), 0),
           _f([0, 3, 0, 5])),
    OpCase("scatter_add", "copy-of-x", "adds to x's values and leaves x itself unchanged",
           lambda o: _scatter_and_x(o, [1.0, 1.0, 1.0, 1.0], [3, 0, 3], [1.0, 2.0, 4.0]),
           (_f([3, 1, 1, 6]), _f([1, 1, 1, 1])), parts=("result", "x afterwards")),
    OpCase("scatter_add", "int-counts", "counting: int zeros + int ones per index, per row",
           lambda o: o.scatter_add(o.zeros((2, 3), "int"), _a(o, [[0, 0, 2], [1, 1, 1]]),
                                   _a(o, [[1, 1, 1], [1, 1, 1]]), -1), _i([[2, 0, 1], [0, 3, 0]])),
    OpCase("scatter_add", "rows-axis1", "idx (1, 3, 2) on x (1, 3, 2) along axis 1: rows summed",
           lambda o: o.scatter_add(o.zeros((1, 3, 2)), _a(o, [[[2, 2], [0, 0], [2, 2]]]),
                                   _a(o, [[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]]), 1),
           _f([[[3, 4], [0, 0], [6, 8]]])),
    OpCase("scatter_add", "shorter-index", "idx shorter than x on the axis: (1, 2) into (1, 4)",
           lambda o: o.scatter_add(o.zeros((1, 4)), _a(o, [[3, 3]]), _a(o, [[0.5, 0.25]]), 1),
           _f([[0, 0, 0, 0.75]])),
    OpCase("cumsum", "inclusive", "inclusive: out[i] = x[0] + ... + x[i]",
           lambda o: o.cumsum(_a(o, [1.0, 2.0, 3.0, 4.0]), 0), _f([1, 3, 6, 10])),
    OpCase("cumsum", "int-last-axis", "ints stay ints; each row alone",
           lambda o: o.cumsum(_a(o, [[1, 0, 2], [3, 3, 0]]), -1), _i([[1, 1, 3], [3, 6, 6]])),
    OpCase("cumsum", "axis0", "down the first axis",
           lambda o: o.cumsum(_a(o, X23), 0), _f([[1, 2, 3], [5, 7, 9]])),
    OpCase("stop_gradient", "forward", "the values pass unchanged",
           lambda o: o.stop_gradient(_a(o, X23)), _f(X23)),
    OpCase("stop_gradient", "cuts-gradient", "d/dw Σ sg(w·x)·w + x = sg(w·x), not 2·w·x",
           lambda o: _grad(o, lambda p, x: o.sum(o.stop_gradient(p["w"] * x) * p["w"] + x),
                           [1.0, 2.0], [3.0, 4.0]),
           (_f([3.0, 8.0]), _f([1.0, 1.0])), FLOAT, parts=("grad w", "grad x"), autodiff=True),
    OpCase("round_bfloat16", "ties-to-even", "8 mantissa bits; halfway cases go to the even one",
           lambda o: o.round_bfloat16(_a(o, [1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20,
                                             -(1 + 2**-8), 3.0, 0.0])),
           _f([1.0, 1.0, 1 + 2**-6, 1 + 2**-7, -1.0, 3.0, 0.0])),
    OpCase("round_bfloat16", "straight-through", "the gradient passes through the rounding",
           lambda o: _grad(o, lambda p, x: o.sum(o.round_bfloat16(p["w"]) * x),
                           [1 + 2**-8, 3.0], [2.0, -1.0]),
           (_f([2.0, -1.0]), _f([1.0, 3.0])), FLOAT, parts=("grad w", "grad x"), autodiff=True),
]


_KIND = {"f": "float", "i": "int", "b": "bool"}


def _part(ops, case: OpCase, got, want) -> tuple[float | None, bool, str]:
    """(max abs error, passed, detail) for one part of a result."""
    if case.host and not isinstance(got, (np.ndarray, bool, np.bool_)):
        return None, False, f"a {type(got).__name__}, expected a host value (NumPy array or bool)"
    got = np.asarray(got if case.host else ops.to_numpy(got))
    kinds = {"f": "f", "i": "iu", "b": "b"}[want.dtype.kind]
    if got.dtype.kind not in kinds:
        return None, False, f"dtype {got.dtype}, expected a {_KIND[want.dtype.kind]!r} array"
    return compare(got, want, case.tol)


def check(ops, case: OpCase) -> Row:
    """One per-op row: the op's result against the hand-written answer."""
    try:
        got = case.run(ops)
        wants = case.want if case.parts else (case.want,)
        gots = tuple(got) if case.parts else (got,)
        if len(gots) != len(wants):
            return Row("op", case.quantity, None, case.tol, "failed",
                       f"{len(gots)} results, expected {len(wants)} ({', '.join(case.parts)})")
        parts = [_part(ops, case, g, w) for g, w in zip(gots, wants)]
    except NotImplementedError as e:
        return Row("op", case.quantity, None, None, "n/a" if case.autodiff else "unsupported",
                   one_line(e))
    except Exception as e:  # a crash in one op is that op's row, and the run goes on
        return Row("op", case.quantity, None, case.tol, "failed", one_line(e))
    errors = [e for e, _, _ in parts]
    error = None if None in errors else max(errors)
    ok = all(p[1] for p in parts)
    shown = [(f"{name}: " if name else "") + d
             for name, (_, passed, d) in zip(case.parts or ("",), parts) if ok or not passed]
    why = f"; why: {case.why}" if case.why and not ok else ""
    return Row("op", case.quantity, error, case.tol, "passed" if ok else "failed",
               "; ".join(shown) + why)


def op_rows(ops, only: str | None = None) -> list[Row]:
    """Every per-op row (or those of the op `only`), in contract order; an op the backend
    lacks is one row, `missing: <op>`."""
    rows, missing = [], set()
    for case in CASES:
        if case.op in missing or only not in (None, case.op):
            continue
        if not callable(getattr(ops, case.op, None)):
            missing.add(case.op)
            rows.append(Row("op", case.op, None, None, "failed", f"missing: {case.op}"))
            continue
        rows.append(check(Recorder(ops), case))
    return rows
