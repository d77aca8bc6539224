"""The optional fused ops: held to their composites by the conformance rows, a broken one
caught by the row of its own op, and used by the lowering only where the backend says so."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from moe_min import layers
from moe_min.conformance import fused
from moe_min.conformance.runner import Runner
from moe_min.models import lm
from moe_min.models.train import model_config
from moe_min.ops import choose_fused, fast_ops, get_backend

# MLX is the backend with fused ops; its adapter picks the BLAS before mlx.core loads
mx = pytest.importorskip("moe_min.backends.ops_mlx", reason="MLX is not installed").mx


def test_every_fused_op_a_backend_provides_matches_its_composite(ops):
    rows = Runner(ops).fused_rows()
    assert {r.case for r in rows} == {f"fused {n}" for n in fast_ops(ops) if n in fused.CHECKS}
    failed = [f"{r.case} {r.quantity}: {r.detail}" for r in rows if r.status == "failed"]
    assert not failed, failed
    if ops.caps.autodiff:  # a gradient row per float input of every op
        assert all(any(r.case == f"fused {n}" and r.quantity.startswith("grad/") for r in rows)
                   for n in fast_ops(ops))


class Broken:
    """The MLX backend with one fused op replaced."""

    def __init__(self, ops, **replaced):
        self._ops, self._replaced = ops, replaced

    def __getattr__(self, name):
        return self._replaced.get(name) or getattr(self._ops, name)


def _no_gain(x, gain, eps):
    return mx.fast.rms_norm(x, None, eps)


def _traditional_rope(v, positions, base):
    B, H, N, Dh = v.shape
    rows = mx.reshape(mx.transpose(v, (0, 2, 1, 3)), (B * N, H, 1, Dh))
    out = mx.fast.rope(rows, Dh, traditional=True, base=base, scale=1.0,
                       offset=mx.reshape(positions, (-1,)))
    return mx.transpose(mx.reshape(out, (B, N, H, Dh)), (0, 2, 1, 3))


def _unmasked_attention(q, k, v, allowed):
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5)


def _keys_without_gradient(q, k, v, allowed):
    return get_backend("mlx").attention(q, mx.stop_gradient(k), v, allowed)


def _without_w3(x, expert, w1, w2, w3, act):
    return get_backend("mlx").grouped_mlp(x, expert, w1, w2, None, act)


def _first_read_only(x, idx, back):  # a row read twice gets the gradient of one read
    return get_backend("mlx").take_rows(x, idx, back[:, :1])


def _rows_onto_zeros(x, rows, src):  # x itself forgotten
    return mx.zeros_like(x).at[rows.astype(mx.int32)].add(src)


def _src_without_gradient(x, rows, src):
    return x.at[rows.astype(mx.int32)].add(mx.stop_gradient(src))


@pytest.mark.parametrize("op, broken, failing", [
    ("scatter_rows", _rows_onto_zeros, {"forward", "grad/x"}),
    ("scatter_rows", _src_without_gradient, {"grad/src"}),
    ("take_rows", _first_read_only, {"grad/x"}),
    ("rms_norm", _no_gain, {"forward", "grad/x", "grad/gain"}),
    ("rope", _traditional_rope, {"forward", "grad/v"}),
    ("attention", _unmasked_attention, {"forward", "grad/q", "grad/k", "grad/v"}),
    ("attention", _keys_without_gradient, {"grad/k"}),
    ("grouped_mlp", _without_w3, {"forward", "grad/x", "grad/w1", "grad/w2", "grad/w3"}),
])
def test_a_broken_fused_op_fails_the_rows_of_that_op_only(op, broken, failing):
    rows = Runner(Broken(get_backend("mlx"), **{op: broken})).fused_rows()
    failed = {(r.case, r.quantity) for r in rows if r.status == "failed"}
    assert failed == {(f"fused {op}", q) for q in failing}


def test_a_fused_op_that_raises_is_a_failed_row_and_the_run_goes_on():
    def raises(*args):
        raise RuntimeError("no kernel for this shape")
    rows = Runner(Broken(get_backend("mlx"), rope=raises)).fused_rows()
    rope_rows = [r for r in rows if r.case == "fused rope"]
    assert [(r.quantity, r.status) for r in rope_rows] == [("forward", "failed")]
    assert rope_rows[0].detail == "RuntimeError: no kernel for this shape"
    assert {r.case for r in rows if r.status == "passed"} == {
        f"fused {n}" for n in fused.CHECKS if n != "rope"}


def test_the_lowering_uses_exactly_the_fused_ops_the_backend_chose():
    called = []

    def spy(name):
        real = getattr(get_backend("mlx"), name)
        return lambda *a: called.append(name) or real(*a)
    spies = {n: spy(n) for n in ("rms_norm", "rope", "attention")}
    config = replace(model_config("tiny-dense"), vocab=32, dim=32, heads=2, layers=1, context=8)
    params = lm.init_params(config, 0)
    tokens = np.arange(16).reshape(2, 8) % 32
    logits = {}
    for choice in ("none", "rms_norm,attention", "all"):
        base = get_backend("mlx", fused=choice)
        ops = Broken(base, **spies)
        called.clear()
        logits[choice] = np.asarray(lm.forward(ops, config, {k: ops.asarray(v) for k, v in
                                                           params.items()}, tokens)[0])
        assert set(called) == set(choose_fused(choice, ())) & set(spies)
    np.testing.assert_allclose(logits["all"], logits["none"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits["rms_norm,attention"], logits["none"], rtol=1e-4, atol=1e-4)


def test_fused_choice_is_validated_with_the_accepted_values(monkeypatch):
    assert choose_fused("default", ("grouped_mlp",)) == ("grouped_mlp",)
    monkeypatch.setenv("MOE_MIN_FUSED", "rope")
    assert get_backend("mlx").fused == ("rope",)
    with pytest.raises(ValueError, match=r"fused ops 'rope,rms': expected all, none, default"):
        get_backend("mlx", fused="rope,rms")
    assert layers.fast_op(get_backend("mlx", fused="none"), "rope") is None
