"""The NumPy backend: the op contract on plain NumPy arrays, forward only (no autodiff, so its
gradient rows are `n/a`). Float64 by default, so any disagreement with the oracle is a logic
error in the lowering rather than rounding; `dtype="float32"` mimics the frameworks.
"""

from __future__ import annotations

import numpy as np

from moe_min.ops import Caps
from moe_min.tensorio import load_safetensors, save_safetensors


def _bfloat16_round(x: np.ndarray) -> np.ndarray:
    """Round to the nearest bfloat16 (ties to even) through the float32 bit pattern."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).astype(x.dtype)


class NumpyOps:
    name = "numpy"
    caps = Caps(autodiff=False, jit=False, float64=True, devices=("cpu",))

    def __init__(self, device: str = "cpu", dtype: str = "float64"):
        if device != "cpu":
            raise ValueError(f"numpy backend device {device!r}: expected 'cpu'")
        if dtype not in ("float32", "float64"):
            raise ValueError(f"numpy backend dtype {dtype!r}: expected 'float32' or 'float64'")
        self.device = device
        self.dtypes = {"float": np.dtype(dtype), "int": np.dtype(np.int64), "bool": np.dtype(bool)}

    def asarray(self, x, dtype=None):
        x = np.asarray(x)
        if dtype is None:
            dtype = "float" if x.dtype.kind == "f" else "int" if x.dtype.kind in "iu" else "bool"
        return x.astype(self.dtypes[dtype], copy=False)

    def to_numpy(self, x):
        return np.asarray(x)

    def zeros(self, shape, dtype="float"):
        return np.zeros(shape, self.dtypes[dtype])

    def arange(self, n):
        return np.arange(n, dtype=self.dtypes["int"])

    def astype(self, x, dtype):
        return np.asarray(x).astype(self.dtypes[dtype])

    reshape = staticmethod(np.reshape)
    transpose = staticmethod(np.transpose)
    broadcast_to = staticmethod(np.broadcast_to)
    exp = staticmethod(np.exp)
    log = staticmethod(np.log)
    sqrt = staticmethod(np.sqrt)
    tanh = staticmethod(np.tanh)
    cos = staticmethod(np.cos)
    sin = staticmethod(np.sin)
    maximum = staticmethod(np.maximum)
    where = staticmethod(np.where)
    sum = staticmethod(np.sum)
    mean = staticmethod(np.mean)
    max = staticmethod(np.max)
    matmul = staticmethod(np.matmul)
    cumsum = staticmethod(np.cumsum)
    take_along_axis = staticmethod(np.take_along_axis)

    def take(self, x, idx, axis):
        return np.take(x, idx, axis=axis)

    def concatenate(self, xs, axis):
        return np.concatenate(xs, axis=axis)

    def erf(self, x):
        from math import erf  # NumPy has no erf; the vectorised stdlib one is exact enough

        return np.vectorize(erf, otypes=[x.dtype])(x) if x.size else x

    def sigmoid(self, x):
        return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow for large |x|

    def logsumexp(self, x, axis, keepdims=False):
        m = np.max(x, axis=axis, keepdims=True)
        out = m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))
        return out if keepdims else np.squeeze(out, axis=axis)

    def softmax(self, x, axis):
        e = np.exp(x - np.max(x, axis=axis, keepdims=True))
        return e / np.sum(e, axis=axis, keepdims=True)

    def all_finite(self, x):
        return bool(np.isfinite(x).all())

    def argsort(self, x, axis=-1, descending=False):
        # negating keeps a stable sort stable: equal keys stay in index order both ways
        return np.argsort(-x if descending else x, axis=axis, kind="stable")

    def top_k(self, x, k, axis=-1):
        idx = np.take(np.argsort(-x, axis=axis, kind="stable"), np.arange(k), axis=axis)
        return np.take_along_axis(x, idx, axis=axis), idx

    def scatter_add(self, x, idx, src, axis):
        axis = axis % x.ndim
        grid = list(np.indices(idx.shape, sparse=True))
        grid[axis] = idx
        flat = np.ravel_multi_index(tuple(np.broadcast_arrays(*grid)), x.shape)
        # bincount sums repeated indices like np.add.at, an order of magnitude faster
        added = np.bincount(flat.ravel(), weights=np.ravel(src), minlength=x.size)
        return x + added.reshape(x.shape).astype(x.dtype)

    def stop_gradient(self, x):
        return x

    def round_bfloat16(self, x):
        return _bfloat16_round(x)

    # training hooks: NumPy has no autodiff, so gradient rows are reported "n/a"
    def grad(self, fn, params, x):
        raise NotImplementedError("grad: the numpy backend has no autodiff")

    def value_and_grad(self, fn):
        raise NotImplementedError("value_and_grad: the numpy backend has no autodiff")

    def compile(self, fn):
        return fn

    def seed(self, seed):
        self._rng = np.random.default_rng(seed)

    def normal(self, shape):
        if not hasattr(self, "_rng"):
            self.seed(0)
        return self._rng.standard_normal(shape).astype(self.dtypes["float"])

    def save(self, path, tensors):
        save_safetensors(path, {k: np.asarray(v) for k, v in tensors.items()}, {})

    def load(self, path):
        return {k: self.asarray(v) for k, v in load_safetensors(path)[0].items()}
