"""The per-op rows, the hook rows and the shipped corpus against every backend that runs here,
one test per case."""

from __future__ import annotations

import pytest

from moe_min.conformance.case import case_paths, read_case
from moe_min.conformance.hooks import hook_rows
from moe_min.conformance.op_rows import op_rows
from moe_min.conformance.runner import Runner
from moe_min.ops import missing_ops

PATHS = case_paths()


def test_backend_provides_the_whole_contract(ops):
    assert missing_ops(ops) == []


def test_op_and_hook_rows_pass(ops):
    runner = Runner(ops).include("token_choice__k1_one-expert|expert_choice__cf2_train")
    cases = [read_case(p) for p in runner.selected()]
    rows = op_rows(ops) + hook_rows(ops, runner.gradient_cases(cases))
    bad = [f"{r.quantity}: {r.status}: {r.detail}" for r in rows if r.status != "passed" and
           not (r.status == "n/a" and not ops.caps.autodiff)]
    assert not bad, "\n".join(bad)
    assert sum(r.quantity.startswith("value_and_grad/") for r in rows) == 3


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_case_conforms(ops, path):
    rows = Runner(ops).run_case(read_case(path))
    failed = [r for r in rows if r.status == "failed"]
    assert not failed, "\n".join(f"{r.quantity}: err {r.error} tol {r.tolerance}: {r.detail}"
                                 for r in failed)
    statuses = {r.status for r in rows}
    assert "unsupported" not in statuses, [r.detail for r in rows if r.status == "unsupported"]
    if ops.caps.autodiff:
        assert "n/a" not in statuses
