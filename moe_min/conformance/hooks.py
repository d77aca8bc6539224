"""Rows for the training hooks of the contract: `grad`, `value_and_grad` (against the corpus's
stored gradients and against its own value, the forward loss), `compile` (equal to the
uncompiled function, replays included), `seed`/`normal` (reproducible per seed, different
across seeds, standard-normal moments) and `save`/`load` (a safetensors round trip that any
safetensors reader opens). A hook that raises NotImplementedError gives `n/a` rows, never
`passed`. May import: moe_min.ops, moe_min.tensorio, moe_min.conformance.*.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np

from moe_min.conformance.case import Case
from moe_min.conformance.op_rows import EXACT, FLOAT
from moe_min.conformance.rows import Recorder, Row, compare, one_line
from moe_min.tensorio import load_safetensors

HOOKS = ("grad", "value_and_grad", "compile", "seed", "normal", "save", "load")
DRAWS = 20_000  # normal draws for the moment checks
# Tolerances from the sample size, at 5 standard errors (a correct generator fails one seed
# in ~1.7 million; the draws are seeded, so a pass or a failure is the same on every run):
# the mean's standard error is 1/√n, the sample std's ≈ 1/√(2n), and the share of draws
# within one σ (0.6827 for a normal, 0.577 for a uniform of unit variance) has √(p(1-p)/n)
MEAN_TOL, STD_TOL = 5 / math.sqrt(DRAWS), 5 / math.sqrt(2 * DRAWS)
ONE_SIGMA, ONE_SIGMA_TOL = 0.6827, 5 * math.sqrt(0.6827 * 0.3173 / DRAWS)


def _row(quantity, fn, tol=FLOAT) -> Row:
    """Run one hook check; fn() -> (error, ok, detail). NotImplementedError means n/a."""
    try:
        error, ok, detail = fn()
    except NotImplementedError as e:
        return Row("hook", quantity, None, None, "n/a", one_line(e))
    except Exception as e:  # a broken hook is its row, and the run goes on
        return Row("hook", quantity, None, tol, "failed", one_line(e))
    return Row("hook", quantity, error, tol, "passed" if ok else "failed", detail)


def _compare_all(got: dict, want: dict, tol) -> tuple[float | None, bool, str]:
    """Every entry of `want` against the same key of `got` (NumPy arrays); `tol` one
    (rtol, atol) or one per key."""
    if set(got) != set(want):
        return None, False, f"keys {sorted(got)}, expected {sorted(want)}"
    results = {k: compare(got[k], w, tol[k] if isinstance(tol, dict) else tol)
               for k, w in sorted(want.items())}
    errors = [r[0] for r in results.values()]
    bad = {k: r for k, r in results.items() if not r[1]}
    error = None if None in errors else max(errors, default=0.0)
    if bad:
        return error, False, "; ".join(f"{k}: {r[2]}" for k, r in bad.items())
    return error, True, max(results.items(), key=lambda kv: kv[1][0] or 0.0)[1][2]


def _host(ops, arrays: dict) -> dict:
    return {k: np.asarray(ops.to_numpy(v)) for k, v in arrays.items()}


def _quadratic(ops):
    def fn(params, x):
        return ops.sum(params["w"] * params["w"] * x)  # d/dw = 2·w·x, d/dx = w²
    return fn, {"w": ops.asarray(np.array([1.0, 2.0]))}, ops.asarray(np.array([3.0, 4.0]))


def _grad(ops):
    fn, params, x = _quadratic(ops)
    return _compare_all(_host(ops, ops.grad(fn, params, x)),
                        {"w": np.array([6.0, 16.0]), "x": np.array([1.0, 4.0])}, FLOAT)


def _value_and_grad(ops):
    fn, params, x = _quadratic(ops)
    value, grads = ops.value_and_grad(fn)(params, x)
    error, ok, detail = compare(ops.to_numpy(value), np.array(19.0), FLOAT)  # 1·3 + 4·4
    if not ok:
        return error, ok, f"value: {detail}"
    return _compare_all(_host(ops, grads), {"w": np.array([6.0, 16.0])}, FLOAT)


def _case_value_and_grad(ops, case: Case, loss):
    """value_and_grad of the corpus loss: its value against the backend's own forward loss,
    its gradients against the gradients stored in the case (oracle, float64)."""
    params = {k: ops.asarray(v) for k, v in case.group("param").items()}
    x = ops.asarray(case.tensors["input/x"])
    value, grads = ops.value_and_grad(loss)(params, x)
    own = ops.to_numpy(loss(params, x))
    error, ok, detail = compare(ops.to_numpy(value), np.asarray(own, np.float64), (1e-5, 1e-5))
    if not ok:
        return error, ok, f"case {case.name}: value {detail} (the forward loss, without grad)"
    want = {k[len("grad/"):]: v for k, v in case.group("expect").items()
            if k.startswith("grad/") and k != "grad/x"}
    tol = {k: tuple(case.meta["tolerance"][f"grad/{k}"]) for k in want}
    error, ok, detail = _compare_all(_host(ops, grads), want, tol)
    return error, ok, f"case {case.name}: {detail}"


def _compile(ops):
    """Five calls of one compiled function, new inputs each time: tracing, capture and replay
    (TinyJit captures on its second call and replays from the third) all give fn's result."""
    def fn(a, b):
        return ops.softmax(ops.maximum(a @ b, 0.0), axis=-1) * 2.0 + a[:, :1]

    compiled = ops.compile(fn)
    rng, worst = np.random.default_rng(0), 0.0
    for call in range(5):
        a, b = rng.standard_normal((3, 4)), rng.standard_normal((4, 5))
        h = np.maximum(a @ b, 0.0)
        e = np.exp(h - h.max(axis=-1, keepdims=True))
        want = e / e.sum(axis=-1, keepdims=True) * 2.0 + a[:, :1]
        got = compiled(ops.asarray(a), ops.asarray(b))
        error, ok, detail = compare(ops.to_numpy(got), want, FLOAT)
        if not ok:
            return error, False, f"call {call + 1} of 5: {detail}"
        worst = max(worst, error or 0.0)
    return worst, True, "5 calls, each equal to fn computed by NumPy"


