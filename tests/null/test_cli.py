"""`moe-min conform` as a user runs it: table, closing line, filters, JUnit, exit codes."""

from __future__ import annotations

import re
import shutil
import xml.etree.ElementTree as ET

import numpy as np
from click.testing import CliRunner

from moe_min.cli import main
from moe_min.conformance.case import CASES_DIR, case_paths
from moe_min.tensorio import load_safetensors, save_safetensors


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
    tensors, meta = load_safetensors(dst)
    tensors["expect/y"] = tensors["expect/y"] + np.eye(*tensors["expect/y"].shape[-2:]) * 0.1
    save_safetensors(dst, tensors, meta)
    result = _conform("--cases", str(tmp_path), "-v")
    assert result.exit_code == 1
    assert re.search(r"token_choice__k2_glu\s+y\s+1\.00e-01\s+\S+\s+failed", result.output)
    assert "worst at" in result.output and "np.float64" not in result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].endswith("1 failed, 5 n/a")
    assert lines[-3] == "failed rows (1):" and lines[-2].startswith("  token_choice__k2_glu y: ")
