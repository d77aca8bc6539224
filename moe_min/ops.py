"""The backend contract: the small set of array operations the lowering and the models use,
and the registry that finds backends by name through the `moe_min.backends` entry points.

Names and arguments follow NumPy, so an adapter reads as a lookup table. Ties and order are
part of the contract (see each method). Arrays also support `+ - * / @`, unary minus,
comparisons, `.shape` and basic slicing; everything else goes through these methods.
May import: stdlib, numpy, moe_min.spec.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Protocol

ENTRY_POINT_GROUP = "moe_min.backends"
Array = Any


@dataclass(frozen=True)
class Caps:
    """What a backend can do, reported by `moe-min info` and used by the conformance runner."""

    autodiff: bool = False
    jit: bool = False
    float64: bool = False
    devices: tuple[str, ...] = ("cpu",)


class Ops(Protocol):
    """The array operations a backend provides. Dtypes are named "float", "int", "bool"; the
    backend maps them (float is its compute dtype, int its index dtype)."""

    name: str
    device: str
    caps: Caps

    # conversion and creation
    def asarray(self, x, dtype: str | None = None) -> Array:
        """x (a NumPy array, a Python scalar or list, or one of the backend's own arrays) as a
        backend array. dtype=None keeps the kind: any float is "float", any signed or unsigned
        int is "int", bool is "bool" (so NumPy float64 becomes the backend's float)."""
    def to_numpy(self, x: Array): ...
    def zeros(self, shape: tuple[int, ...], dtype: str = "float") -> Array: ...
    def arange(self, n: int) -> Array: ...  # int dtype
    def astype(self, x: Array, dtype: str) -> Array: ...

    # shape
    def reshape(self, x: Array, shape: tuple[int, ...]) -> Array: ...
    def transpose(self, x: Array, axes: tuple[int, ...]) -> Array: ...
    def concatenate(self, xs: list[Array], axis: int) -> Array: ...
    def broadcast_to(self, x: Array, shape: tuple[int, ...]) -> Array: ...

    # elementwise
    def exp(self, x: Array) -> Array: ...
    def log(self, x: Array) -> Array: ...
    def sqrt(self, x: Array) -> Array: ...
    def tanh(self, x: Array) -> Array: ...
    def erf(self, x: Array) -> Array: ...
    def sigmoid(self, x: Array) -> Array: ...
    def cos(self, x: Array) -> Array: ...
    def sin(self, x: Array) -> Array: ...
    def maximum(self, a: Array, b) -> Array: ...
    def where(self, cond: Array, a, b) -> Array: ...

    # reductions (axis=None: all elements)
    def sum(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array: ...
    def mean(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array: ...
    def max(self, x: Array, axis: int | None = None, keepdims: bool = False) -> Array: ...
    def logsumexp(self, x: Array, axis: int, keepdims: bool = False) -> Array: ...
    def softmax(self, x: Array, axis: int) -> Array: ...
    def all_finite(self, x: Array) -> bool: ...

    # order and indexing
    def matmul(self, a: Array, b: Array) -> Array: ...
    def argsort(self, x: Array, axis: int = -1, descending: bool = False) -> Array:
        """Stable: equal elements keep their index order, in both directions."""

    def top_k(self, x: Array, k: int, axis: int = -1) -> tuple[Array, Array]:
        """(values, indices) of the k largest along axis, descending; ties: lower index first."""

    def take(self, x: Array, idx: Array, axis: int) -> Array:
        """NumPy's take: whole slices of x at the integer positions idx (any shape) along axis;
        the cheap row gather that buffers and combines use. Indices are in [0, n): the
        lowering never passes -1 (an empty slot reads an appended zero row instead)."""

    def take_along_axis(self, x: Array, idx: Array, axis: int) -> Array:
        """NumPy's take_along_axis; idx has x's ndim and broadcasts on the other axes."""

    def scatter_add(self, x: Array, idx: Array, src: Array, axis: int) -> Array:
        """A copy of x with src[..., i, ...] added at idx[..., i, ...] along axis (idx and src
        have one shape, which is x's on every other axis; idx may be shorter or longer than x
        along axis); repeated indices accumulate; indices in [0, n), never -1. Differentiable
        in x and src."""

    def cumsum(self, x: Array, axis: int) -> Array: ...
    def stop_gradient(self, x: Array) -> Array: ...
    def round_bfloat16(self, x: Array) -> Array:
        """x rounded to the nearest bfloat16 (ties to even), kept in the compute dtype; the
        gradient passes straight through, as a framework's cast does."""

    # training hooks: a backend without autodiff raises NotImplementedError (rows say "n/a")
    def grad(self, fn, params: dict, x: Array) -> dict:
        """Gradients of the scalar fn(params, x) w.r.t. every entry of params and x ("x")."""

    def value_and_grad(self, fn):
        """fn(params, *args) -> scalar  becomes  (params, *args) -> (value, grads of params)."""

    def compile(self, fn):
        """A compiled/jitted fn with the same results (identity where there is no jit)."""

    def seed(self, seed: int) -> None: ...
    def normal(self, shape: tuple[int, ...]) -> Array:
        """Standard-normal draws from the backend's seeded generator."""

    def save(self, path: str, tensors: dict) -> None:
        """One safetensors file at exactly `path` (F32/F64, I32/I64, BOOL, ...), readable by
        any safetensors reader; moe_min.tensorio writes one with NumPy alone."""

    def load(self, path: str) -> dict:
        """{name: backend array} from a safetensors file, kinds kept (float, int)."""


# Optional fused ops: a backend may provide them; the lowering uses one when present and its
# composite otherwise (layers.py, grouped.py), and the conformance runner holds each to its
# composite, forward and gradient (moe_min/conformance/fused.py).
# grouped_mlp(x (N, D) sorted by expert, expert (N,), w1, w2, w3 | None, act) -> (N, D):
#   each row through its expert's MLP (moe_min/grouped.py: dropless token choice at T·K work).
# take_rows(x (N, D), idx (M,), back (N, J)) -> take(x, idx, axis=0), whose gradient is a
#   gather instead of a scatter: back lists, for each row of x, the positions of idx that read
#   it, padded with M; the VJP is dx[n] = Σ_j g[back[n, j]] (g with a zero row M appended).
#   A row read at a position back leaves out gets no gradient from it: callers leave out only
#   positions whose cotangent is zero or rows that are padding, not x.
# scatter_rows(x (N, D), rows (M,), src (M, D)) -> x with src[i] added to row rows[i] (repeats
#   accumulate): scatter_add with one index per row rather than one per element.
# rms_norm(x (..., D), gain (D,), eps) -> x / sqrt(mean(x², -1) + eps) · gain.
# rope(v (B, H, N, Dh), positions (B, N) int, base) -> v rotated (rotate-half) at positions.
# attention(q (B, H, Nq, Dh), k, v (B, H, Nk, Dh), allowed (B, 1, Nq, Nk) bool) ->
#   softmax(where(allowed, q·kᵀ/√Dh, -1e9)) @ v; a row with no allowed key is padding: any
#   finite value.
# expert_mlp(h (E, M, D), w1, w2, w3 | None, act) -> (E, M, D): every expert on its padded
#   buffer (layers.experts); expert parallel runs it over processes (models/expert_parallel.py)
#   and is held to the oracle by the corpus on two ranks, not to a composite here.
FAST_OPS = ("grouped_mlp", "take_rows", "scatter_rows", "rms_norm", "rope", "attention",
            "expert_mlp")


def fast_ops(ops) -> list[str]:
    """The optional fused ops a backend provides (`moe-min info`)."""
    return [name for name in FAST_OPS if callable(getattr(ops, name, None))]


def fast_op(ops, name: str, fused: bool = True):
    """The backend's fused op `name` if its lowering uses it (`ops.fused`: the ones it uses on
    this device, default all it provides), else None: the composite runs (fused=False forces it)."""
    use = fused and name in getattr(ops, "fused", FAST_OPS)
    op = getattr(ops, name, None) if use else None
    return op if callable(op) else None


def choose_fused(value: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    """The fused ops a backend's lowering uses: value (else $MOE_MIN_FUSED, else `default`) is
    "all", "none" or a comma-separated list of FAST_OPS."""
    value = value if value is not None else os.environ.get("MOE_MIN_FUSED", "default")
    if value in ("default", ""):
        return default
    names = {"all": FAST_OPS, "none": ()}.get(value, tuple(value.split(",")))
    unknown = [n for n in names if n not in FAST_OPS]
    if unknown:
        raise ValueError(f"fused ops {value!r}: expected all, none, default or a comma-separated "
                         f"list of {', '.join(FAST_OPS)}")
    return names


CONTRACT = tuple(
    name for name in vars(Ops) if not name.startswith("_") and callable(getattr(Ops, name))
)


def missing_ops(ops) -> list[str]:
    """Contract operations a backend object lacks (the runner's first row)."""
    return [name for name in CONTRACT if not callable(getattr(ops, name, None))]


def backend_entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def get_backend(name: str | None = None, device: str | None = None, **options) -> Ops:
    """The backend registered under `name` (default: $MOE_MIN_BACKEND, else numpy)."""
    name = name or os.environ.get("MOE_MIN_BACKEND", "numpy")
    found = backend_entry_points()
    if name not in found:
        known = ", ".join(sorted(found)) or "none installed"
        raise ValueError(f"unknown backend {name!r}: expected one of {known}")
    factory = found[name].load()
    return factory(device=device, **options) if device else factory(**options)
