"""Every device a backend reaches here runs the whole corpus as a process of its own, the way
a user runs it: `moe-min conform BACKEND --device D`. Under CI a device that is missing fails."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import DEVICE_RUNS, backend_id, load_backend


@pytest.mark.parametrize("name, device", DEVICE_RUNS, ids=[backend_id(*r) for r in DEVICE_RUNS])
def test_device_passes_the_whole_corpus(name, device, tmp_path):
    ops = load_backend(name, device)  # skips (or fails under CI) with the reason
    assert device in ops.caps.devices, f"{name} sees {ops.caps.devices}, not {device}"
    junit = tmp_path / "conform.xml"
    cli = Path(sys.executable).with_name("moe-min")
    result = subprocess.run([str(cli), "conform", name, "--device", device, "--junit",
                             str(junit)], capture_output=True, text=True, timeout=1500,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr
    failed = [line for line in result.stdout.splitlines() if line.rstrip().endswith("failed")]
    assert result.returncode == 0, f"{last}\n" + "\n".join(failed[:20]) + result.stderr[-2000:]
    assert last.endswith(" 0 failed"), last
    suite = ET.parse(junit).getroot()
    assert int(suite.get("tests")) > 1000 and suite.get("failures") == "0"
    assert "unsupported" not in result.stdout and "n/a" not in last
