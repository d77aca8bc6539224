"""What every conformance row is made of: the `Row`, the element-wise comparison that fills it,
and `Recorder`, the backend seen through a window that notes which contract ops were called
(so a failing row can say which ops its quantity depends on) and turns a missing op into a
one-line `missing: <op>` instead of a bare AttributeError. May import: moe_min.ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moe_min.ops import CONTRACT, FAST_OPS

STATUSES = ("passed", "failed", "unsupported", "n/a")
TRACKED = CONTRACT + FAST_OPS


@dataclass
class Row:
    case: str
    quantity: str
    error: float | None  # max abs error
    tolerance: tuple | None  # (rtol, atol)
    status: str  # one of STATUSES
    detail: str = ""  # why, and the worst element (of a passing row too: `-v` shows it)


def compare(got, want: np.ndarray, tol) -> tuple[float | None, bool, str]:
    """(max abs error, within tolerance, worst element) for one quantity."""
    rtol, atol = tol
    got = np.asarray(got)
    if got.shape != want.shape:
        return None, False, f"shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    got, want = got.astype(np.float64), want.astype(np.float64)
    diff = np.abs(got - want)
    bad = ~(diff <= atol + rtol * np.abs(want))  # NaN counts as bad
    error = float(np.nanmax(diff)) if diff.size else 0.0
    if np.isnan(diff).any():
        error = float("nan")
    if not diff.size or error == 0.0:
        return error, True, f"all {diff.size} elements exact" if diff.size else "empty"
    worst = np.unravel_index(np.argmax(np.where(np.isnan(diff), np.inf, diff)), diff.shape)
    where = (f"worst at {[int(i) for i in worst]}: expected {float(want[worst]):.9g}, got "
             f"{float(got[worst]):.9g}")  # plain numbers, not np.float64(...)
    if not bad.any():
        return error, True, f"{where} (within tolerance)"
    return error, False, f"{int(bad.sum())}/{bad.size} elements off; {where}"


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    if isinstance(e, MissingOp):
        return text[0]
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


class MissingOp(AttributeError):
    """A contract op the backend does not provide, asked for by the lowering or a row."""

    def __init__(self, name: str):
        super().__init__(f"missing: {name}")
        self.op = name


class Recorder:
    """`ops` as the lowering sees it, noting each contract (or fused) op called in `used`.
    Everything else (name, device, caps, the backend's own attributes) passes through."""

    def __init__(self, ops):
        self._ops, self.used = ops, set()

    def __getattr__(self, name):
        value = getattr(self._ops, name, None)
        if name not in TRACKED:
            return getattr(self._ops, name)
        if not callable(value):
            if name in FAST_OPS:  # optional: absent is fine, the lowering checks with getattr
                raise AttributeError(name)
            self.used.add(name)
            raise MissingOp(name)
        used = self.used

        def recorded(*args, **kwargs):
            used.add(name)
            return value(*args, **kwargs)
        return recorded

    def uses(self) -> list[str]:
        """The ops called so far, in the order of the contract."""
        return [name for name in TRACKED if name in self.used]
