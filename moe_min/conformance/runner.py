"""The conformance runner: holds a backend first to the per-op rows (op_rows.py) and the hook
rows (hooks.py), then to every case of the corpus, one row per case and quantity. A failing
corpus row names the ops its quantity used, suspects first (ops whose own rows failed), and
the case's one-line why. A backend's own test file can use it directly:

    from moe_min.conformance.runner import Runner
    globals().update(Runner(MyOps()).test_functions())
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from pathlib import Path

from moe_min.conformance import fused
from moe_min.conformance.case import Case, case_paths, read_case
from moe_min.conformance.hooks import hook_rows
from moe_min.conformance.op_rows import CASES as OP_CASES
from moe_min.conformance.op_rows import op_rows
from moe_min.conformance.rows import STATUSES, Recorder, Row, compare, one_line
from moe_min.helpers import write_atomic
from moe_min.layers import forward
from moe_min.ops import CONTRACT, fast_ops, missing_ops

__all__ = ["STATUSES", "Row", "Runner", "compare", "failures", "format_rows", "summary",
           "write_junit"]
BUILTIN = ("op", "hook", "fused")  # the names the built-in rows answer to in include/exclude


def _status(compared: tuple, tol) -> tuple:
    error, ok, detail = compared
    return error, tuple(tol), "passed" if ok else "failed", detail


def backend_loss(ops, case: Case, params: dict, x, noise):
    """The corpus's scalar loss, Σ y·cotangent + aux/total, computed by the backend."""
    out = forward(case.spec, x, params, ops, expert=case.expert, block=case.block,
                  mode=case.meta["mode"], noise=noise, validate=False)
    loss = ops.sum(out["y"] * ops.asarray(case.tensors["input/cotangent"]))
    return loss + out["aux/total"] if "aux/total" in out else loss