def _draws(ops, seed: int) -> np.ndarray:
    ops.seed(seed)
    got = np.asarray(ops.to_numpy(ops.normal((100, DRAWS // 100))), np.float64)
    if got.shape != (100, DRAWS // 100):
        raise ValueError(f"normal((100, {DRAWS // 100})) has shape {got.shape}")
    return got.ravel()


def _reproducible(ops):
    a, b = _draws(ops, 7), _draws(ops, 7)
    same = int(np.sum(a == b))
    return float(np.max(np.abs(a - b))), same == a.size, \
        f"seed(7) twice: {same}/{a.size} draws equal"


def _seeds_differ(ops):
    a, b = _draws(ops, 7), _draws(ops, 8)
    same = int(np.sum(a == b))
    return None, same < a.size // 1000, f"seed(7) and seed(8): {same}/{a.size} draws equal"


def _moments(ops):
    a = _draws(ops, 7)
    mean, std, inside = float(a.mean()), float(a.std()), float(np.mean(np.abs(a) < 1.0))
    ok = abs(mean) <= MEAN_TOL and abs(std - 1) <= STD_TOL and \
        abs(inside - ONE_SIGMA) <= ONE_SIGMA_TOL and bool(np.isfinite(a).all())
    return None, ok, (f"{a.size} draws: mean {mean:.4f} (|·| <= {MEAN_TOL:.4f}), std {std:.4f} "
                      f"(1 ± {STD_TOL:.4f}), within 1σ {inside:.4f} ({ONE_SIGMA} ± "
                      f"{ONE_SIGMA_TOL:.4f})")


# exact in float32 (2^-10, not 1e-3), so a round trip must give back every bit
TENSORS = {"layer.w": np.array([[0.5, -1.25, 3.0], [2.0**-10, 0.0, -7.5]]),
           "step": np.array([3, -1, 2**20]), "scale": np.array(0.25)}


def _saved(ops, directory: str) -> Path:
    path = Path(directory) / "hook.safetensors"
    ops.save(str(path), {k: ops.asarray(v) for k, v in TENSORS.items()})
    return path


def _save_format(ops):
    with tempfile.TemporaryDirectory() as d:
        tensors, _ = load_safetensors(_saved(ops, d))  # NumPy alone: any reader opens it
    kinds = {k: v.dtype.kind for k, v in tensors.items()}
    if set(kinds) == set(TENSORS) and kinds != {k: v.dtype.kind for k, v in TENSORS.items()}:
        return None, False, f"read back as {kinds}, expected float, int, float"
    return _compare_all(tensors, TENSORS, EXACT)


def _round_trip(ops):
    with tempfile.TemporaryDirectory() as d:
        loaded = ops.load(str(_saved(ops, d)))
    loaded = _host(ops, loaded)
    kinds = {k: v.dtype.kind.replace("u", "i") for k, v in loaded.items()}
    if set(kinds) == set(TENSORS) and kinds != {k: v.dtype.kind for k, v in TENSORS.items()}:
        return None, False, f"loaded as {kinds}, expected float, int, float"
    return _compare_all(loaded, TENSORS, EXACT)


def hook_rows(ops, cases: list[tuple[Case, object]]) -> list[Row]:
    """The hook rows. `cases`: (case, loss(params, x) on the backend) for the corpus cases
    whose stored gradients value_and_grad is held to (a couple suffice)."""
    ops = Recorder(ops)
    rows = []
    for name in HOOKS:
        if not callable(getattr(ops._ops, name, None)):
            rows.append(Row("hook", name, None, None, "failed", f"missing: {name}"))
    missing = {r.quantity for r in rows}
    checks = [("grad", "quadratic", _grad, FLOAT),
              ("value_and_grad", "quadratic", _value_and_grad, FLOAT)]
    checks += [("value_and_grad", case.meta["scheme"], lambda o, c=case, f=loss:
                _case_value_and_grad(o, c, f), tuple(case.meta["tolerance"]["grad/x"]))
               for case, loss in cases]
    checks += [("compile", "equals-fn", _compile, FLOAT), ("seed", "reproducible", _reproducible,
                                                           EXACT),
               ("normal", "seeds-differ", _seeds_differ, None), ("normal", "moments", _moments,
                                                                  None),
               ("save", "safetensors-file", _save_format, EXACT),
               ("load", "round-trip", _round_trip, EXACT)]
    for hook, name, check, tol in checks:
        if hook not in missing:
            rows.append(_row(f"{hook}/{name}", lambda c=check: c(ops), tol))
    return rows
