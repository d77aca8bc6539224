"""Backends broken the ways a new user's backend was broken unnoticed (issue 12): every one of
them must fail the conformance run on a row that names the op or hook, and the run must go
on to the end (a table and a closing list, never a traceback)."""

from __future__ import annotations

import re

import numpy as np
from click.testing import CliRunner

from conftest import load_backend
from moe_min import cli
from moe_min.backends.ops_numpy import NumpyOps
from moe_min.conformance.runner import Runner

CASE = "token_choice__k2_cf0.5_drop-position"  # small; drops, so every routing op matters
GRAD_CASE = "token_choice__k1_one-expert"  # the smallest case with stored gradients


class Wrapped:
    """A backend seen through a wrapper: every attribute is the wrapped one's unless the
    subclass overrides it, or names it in `absent`."""

    absent: tuple[str, ...] = ()

    def __init__(self, ops):
        self._ops = ops

    def __getattr__(self, name):
        if name in self.absent:
            raise AttributeError(name)
        return getattr(self._ops, name)


class BrokenHooks(Wrapped):
    """value_and_grad returns zero gradients, compile a function that gives zeros, normal
    zeros, save and load raise: all at once."""

    def value_and_grad(self, fn):
        real = self._ops.value_and_grad(fn)

        def zeroed(params, *args):
            value, grads = real(params, *args)
            return value, {k: g * 0.0 for k, g in grads.items()}
        return zeroed

    def compile(self, fn):
        return lambda *args: fn(*args) * 0.0

    def normal(self, shape):
        return self._ops.zeros(shape)

    def save(self, path, tensors):
        raise OSError(f"{path}: broken on purpose")

    def load(self, path):
        raise OSError(f"{path}: broken on purpose")


class HooksNotImplemented(Wrapped):
    def _refuse(self, *args):
        raise NotImplementedError("this backend has no such hook")

    compile = seed = normal = save = load = _refuse


class NoCumsum(Wrapped):
    absent = ("cumsum",)


class ScatterOverwrites(NumpyOps):
    def scatter_add(self, x, idx, src, axis):  # assignment: a repeated index keeps one write
        out = np.array(x, copy=True)
        np.put_along_axis(out, idx, src, axis)
        return out


class ExclusiveCumsum(NumpyOps):
    def cumsum(self, x, axis):
        return np.cumsum(x, axis=axis) - x


class UniformNormal(NumpyOps):
    def normal(self, shape):  # unit variance, but not normal
        if not hasattr(self, "_rng"):
            self.seed(0)
        return self._rng.uniform(-np.sqrt(3.0), np.sqrt(3.0), shape)


def _failed(rows, case):
    return {r.quantity: r.detail for r in rows if r.status == "failed" and r.case == case}


def _hooks_named(failed):
    return {q.split("/")[0] for q in failed}


def test_broken_hooks_on_numpy_fail_rows_naming_each_hook():
    rows = Runner(BrokenHooks(NumpyOps())).include(CASE).run()
    assert _hooks_named(_failed(rows, "hook")) == {"compile", "normal", "save", "load"}
    assert not _failed(rows, "op") and not _failed(rows, CASE)  # the corpus alone is blind


def test_broken_hooks_with_autodiff_fail_value_and_grad_too():
    ops = load_backend("mlx", "cpu")
    rows = Runner(BrokenHooks(ops)).include(GRAD_CASE).run()
    failed = _failed(rows, "hook")
    assert _hooks_named(failed) == {"value_and_grad", "compile", "normal", "save", "load"}
    assert "value_and_grad/token_choice" in failed and "value_and_grad/quadratic" in failed
    assert "grad/quadratic" not in failed  # grad itself is intact
    assert not _failed(rows, GRAD_CASE)  # the corpus's grad rows use grad, not value_and_grad


def test_a_hook_that_is_not_implemented_is_na_never_passed():
    rows = [r for r in Runner(HooksNotImplemented(NumpyOps())).include(CASE).run()
            if r.case == "hook"]
    assert {r.quantity.split("/")[0] for r in rows} == {
        "grad", "value_and_grad", "compile", "seed", "normal", "save", "load"}
    assert {r.status for r in rows} == {"n/a"}, [(r.quantity, r.status) for r in rows]


def test_a_uniform_generator_fails_the_moments_row():
    failed = _failed(Runner(UniformNormal()).include(CASE).run(), "hook")
    assert list(failed) == ["normal/moments"] and "within 1σ" in failed["normal/moments"]


def test_a_missing_op_is_a_row_and_the_run_goes_on():
    rows = Runner(NoCumsum(NumpyOps())).include(CASE).run()
    assert _failed(rows, "op") == {"cumsum": "missing: cumsum"}
    assert rows[0].detail == "missing: cumsum"  # the contract row
    failed = _failed(rows, CASE)
    assert failed and all(d.startswith("missing: cumsum; suspect: cumsum (missing)")
                          for d in failed.values()), failed
    assert not _failed(rows, "hook")


def test_a_missing_op_through_the_cli_gives_the_table_not_a_traceback(monkeypatch):
    monkeypatch.setattr(cli, "_backend", lambda name, device: NoCumsum(NumpyOps()))
    result = CliRunner().invoke(cli.main, ["conform", "numpy", "--include", CASE])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("case") and "op cumsum: missing: cumsum" in result.output
    assert re.fullmatch(r"\d+ passed, \d+ failed, \d+ n/a", lines[-1]), lines[-1]
    assert "failed rows (" in result.output and "Traceback" not in result.output


def _suspect_test(ops, op):
    rows = Runner(ops).include(CASE).run()
    failed_ops = _failed(rows, "op")
    assert failed_ops and {q.split("/")[0] for q in failed_ops} == {op}, failed_ops
    failed = _failed(rows, CASE)
    assert failed, "the corpus rows should fail too"
    for quantity, detail in failed.items():
        assert f"suspect: {op} (its op rows failed)" in detail, (quantity, detail)
        assert "uses: " in detail and "why: " in detail


def test_scatter_add_overwriting_fails_its_op_rows_and_is_named_suspect():
    _suspect_test(ScatterOverwrites(), "scatter_add")


def test_an_exclusive_cumsum_fails_its_op_rows_and_is_named_suspect():
    _suspect_test(ExclusiveCumsum(), "cumsum")
