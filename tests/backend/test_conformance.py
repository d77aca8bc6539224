"""The shipped corpus against every backend that runs here, one test per case."""

from __future__ import annotations

import pytest

from moe_min.conformance.case import case_paths, read_case
from moe_min.conformance.runner import Runner
from moe_min.ops import missing_ops

PATHS = case_paths()


def test_backend_provides_the_whole_contract(ops):
    assert missing_ops(ops) == []


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
