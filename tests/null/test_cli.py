"""`moe-min conform` as a user runs it: table, closing line, filters, JUnit, exit codes."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET

import numpy as np
from click.testing import CliRunner

from moe_min.cli import main
from moe_min.conformance.case import CASES_DIR, case_paths, read_case


def _conform(*args):
    return CliRunner().invoke(main, ["conform", "numpy", *args])


def test_conform_numpy_passes_every_row_and_says_so_last():
    result = _conform()
    assert result.exit_code == 0, result.output
    last = result.output.strip().splitlines()[-1]
    assert re.fullmatch(r"\d+ passed, 0 failed, \d+ n/a", last), last
    table = result.output.splitlines()[1:-1]
    statuses = {line.split()[-1] for line in table if not line.startswith("    ")}
    assert statuses == {"passed", "n/a"}, statuses
    assert all(p.stem in result.output for p in case_paths())


def test_include_exclude_and_junit(tmp_path):
    junit = tmp_path / "out.xml"
    result = _conform("--include", "^soft_moe", "--exclude", "bf16", "--junit", str(junit))
    assert result.exit_code == 0, result.output
    assert "soft_moe__p1" in result.output and "token_choice" not in result.output
    assert "soft_moe__bf16" not in result.output
    suite = ET.parse(junit).getroot()
    assert int(suite.get("tests")) > 10 and suite.get("failures") == "0"


def test_a_wrong_expectation_fails_with_exit_1_and_names_the_worst_element(tmp_path):
    src = next(p for p in case_paths() if p.stem == "token_choice__k2_glu")
    dst = tmp_path / src.relative_to(CASES_DIR)
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    case = read_case(dst)  # edited on purpose, so saved with a fresh checksum
    y = case.tensors["expect/y"]
    case.tensors["expect/y"] = y + np.eye(*y.shape[-2:]) * 0.1
    case.save(dst)
    junit = tmp_path / "out.xml"
    result = _conform("--cases", str(tmp_path), "-v", "--junit", str(junit))
    assert result.exit_code == 1
    assert re.search(r"token_choice__k2_glu\s+y\s+1\.00e-01\s+\S+\s+failed", result.output)
    assert "worst at" in result.output and "np.float64" not in result.output
    lines = result.output.strip().splitlines()
    assert re.fullmatch(r"\d+ passed, 1 failed, \d+ n/a", lines[-1]), lines[-1]
    assert lines[-3] == "failed rows (1):" and lines[-2].startswith("  token_choice__k2_glu y: ")
    why = case.meta["why"]
    assert f"why: {why}; uses: " in lines[-2] and "scatter_add" in lines[-2]
    failure = ET.parse(junit).getroot().find("testcase[@name='y']/failure")
    assert failure is not None and failure.get("message") == lines[-2].split(" y: ", 1)[1]


def test_verbose_shows_every_rows_worst_element_and_plain_does_not():
    plain = _conform("--include", "^soft_moe__p1$").output.splitlines()
    verbose = _conform("--include", "^soft_moe__p1$", "-v").output.splitlines()
    rows = [line for line in plain[1:-1] if line.endswith("passed")]
    assert len(rows) > 90 and all(not line.startswith("    ") or "no autodiff" in line
                                  for line in plain)
    details = [verbose[i + 1] for i, line in enumerate(verbose) if line.endswith("passed")]
    assert len(details) == len(rows) and all(d.startswith("    ") for d in details)
    assert any("worst at" in d for d in details) and any("exact" in d for d in details)


def test_junit_carries_the_op_and_hook_rows_with_their_details(tmp_path):
    junit = tmp_path / "out.xml"
    assert _conform("--include", "^soft_moe__p1$", "--junit", str(junit)).exit_code == 0
    suite = ET.parse(junit).getroot()
    op = suite.find("testcase[@classname='op'][@name='cumsum/inclusive']")
    assert op is not None and op.find("system-out").text == "all 4 elements exact"
    hook = suite.find("testcase[@classname='hook'][@name='normal/moments']")
    assert hook is not None and "20000 draws: mean" in hook.find("system-out").text
    skipped = suite.find("testcase[@classname='hook'][@name='grad/quadratic']/skipped")
    assert skipped.get("message").startswith("n/a: NotImplementedError: grad:")

