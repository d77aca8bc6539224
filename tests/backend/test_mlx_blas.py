"""MLX on Linux CPU runs its matmuls on an optimised BLAS: importing the MLX adapter, in a fresh
process, loads one with global symbol scope before mlx.core, and the `cblas_sgemm` that MLX's
own library calls resolves into it (reference/backends.md §1). No timings: only the mechanism."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="MLX is not installed"),
    pytest.mark.skipif(not sys.platform.startswith("linux"),
                       reason="the reference-BLAS trap is Linux-only (macOS MLX uses Accelerate)"),
]

PROBE = r"""
import ctypes, json, os
import moe_min.backends.ops_mlx  # must load the BLAS before mlx.core
from moe_min.backends import mlx_blas
import mlx.core as mx
status = mlx_blas.blas_status()  # runs one float32 matmul, so the lazy PLT slot is bound
with open("/proc/self/maps") as f:
    mapped = sorted({line.split()[-1] for line in f if ".so" in line})
print(json.dumps({"status": status, "mapped": mapped,
                  "global": mlx_blas._global_provider("cblas_sgemm"),
                  "mlx": mlx_blas.mlx_sgemm_provider(),
                  "reference": mlx_blas.mlx_blas_link(mlx_blas.mlx_library())}))
"""


def probe() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # test our loader alone
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    if done.returncode:
        if "No module named 'mlx" in done.stderr:
            pytest.skip("MLX is not importable: " + done.stderr.strip().splitlines()[-1])
        pytest.fail(f"probe failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_mlx_matmul_resolves_to_an_optimised_blas():
    got = probe()
    status, link = got["status"], got["reference"]
    if not link["reference"]:  # a wheel that links an optimised BLAS needs no fix
        assert got["mlx"] and not got["mlx"].endswith("libmlx.so"), got
        return
    loaded = status["loaded"].split(" (")[0]
    assert loaded, (f"MLX links the reference BLAS {link['path']} and no optimised BLAS was "
                    f"loaded ({status.get('note', '')}): install libopenblas0-pthread "
                    f"(apt-get install libopenblas0-pthread) or set MOE_MIN_BLAS=/path/to/lib.so")
    real = os.path.realpath(loaded)
    assert real in got["mapped"], f"{real} is not mapped into the process"
    # RTLD_GLOBAL: the process's global scope (dlsym(RTLD_DEFAULT)) finds cblas_sgemm in it
    assert got["global"] == real, f"global cblas_sgemm comes from {got['global']}, not {real}"
    # and MLX's own call site (libmlx.so's GOT slot, bound by a matmul) lands in it too
    assert got["mlx"] == real, f"MLX's cblas_sgemm resolves to {got['mlx']}, not {real}"
    assert status["in_use"] == "yes", status


def test_without_a_system_openblas_the_mkl_wheel_is_the_candidate(monkeypatch, tmp_path):
    from moe_min.backends import mlx_blas

    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libmkl_rt.so.2").write_bytes(b"")
    monkeypatch.delenv(mlx_blas.ENV, raising=False)
    monkeypatch.setattr(mlx_blas.sys, "prefix", str(tmp_path))
    monkeypatch.setattr(mlx_blas.os.path, "exists", lambda p: False)  # no /usr/lib openblas
    monkeypatch.setattr(mlx_blas.ctypes.util, "find_library", lambda name: None)
    found = mlx_blas.candidates()
    assert found == [str(tmp_path / "lib" / "libmkl_rt.so.2")]
    assert "mkl wheel" in mlx_blas.why(found[0])
    assert "system OpenBLAS" in mlx_blas.why("/usr/lib/x86_64-linux-gnu/libopenblas.so.0")


def test_make_demo_adds_the_blas_extra_only_without_a_system_openblas():
    script = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "check_system.py")
    out = subprocess.run([sys.executable, script, "--blas-extra"], capture_output=True,
                         text=True, check=True).stdout.strip()
    from moe_min.backends import mlx_blas

    system = [p for p in mlx_blas.candidates() if "mkl" not in p]
    assert out == ("" if system or os.environ.get(mlx_blas.ENV) else ",blas"), (out, system)