def _noise(ops, case: Case):
    """The case's standard-normal draw as a backend array, or None."""
    noise = case.tensors.get("input/noise")
    return None if noise is None else ops.asarray(noise)


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
        self.suspects: dict[str, str] = {}  # op -> why it is suspect, once its rows have run

    def include(self, pattern: str) -> Runner:
        self.includes.append(_regex(pattern, "--include"))
        return self

    def exclude(self, pattern: str, why: str = "") -> Runner:
        self.excludes.append((_regex(pattern, "--exclude"), why))
        return self

    def _excluded(self, name: str) -> bool:
        return any(re.search(p, name) for p, _ in self.excludes)

    def selected(self) -> list[Path]:
        def keep(name):
            return (not self.includes or any(re.search(p, name) for p in self.includes)) and \
                not self._excluded(name)
        return [p for p in case_paths(self.root) if keep(p.stem)]

    def run(self) -> list[Row]:
        """The contract row, the per-op rows, the hook rows, then the selected cases. The op
        and hook rows always run unless excluded (`--exclude '^op$'`); an include that
        matches "op" or "hook" alone (`--include '^op$'`) runs them without the corpus."""
        missing = missing_ops(self.ops)
        rows = [Row("contract", "ops", None, None, "failed" if missing else "passed",
                    "missing: " + ", ".join(missing) if missing else
                    f"all {len(CONTRACT)} contract ops present")]
        cases = [read_case(p) for p in self.selected()]
        asked = any(re.search(p, n) for p in self.includes for n in BUILTIN)
        if not cases and not asked:  # a run of no case would pass vacuously
            raise ValueError(f"no case selected (--include {self.includes or '-'}, --exclude "
                             f"{[p for p, _ in self.excludes] or '-'}): nothing would be tested")
        if not self._excluded("op"):
            rows.extend(self._note_suspects(op_rows(self.ops)))
        if not self._excluded("hook"):
            rows.extend(self._note_suspects(hook_rows(self.ops, self.gradient_cases(cases))))
        if not self._excluded("fused"):
            rows.extend(self.fused_rows())
        for case in cases:
            rows.extend(self.run_case(case))
        return rows

    def fused_rows(self) -> list[Row]:
        """Each optional fused op the backend provides against its composite (fused.py)."""
        rows = []
        for name in (n for n in fast_ops(self.ops) if n in fused.CHECKS):  # not expert_mlp
            try:
                mine = [Row(f"fused {name}", quantity, *_status(compare(got, want, tol), tol))
                        for quantity, got, want, tol in fused.comparisons(self.ops, name)]
            except Exception as e:  # a broken fused op is a row, and the run goes on
                mine = [Row(f"fused {name}", "forward", None, None, "failed", one_line(e))]
            if any(r.status == "failed" for r in mine):
                self.suspects[name] = "its fused rows failed"
            rows += mine
        return rows

    def _note_suspects(self, rows: list[Row]) -> list[Row]:
        for r in rows:
            if r.status == "failed":
                op = r.quantity.split("/")[0]
                self.suspects[op] = "missing" if r.detail.startswith("missing:") else \
                    self.suspects.get(op, "its op rows failed")
        return rows

    def gradient_cases(self, cases: list[Case], most: int = 2) -> list[tuple[Case, object]]:
        """(case, its loss on the backend) for the first case with stored gradients of each of
        the first `most` schemes among `cases`: what value_and_grad is held to."""
        picked: dict[str, tuple[Case, object]] = {}
        for case in cases:
            if case.meta["scheme"] in picked or len(picked) == most or not any(
                    k.startswith("expect/grad/") for k in case.tensors):
                continue
            picked[case.meta["scheme"]] = (case, lambda p, x, c=case: backend_loss(
                self.ops, c, p, x, _noise(self.ops, c)))
        return list(picked.values())

    def run_case(self, case: Case) -> list[Row]:
        ops, tol, want = Recorder(self.ops), case.meta["tolerance"], case.group("expect")
        forward_keys = sorted(k for k in want if not k.startswith("grad/"))
        grad_keys = sorted(k for k in want if k.startswith("grad/"))
        try:
            x = ops.asarray(case.tensors["input/x"])
            params = {k: ops.asarray(v) for k, v in case.group("param").items()}
            noise = _noise(ops, case)
            out = forward(case.spec, x, params, ops, expert=case.expert, block=case.block,
                          mode=case.meta["mode"], noise=noise)
        except NotImplementedError as e:
            return [Row(case.name, k, None, None, "unsupported", str(e))
                    for k in forward_keys + grad_keys]
        except Exception as e:  # a crash is every row of this case, and the run goes on
            reason = one_line(e)

            def crashed(key):
                if key in grad_keys and not self.ops.caps.autodiff:
                    return Row(case.name, key, None, None, "n/a", "backend has no autodiff")
                return Row(case.name, key, None, None, "failed", reason)
            return self._explain(case, ops.uses(), [crashed(k) for k in forward_keys + grad_keys])
        rows = self._explain(case, ops.uses(), [self._row(ops, case, k, out.get(k), want[k],
                                                          tol[k]) for k in forward_keys])
        if not grad_keys:
            return rows
        if not self.ops.caps.autodiff:
            return rows + [Row(case.name, k, None, None, "n/a", "backend has no autodiff")
                           for k in grad_keys]
        try:
            grads = ops.grad(lambda p, x_: backend_loss(ops, case, p, x_, noise), params, x)
            grad_rows = [self._row(ops, case, k, grads.get(k[len("grad/"):]), want[k], tol[k])
                         for k in grad_keys]
        except NotImplementedError as e:
            return rows + [Row(case.name, k, None, None, "unsupported", str(e)) for k in grad_keys]
        except Exception as e:
            grad_rows = [Row(case.name, k, None, None, "failed", one_line(e)) for k in grad_keys]
        return rows + self._explain(case, ops.uses(), grad_rows)

    def _row(self, ops, case: Case, key: str, got, want, tol) -> Row:
        if got is None:
            return Row(case.name, key, None, tuple(tol), "failed", "backend returned nothing")
        try:
            error, ok, detail = compare(ops.to_numpy(got), want, tol)
        except Exception as e:
            return Row(case.name, key, None, tuple(tol), "failed", one_line(e))
        return Row(case.name, key, error, tuple(tol), "passed" if ok else "failed", detail)

    def _explain(self, case: Case, uses: list[str], rows: list[Row]) -> list[Row]:
        """A failed row's detail gains its suspects, the case's why and the ops it used."""
        suspects = [f"{op} ({self.suspects[op]})" for op in uses if op in self.suspects]
        notes = ([f"suspect: {', '.join(suspects)}"] if suspects else []) + \
            [f"why: {case.meta.get('why') or '-'}", f"uses: {', '.join(uses) or 'no op'}"]
        for r in rows:
            if r.status == "failed":
                r.detail = "; ".join([r.detail or "out of tolerance", *notes])
        return rows

    def test_functions(self, prefix: str = "test_conformance") -> dict:
        """{name: test function}: one per op of the per-op rows, one for the hooks, one per
        case, for a backend's own pytest module."""
        def check(rows):
            failed = [r for r in rows if r.status == "failed"]
            assert not failed, "\n".join(f"{r.quantity}: {r.detail}" for r in failed)

        def make(path):
            return lambda: check(self.run_case(read_case(path)))

        def op_test(op):
            return lambda: check(op_rows(self.ops, only=op))

        paths = self.selected()

        def hook_test():
            check(hook_rows(self.ops, self.gradient_cases([read_case(p) for p in paths])))
        tests = {f"{prefix}__op__{op}": op_test(op) for op in dict.fromkeys(
            c.op for c in OP_CASES)}
        return {**tests, f"{prefix}__hooks": hook_test,
                **{f"{prefix}__{p.stem}": make(p) for p in paths}}


