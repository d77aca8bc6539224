"""Preflight for `make test`: the system libraries the backends load, each missing one named
on one line with the Debian package that provides it, before any venv or test is built.

Without this, a missing library shows up ten minutes later as a skipped backend (or, under
CI, a failed one) with a loader traceback. Stdlib only: it runs on the system python.
Usage: python3 scripts/check_system.py EXTRAS   (EXTRAS as in the Makefile, e.g. test,mlx,tinygrad)
       python3 scripts/check_system.py --blas-extra   (prints ",blas" where MLX needs the mkl wheel)
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import platform
import shutil
import sys
from pathlib import Path


def _loads(*names: str) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _openblas() -> bool:
    """An optimised system BLAS for MLX: mlx_blas's own candidates (stdlib only, so it loads
    here from the checkout before any venv exists), less the pip mkl wheel."""
    path = Path(__file__).resolve().parents[1] / "backends" / "mlx_blas.py"
    spec = importlib.util.spec_from_file_location("mlx_blas", path)
    mlx_blas = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mlx_blas)
    return any("mkl_rt" not in os.path.basename(p) for p in mlx_blas.candidates())


# (extra that needs it, what, found?, Debian package)
CHECKS = [
    ("tinygrad", "clang (tinygrad's CPU device compiles C with it)",
     lambda: bool(shutil.which(os.environ.get("CC", "clang"))), "clang"),
    ("tinygrad", "libOpenCL.so.1, the OpenCL ICD loader (tinygrad's CL device)",
     lambda: _loads("libOpenCL.so.1", "libOpenCL.so"), "ocl-icd-libopencl1"),
    ("tinygrad", "an OpenCL platform driver in /etc/OpenCL/vendors (tinygrad's CL device)",
     lambda: bool(glob.glob("/etc/OpenCL/vendors/*.icd")), "pocl-opencl-icd"),
    ("mlx", "libopenblas.so.0 (MLX on Linux CPU otherwise runs a ~30x slower reference BLAS)",
     _openblas, "libopenblas0-pthread"),
]


def missing(extras: set[str]) -> list[str]:
    if platform.system() != "Linux":  # macOS brings clang, OpenCL and Accelerate itself
        return []
    return [f"missing system library: {what}; install it with `apt-get install {package}`"
            for extra, what, found, package in CHECKS if extra in extras and not found()]


def main(argv: list[str]) -> int:
    if argv[1:] == ["--blas-extra"]:  # make demo: ",blas" when MLX would have no fast BLAS
        needed = platform.system() == "Linux" and platform.machine() == "x86_64" and \
            not _openblas()
        print(",blas" if needed else "")
        return 0
    extras = set(argv[1].split(",")) if len(argv) > 1 else {"mlx", "tinygrad"}
    lines = missing(extras)
    for line in lines:
        print(line, file=sys.stderr)
    if lines:
        print("(or run `SYSCHECK=0 make test` to test without them: those backends are then"
              " reported as skipped)", file=sys.stderr)
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
