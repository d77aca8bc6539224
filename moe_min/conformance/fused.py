"""The optional fused ops (moe_min/ops.py FAST_OPS) held to their composites: for each fused op
a backend provides, whether or not its lowering uses it by default on this device, the op and
the composite of moe_min/layers.py run on the same backend and the same small inputs, forward
and (with autodiff) the gradient of Σ out·cotangent with respect to every float input. The
inputs carry the awkward parts: positions out of order and repeated, masked keys, a padding
query with no allowed key (compared only where the contract defines it), an expert with no rows.
The corpus cases hold the composites to the oracle; these rows hold the fused ops to them.
"""

from __future__ import annotations

import numpy as np

from moe_min import layers
from moe_min.ops import fast_ops
from moe_min.routing import activation
from moe_min.spec import ExpertMLP

TOLERANCE = (1e-4, 1e-5)  # float32 against float32: a fused kernel may sum in another order


def _rms_norm(rng):
    x, gain = rng.standard_normal((2, 5, 16)) * 3, rng.standard_normal(16)
    return {"x": x, "gain": gain}, lambda ops, fused, a: layers.rms_norm(
        ops, a["x"], a["gain"], 1e-5, fused=fused), None


def _rope(rng):
    positions = np.array([[0, 7, 3, 3, 250, 1], [5, 4, 3, 2, 1, 0]], np.int32)
    return {"v": rng.standard_normal((2, 3, 6, 8))}, lambda ops, fused, a: layers.rotate(
        ops, [a["v"]], ops.asarray(positions, "int"), 10000.0, fused=fused)[0], None


def _attention(rng):
    B, H, Nq, Nk, Dh = 2, 2, 4, 6, 8
    q_pos = np.array([[0, 2, 5, 9], [1, 1, 3, 0]], np.int32)
    k_pos = np.array([[0, 1, 2, 5, 6, 9], [1, 1, 2, 3, 4, 5]], np.int32)
    k_valid = np.array([[1, 1, 0, 1, 1, 1], [0, 1, 1, 1, 1, 1]], bool)  # batch 1, query 3: none

    def call(ops, fused, a):
        return layers.attention(ops, a["q"], a["k"], a["v"], ops.asarray(q_pos, "int"),
                                ops.asarray(k_pos, "int"), ops.asarray(k_valid, "bool"),
                                fused=fused)
    defined = np.ones((B, H, Nq, Dh), bool)
    defined[1, :, 3] = False  # a row with no allowed key is padding: any finite value
    return {n: rng.standard_normal((B, H, Nq if n == "q" else Nk, Dh)) for n in "qkv"}, \
        call, defined


def _grouped_mlp(rng):
    E, N, D, H = 4, 9, 6, 10
    expert = np.array([0, 0, 0, 1, 3, 3, 3, 3, 3], np.int32)  # sorted; expert 2 has no rows
    arrays = {"x": rng.standard_normal((N, D)), "w1": rng.standard_normal((E, D, H)) / 3,
              "w2": rng.standard_normal((E, H, D)) / 3, "w3": rng.standard_normal((E, D, H)) / 3}
    spec = ExpertMLP(hidden=H, activation="silu", glu=True)

    def call(ops, fused, a):
        idx = ops.asarray(expert, "int")
        if fused:
            return ops.grouped_mlp(a["x"], idx, a["w1"], a["w2"], a["w3"],
                                   lambda h: activation(ops, "silu", h))
        rows = ops.reshape(a["x"], (N, 1, D))  # each row alone through its expert's weights
        w1, w2, w3 = (ops.take(a[w], idx, axis=0) for w in ("w1", "w2", "w3"))
        return ops.reshape(layers.mlp(ops, spec, rows, w1, w2, w3), (N, D))
    return arrays, call, None


def _take_rows(rng):
    idx = np.array([4, 0, 4, 2, 0, 4, 5], np.int32)  # row 1 and 3 never read, 4 three times
    back = np.full((6, 3), len(idx), np.int32)  # the whole inverse: every read listed
    for n in range(6):
        found = np.flatnonzero(idx == n)
        back[n, :len(found)] = found
    return {"x": rng.standard_normal((6, 5))}, lambda ops, fused, a: (
        ops.take_rows(a["x"], ops.asarray(idx, "int"), ops.asarray(back, "int")) if fused
        else ops.take(a["x"], ops.asarray(idx, "int"), axis=0)), None


def _scatter_rows(rng):
    rows = np.array([4, 0, 4, 2, 0, 4, 5], np.int32)  # repeats accumulate; rows 1, 3 untouched
    arrays = {"x": rng.standard_normal((6, 5)), "src": rng.standard_normal((7, 5))}

    def call(ops, fused, a):
        idx = ops.asarray(rows, "int")
        return ops.scatter_rows(a["x"], idx, a["src"]) if fused else ops.scatter_add(
            a["x"], ops.broadcast_to(ops.reshape(idx, (7, 1)), (7, 5)), a["src"], axis=0)
    return arrays, call, None


CHECKS = {"take_rows": _take_rows, "scatter_rows": _scatter_rows, "rms_norm": _rms_norm, "rope": _rope, "attention": _attention,
          "grouped_mlp": _grouped_mlp}


def comparisons(ops, name: str, seed: int = 0) -> list[tuple]:
    """(quantity, fused result, composite result, tolerance), NumPy arrays, for the fused op
    `name` of `ops`; quantities: "forward", "forward finite" and "grad/<input>". The fused op
    runs even where the backend's lowering does not use it by default (`ops.fused`)."""
    rng = np.random.default_rng(seed)
    arrays, call, defined = CHECKS[name](rng)
    inputs = {k: ops.asarray(v.astype(np.float32)) for k, v in arrays.items()}
    use_all = _WithEvery(ops)
    got, want = (ops.to_numpy(call(use_all, fused, inputs)) for fused in (True, False))
    mask = np.ones(np.shape(want), bool) if defined is None else defined
    out = [("forward", np.where(mask, got, 0), np.where(mask, want, 0)),
           ("forward finite", np.isfinite(got).all(keepdims=True) * 1.0,
            np.ones((1,) * np.ndim(got)))]
    if ops.caps.autodiff:
        cotangent = ops.asarray((rng.standard_normal(np.shape(want)) * mask).astype(np.float32))
        params = {f"in/{k}": v for k, v in inputs.items()}  # "x" is grad's own argument

        def loss(p, _, fused):
            return ops.sum(call(use_all, fused, {k[3:]: v for k, v in p.items()}) * cotangent)
        grads = [ops.grad(lambda p, x, f=fused: loss(p, x, f), params, ops.zeros((1,)))
                 for fused in (True, False)]
        out += [(f"grad/{k}", ops.to_numpy(grads[0][f"in/{k}"]), ops.to_numpy(grads[1][f"in/{k}"]))
                for k in sorted(arrays)]
    return [(*row, TOLERANCE) for row in out]


class _WithEvery:
    """The backend with every fused op it provides in use, whatever its device's default."""

    def __init__(self, ops):
        self._ops, self.fused = ops, tuple(fast_ops(ops))

    def __getattr__(self, name):
        return getattr(self._ops, name)