def summary(rows: list[Row]) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in STATUSES}
    extra = "".join(f", {counts[s]} {s}" for s in ("unsupported", "n/a") if counts[s])
    return f"{counts['passed']} passed, {counts['failed']} failed{extra}"


def format_rows(rows: list[Row], verbose: bool = False) -> str:
    """The table; a row's detail under it when it did not pass, every row's with verbose."""
    width = max([len(r.case) for r in rows] + [4])
    qw = max([len(r.quantity) for r in rows] + [28])
    lines = [f"{'case':<{width}}  {'quantity':<{qw}} {'max abs err':>11}  {'tolerance':<17} status"]
    for r in rows:
        err = "" if r.error is None else f"{r.error:.2e}"
        tol = "" if r.tolerance is None else f"{r.tolerance[0]:g}/{r.tolerance[1]:g}"
        lines.append(f"{r.case:<{width}}  {r.quantity:<{qw}} {err:>11}  {tol:<17} {r.status}")
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
    """The same rows as the table, details included: a failure's message and text, a skip's
    message, a passing row's worst element as its system-out."""
    root = ET.Element("testsuite", name=suite, tests=str(len(rows)),
                      failures=str(sum(r.status == "failed" for r in rows)),
                      skipped=str(sum(r.status in ("unsupported", "n/a") for r in rows)))
    for r in rows:
        tc = ET.SubElement(root, "testcase", classname=r.case, name=r.quantity)
        if r.status == "failed":
            failure = ET.SubElement(tc, "failure", message=r.detail or "out of tolerance")
            failure.text = f"max abs err {r.error}, tolerance {r.tolerance}: {r.detail}"
        elif r.status in ("unsupported", "n/a"):
            ET.SubElement(tc, "skipped", message=f"{r.status}: {r.detail}")
        elif r.detail:
            ET.SubElement(tc, "system-out").text = r.detail
    write_atomic(path, ET.tostring(root, encoding="utf-8", xml_declaration=True))
