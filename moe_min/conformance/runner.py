"""The conformance runner: holds a backend against every case of the corpus, one row per case
and quantity. A backend's own test file can use it directly:

    from moe_min.conformance.runner import Runner
    globals().update(Runner(MyOps()).test_functions())
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moe_min.conformance.case import Case, case_paths, read_case
from moe_min.helpers import write_atomic
from moe_min.layers import forward
from moe_min.ops import missing_ops

STATUSES = ("passed", "failed", "unsupported", "n/a")


@dataclass
class Row:
    case: str
    quantity: str
    error: float | None  # max abs error
    tolerance: tuple | None  # (rtol, atol)
    status: str  # one of STATUSES
    detail: str = ""  # why, and for a failure the worst element


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
    if not bad.any():
        return error, True, ""
    worst = np.unravel_index(np.argmax(np.where(np.isnan(diff), np.inf, diff)), diff.shape)
    return error, False, (f"{int(bad.sum())}/{bad.size} elements off; worst at "
                          f"{[int(i) for i in worst]}: expected {float(want[worst]):.9g}, got "
                          f"{float(got[worst]):.9g}")  # plain numbers, not np.float64(...)


def backend_loss(ops, case: Case, params: dict, x, noise):
    """The corpus's scalar loss, Σ y·cotangent + aux/total, computed by the backend."""
    out = forward(case.spec, x, params, ops, expert=case.expert, block=case.block,
                  mode=case.meta["mode"], noise=noise, validate=False)
    loss = ops.sum(out["y"] * ops.asarray(case.tensors["input/cotangent"]))
    return loss + out["aux/total"] if "aux/total" in out else loss


def _regex(pattern: str, flag: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{flag} {pattern!r}: not a regular expression ({e})") from None
    return pattern


class Runner:
    def __init__(self, ops, cases: str | Path | None = None):
        self.ops, self.root = ops, cases
        self.includes: list[str] = []
        self.excludes: list[tuple[str, str]] = []

    def include(self, pattern: str) -> Runner:
        self.includes.append(_regex(pattern, "--include"))
        return self

    def exclude(self, pattern: str, why: str = "") -> Runner:
        self.excludes.append((_regex(pattern, "--exclude"), why))
        return self

    def selected(self) -> list[Path]:
        def keep(name):
            return (not self.includes or any(re.search(p, name) for p in self.includes)) and \
                not any(re.search(p, name) for p, _ in self.excludes)
        return [p for p in case_paths(self.root) if keep(p.stem)]

    def run(self) -> list[Row]:
        missing = missing_ops(self.ops)
        rows = [Row("contract", "ops", None, None, "failed" if missing else "passed",
                    "missing: " + ", ".join(missing) if missing else "")]
        selected = self.selected()
        if not selected:  # a run of no case would pass vacuously
            raise ValueError(f"no case selected (--include {self.includes or '-'}, --exclude "
                             f"{[p for p, _ in self.excludes] or '-'}): nothing would be tested")
        for path in selected:
            case = read_case(path)
            try:
                rows.extend(self.run_case(case))
            except (ValueError, TypeError) as e:  # inputs the layer refused: name the file
                raise ValueError(f"{path}: {e}") from None
        return rows

    def run_case(self, case: Case) -> list[Row]:
        ops, tol, want = self.ops, case.meta["tolerance"], case.group("expect")
        x = ops.asarray(case.tensors["input/x"])
        params = {k: ops.asarray(v) for k, v in case.group("param").items()}
        noise = case.tensors.get("input/noise")
        noise = None if noise is None else ops.asarray(noise)
        forward_keys = sorted(k for k in want if not k.startswith("grad/"))
        grad_keys = sorted(k for k in want if k.startswith("grad/"))
        try:
            out = forward(case.spec, x, params, ops, expert=case.expert, block=case.block,
                          mode=case.meta["mode"], noise=noise)
        except NotImplementedError as e:
            return [Row(case.name, k, None, None, "unsupported", str(e))
                    for k in forward_keys + grad_keys]
        rows = [self._row(case, k, out.get(k), want[k], tol[k]) for k in forward_keys]
        if not grad_keys:
            return rows
        if not ops.caps.autodiff:
            return rows + [Row(case.name, k, None, None, "n/a", "backend has no autodiff")
                           for k in grad_keys]
        try:
            grads = ops.grad(lambda p, x_: backend_loss(ops, case, p, x_, noise), params, x)
        except NotImplementedError as e:
            return rows + [Row(case.name, k, None, None, "unsupported", str(e)) for k in grad_keys]
        return rows + [self._row(case, k, grads.get(k[len("grad/"):]), want[k], tol[k])
                       for k in grad_keys]

    def _row(self, case: Case, key: str, got, want, tol) -> Row:
        if got is None:
            return Row(case.name, key, None, tuple(tol), "failed", "backend returned nothing")
        error, ok, detail = compare(self.ops.to_numpy(got), want, tol)
        return Row(case.name, key, error, tuple(tol), "passed" if ok else "failed", detail)

    def test_functions(self, prefix: str = "test_conformance") -> dict:
        """{name: test function} per case, for a backend's own pytest module."""
        def make(path):
            def test():
                failed = [r for r in self.run_case(read_case(path)) if r.status == "failed"]
                assert not failed, "\n".join(f"{r.quantity}: {r.detail}" for r in failed)
            return test
        return {f"{prefix}__{p.stem}": make(p) for p in self.selected()}


def summary(rows: list[Row]) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    extra = "".join(f", {counts[s]} {s}" for s in ("unsupported", "n/a") if counts[s])
    return f"{counts['passed']} passed, {counts['failed']} failed{extra}"


def format_rows(rows: list[Row], verbose: bool = False) -> str:
    width = max([len(r.case) for r in rows] + [4])
    lines = [f"{'case':<{width}}  {'quantity':<28} {'max abs err':>11}  {'tolerance':<17} status"]
    for r in rows:
        err = "" if r.error is None else f"{r.error:.2e}"
        tol = "" if r.tolerance is None else f"{r.tolerance[0]:g}/{r.tolerance[1]:g}"
        lines.append(f"{r.case:<{width}}  {r.quantity:<28} {err:>11}  {tol:<17} {r.status}")
        if r.detail and (verbose or r.status != "passed"):
            lines.append(f"    {r.detail}")
    return "\n".join(lines)


def failures(rows: list[Row]) -> str:
    """The closing list of only the failed rows, each with its detail (empty if none)."""
    failed = [r for r in rows if r.status == "failed"]
    return "\n".join([f"failed rows ({len(failed)}):"] + [
        f"  {r.case} {r.quantity}: {r.detail or 'out of tolerance'}" for r in failed]) \
        if failed else ""


def write_junit(rows: list[Row], path: Path, suite: str):
    root = ET.Element("testsuite", name=suite, tests=str(len(rows)),
                      failures=str(sum(r.status == "failed" for r in rows)),
                      skipped=str(sum(r.status in ("unsupported", "n/a") for r in rows)))
    for r in rows:
        tc = ET.SubElement(root, "testcase", classname=r.case, name=r.quantity)
        if r.status == "failed":
            ET.SubElement(tc, "failure", message=r.detail or "out of tolerance")
        elif r.status in ("unsupported", "n/a"):
            ET.SubElement(tc, "skipped", message=f"{r.status}: {r.detail}")
    write_atomic(path, ET.tostring(root, encoding="utf-8", xml_declaration=True))
