"""Backends under test. Every backend that can run here is tested; one that cannot is skipped
with its reason, listed at the end of the run, and under CI a skipped backend is a failure."""

from __future__ import annotations

import os

import pytest

from moe_min.ops import get_backend

# (backend, device) held in this process: the corpus per case, mutants, bench
BACKENDS = [("numpy", None), ("mlx", "cpu")]
# each its own `moe-min conform` process (tests/backend/test_devices.py): tinygrad keeps
# per-device global state, and a process of its own is what a user runs
DEVICE_RUNS = [("tinygrad", "CPU"), ("tinygrad", "CL")]
AUTODIFF = [("mlx", "cpu"), ("tinygrad", "CPU")]  # training tests
MODEL_BACKENDS = [("numpy", None), ("mlx", "cpu")]  # tinygrad compiles per shape: too slow
MODEL_TINYGRAD = ("tinygrad", "CPU")  # ... except for tests marked tinygrad_too (~3 min)
_skipped: dict[str, str] = {}
_cache: dict[str, object] = {}


def backend_id(name, device):
    return f"{name}-{device}" if device else name


def load_backend(name, device):
    key = backend_id(name, device)
    if key not in _cache:
        try:
            _cache[key] = get_backend(name, device)
        except Exception as e:  # the reason is reported, never swallowed
            _cache[key] = e
            _skipped[key] = f"{type(e).__name__}: {e}"
    ops = _cache[key]
    if isinstance(ops, Exception):
        message = f"backend {key} unavailable: {_skipped[key]}"
        if os.environ.get("CI"):
            pytest.fail(message + " (a skipped backend on CI is a failure)")
        pytest.skip(message)
    return ops


def pytest_generate_tests(metafunc):
    """`ops` runs over every backend; a module with MODEL_LEVEL = True over MODEL_BACKENDS."""
    if "ops" in metafunc.fixturenames:
        pool = MODEL_BACKENDS if getattr(metafunc.module, "MODEL_LEVEL", False) else BACKENDS
        if pool is MODEL_BACKENDS and metafunc.definition.get_closest_marker("tinygrad_too"):
            pool = [*MODEL_BACKENDS, MODEL_TINYGRAD]
        metafunc.parametrize("ops", pool, ids=[backend_id(*b) for b in pool], indirect=True)


@pytest.fixture
def ops(request):
    return load_backend(*request.param)


@pytest.fixture(params=AUTODIFF, ids=[backend_id(*b) for b in AUTODIFF])
def autodiff_ops(request):
    return load_backend(*request.param)



def pytest_terminal_summary(terminalreporter):
    pools = BACKENDS + DEVICE_RUNS + AUTODIFF + MODEL_BACKENDS + [MODEL_TINYGRAD]
    tried = [backend_id(*b) for b in pools]
    ran = [b for b in tried if b in _cache and b not in _skipped]
    terminalreporter.write_line(f"backends tested: {', '.join(dict.fromkeys(ran)) or 'none'}")
    for key, why in sorted(_skipped.items()):
        terminalreporter.write_line(f"backend SKIPPED: {key}: {why}")
