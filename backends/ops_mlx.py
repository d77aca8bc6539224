"""The MLX backend: the op contract on `mlx.core` arrays, float32 compute and int32 indices,
with autodiff (mx.grad), jit (mx.compile), a replayable seeded generator and safetensors I/O.
Every MLX quirk the contract has to paper over lives in this file, one comment each.
On Linux CPU, `mlx_blas` swaps MLX's bundled reference BLAS for OpenBLAS; it has to run
before `mlx.core` is first imported, hence the import order below.
"""

from __future__ import annotations

from moe_min.backends import mlx_blas  # noqa: I001 - must load the BLAS before mlx.core

mlx_blas.ensure()

import os  # noqa: E402
import tempfile  # noqa: E402
from importlib import metadata  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from moe_min.ops import FAST_OPS, Caps, choose_fused  # noqa: E402

_NUMPY = {"float": np.float32, "int": np.int32, "bool": np.bool_}


def _gpu_available() -> bool:
    # mx.is_available covers Metal and CUDA builds; older releases only have mx.metal
    try:
        return bool(mx.is_available(mx.gpu))
    except AttributeError:
        return bool(mx.metal.is_available())


def _head(x, axis: int, k: int):
    """The first k entries of x along axis (basic slicing)."""
    return x[(slice(None),) * (axis % x.ndim) + (slice(0, k),)]


class MlxOps:
    name = "mlx"
    caps = Caps(autodiff=True, jit=True, float64=False,
                devices=("cpu", "gpu") if _gpu_available() else ("cpu",))

    def __init__(self, device: str | None = None, fused: str | None = None):
        device = device or ("gpu" if "gpu" in self.caps.devices else "cpu")
        if device not in self.caps.devices:
            raise ValueError(f"mlx backend device {device!r}: expected one of "
                             f"{', '.join(self.caps.devices)}")
        # MLX arrays have no device, ops run on a stream: the lowering's operators (+, @, ...)
        # take the default device, so selecting one means setting the default
        mx.set_default_device(mx.gpu if device == "gpu" else mx.cpu)
        self.device = device
        # all four are provided (and conformance-checked) everywhere; on the CPU mx.fast's
        # rms_norm, rope and attention measured slower than the composites (`moe-min bench
        # fused`, README), on a GPU they are Metal/CUDA kernels
        self.fused = choose_fused(fused, FAST_OPS if device == "gpu" else (
            "grouped_mlp", "take_rows", "scatter_rows"))
        self.dtypes = {"float": mx.float32, "int": mx.int32, "bool": mx.bool_}
        self.seed(0)

    def info(self) -> dict[str, str]:
        blas = mlx_blas.blas_status()
        out = {"mlx": metadata.version("mlx"), "device": str(mx.default_device()),
               "blas": blas.get("mlx_cblas_sgemm") or blas.get("mlx_links", ""),
               "blas_in_use": blas.get("in_use", "")}
        return out | {f"blas_{k}": v for k, v in blas.items() if k in ("loaded", "note")}

    # conversion and creation
    def _kind(self, dtype) -> str:
        if dtype == mx.bool_:
            return "bool"
        if mx.issubdtype(dtype, mx.integer):
            return "int"
        if mx.issubdtype(dtype, mx.floating):
            return "float"
        raise NotImplementedError(f"asarray: MLX backend has no counterpart for dtype {dtype}")

    def asarray(self, x, dtype=None):
        if isinstance(x, mx.array):
            want = self.dtypes[dtype or self._kind(x.dtype)]
            return x if x.dtype == want else x.astype(want)
        x = np.asarray(x)
        if dtype is None:
            if x.dtype.kind not in "biuf":
                raise NotImplementedError(f"asarray: MLX backend has no {x.dtype} arrays")
            dtype = "float" if x.dtype.kind == "f" else "int" if x.dtype.kind in "iu" else "bool"
        # MLX would turn float64 into float32 but keep int64: convert on the NumPy side
        return mx.array(x.astype(_NUMPY[dtype], copy=False))

    def to_numpy(self, x):
        if isinstance(x, mx.array) and x.dtype == mx.bfloat16:  # NumPy has no bfloat16
            x = x.astype(mx.float32)
        return np.array(x)

    def zeros(self, shape, dtype="float"):
        return mx.zeros(tuple(shape), self.dtypes[dtype])

    def arange(self, n):
        return mx.arange(n, dtype=mx.int32)

    def astype(self, x, dtype):
        return self.asarray(x, dtype)

    # shape
    def reshape(self, x, shape):
        return mx.reshape(x, tuple(shape))

    def transpose(self, x, axes):
        return mx.transpose(x, tuple(axes))

    def concatenate(self, xs, axis):
        return mx.concatenate(list(xs), axis=axis)

    def broadcast_to(self, x, shape):
        return mx.broadcast_to(x, tuple(shape))

    # elementwise
    exp = staticmethod(mx.exp)
    log = staticmethod(mx.log)
    sqrt = staticmethod(mx.sqrt)
    tanh = staticmethod(mx.tanh)
    erf = staticmethod(mx.erf)
    sigmoid = staticmethod(mx.sigmoid)
    cos = staticmethod(mx.cos)
    sin = staticmethod(mx.sin)
    maximum = staticmethod(mx.maximum)
    where = staticmethod(mx.where)
    matmul = staticmethod(mx.matmul)
    stop_gradient = staticmethod(mx.stop_gradient)

    # reductions
    def sum(self, x, axis=None, keepdims=False):
        return mx.sum(x, axis=axis, keepdims=keepdims)

    def mean(self, x, axis=None, keepdims=False):
        return mx.mean(x, axis=axis, keepdims=keepdims)

    def max(self, x, axis=None, keepdims=False):
        return mx.max(x, axis=axis, keepdims=keepdims)

    def logsumexp(self, x, axis, keepdims=False):
        return mx.logsumexp(x, axis=axis, keepdims=keepdims)

    def softmax(self, x, axis):
        return mx.softmax(x, axis=axis)

    def all_finite(self, x):
        # .item() forces evaluation: the contract wants a Python bool, not a lazy array
        return bool(mx.all(mx.isfinite(x)).item())

    def cumsum(self, x, axis):
        return mx.cumsum(x, axis=axis)

    # order and indexing
    def argsort(self, x, axis=-1, descending=False):
        # argsort stability: what MLX does with equal keys may vary by device and version, so
        # the order is made unique: re-sort on (run of equal values, index), one right answer
        x = mx.stop_gradient(x)
        if x.dtype == mx.bool_:
            x = x.astype(mx.int32)
        moved = mx.swapaxes(x, axis, -1)
        n = moved.shape[-1]
        if moved.size == 0:
            return mx.zeros(x.shape, mx.int32)
        first = mx.argsort(moved, axis=-1).astype(mx.int32)  # MLX gives uint32 indices
        if descending:
            first = first[..., ::-1]  # equal values stay adjacent, index order fixed below
        v = mx.take_along_axis(moved, first, axis=-1)
        new = v[..., 1:] != v[..., :-1]
        if mx.issubdtype(v.dtype, mx.floating):  # NaNs are one run, not one each
            new = new & ~(mx.isnan(v[..., 1:]) & mx.isnan(v[..., :-1]))
        wide = mx.int32 if n * n < 2**31 else mx.int64  # the key runs up to n²
        run = mx.cumsum(new.astype(wide), axis=-1)
        key = mx.concatenate([mx.zeros((*run.shape[:-1], 1), wide), run], axis=-1) * n + first
        order = mx.take_along_axis(first, mx.argsort(key, axis=-1).astype(mx.int32), axis=-1)
        return mx.stop_gradient(mx.swapaxes(order, axis, -1))

    def top_k(self, x, k, axis=-1):
        # mx.topk returns values only, in no order: take the head of the stable descending sort
        idx = _head(self.argsort(x, axis, descending=True), axis, k)
        return mx.take_along_axis(x, idx, axis=axis), idx

    def take(self, x, idx, axis):
        idx = mx.stop_gradient(idx if idx.dtype == mx.int32 else idx.astype(mx.int32))
        return mx.take(x, idx, axis=axis)

    # optional fused ops (moe_min/grouped.py): the lowering uses them when present
    def grouped_mlp(self, x, expert, w1, w2, w3, act):
        """Each row of x (N, D), sorted by expert, through its expert's MLP: act(x @ w1[e])
        (times x @ w3[e] if w3) @ w2[e]. On the CPU: the run of rows of each expert through
        BLAS matmuls, the run lengths read on the host (gather_mm bypasses the BLAS there:
        reference backends.md §1), rows and weights cut by split, whose VJP concatenates (a
        slice's pads a zero array of the whole weight per expert). On a GPU, or inside
        mx.compile where nothing can be read, gather_mm over the sorted rows."""
        expert = mx.stop_gradient(expert.astype(mx.int32))
        counts = None
        if self.device == "cpu":
            try:
                counts = np.bincount(np.array(expert), minlength=w1.shape[0])
            except ValueError:  # traced by mx.compile
                counts = None
        if counts is None:
            def mm(a, w):
                return mx.gather_mm(a[:, None, :], w, rhs_indices=expert,
                                    sorted_indices=True)[:, 0]
            h = act(mm(x, w1)) * (mm(x, w3) if w3 is not None else 1.0)
            return mm(h, w2)
        rows = mx.split(x, np.cumsum(counts)[:-1].tolist(), axis=0)
        experts = zip(*(mx.split(w, w.shape[0], axis=0) for w in (w1, w2, w3) if w is not None))
        parts = []
        for r, n, ws in zip(rows, counts, experts):
            if n:
                h = act(r @ ws[0][0]) * (r @ ws[2][0] if w3 is not None else 1.0)
                parts.append(h @ ws[1][0])
        return mx.concatenate(parts, axis=0)

    def take_rows(self, x, idx, back):
        # MLX's take VJP is a scatter-add, ~20x the gather on the CPU: the caller knows the
        # inverse, so the VJP gathers
        idx, back = (mx.stop_gradient(a.astype(mx.int32)) for a in (idx, back))

        @mx.custom_function
        def take(x):
            return mx.take(x, idx, axis=0)

        @take.vjp
        def take_vjp(primals, cotangent, output):
            g = mx.concatenate([cotangent, mx.zeros((1, cotangent.shape[1]), cotangent.dtype)])
            return (mx.take(g, back[:, 0], axis=0) if back.shape[1] == 1
                    else mx.take(g, back, axis=0).sum(axis=1)),
        return take(x)

    def scatter_rows(self, x, rows, src):
        # one index per row: the contract's scatter_add builds one per element (4x slower)
        return x.at[mx.stop_gradient(rows.astype(mx.int32))].add(src)

    def rms_norm(self, x, gain, eps):
        return mx.fast.rms_norm(x, gain, eps)

    def rope(self, v, positions, base):
        # mx.fast.rope rotates a run of consecutive positions from one offset per batch row;
        # routed tokens sit at arbitrary positions, so each token is its own row of length 1
        B, H, N, Dh = v.shape
        rows = mx.reshape(mx.transpose(v, (0, 2, 1, 3)), (B * N, H, 1, Dh))
        out = mx.fast.rope(rows, Dh, traditional=False, base=base, scale=1.0,
                           offset=mx.reshape(positions, (-1,)).astype(mx.int32))
        return mx.transpose(mx.reshape(out, (B, N, H, Dh)), (0, 2, 1, 3))

    def attention(self, q, k, v, allowed):
        # an additive -1e9 rather than a boolean mask: a row with no allowed key stays finite
        bias = mx.where(allowed, 0.0, -1e9).astype(q.dtype)
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5,
                                                    mask=bias)

    def take_along_axis(self, x, idx, axis):
        # gather VJP w.r.t. indices: MLX raises unless the index array is cut from the graph
        idx = mx.stop_gradient(idx if idx.dtype == mx.int32 else idx.astype(mx.int32))
        return mx.take_along_axis(x, idx, axis=axis)

    def scatter_add(self, x, idx, src, axis):
        # scatter-add: `x.at[i].add(v)` accumulates repeated indices (plain assignment keeps
        # one write); one flat index per element of idx, so idx may be smaller than x
        axis = axis % x.ndim
        strides = np.cumprod((x.shape[1:] + (1,))[::-1])[::-1]
        flat = None
        for d, n in enumerate(idx.shape):
            coord = idx.astype(mx.int32) if d == axis else mx.reshape(
                mx.arange(n, dtype=mx.int32), tuple(n if e == d else 1 for e in range(idx.ndim)))
            flat = coord * int(strides[d]) if flat is None else flat + coord * int(strides[d])
        flat = mx.stop_gradient(mx.broadcast_to(flat, idx.shape).reshape(-1))
        src = mx.broadcast_to(src, idx.shape).astype(x.dtype).reshape(-1)
        return x.reshape(-1).at[flat].add(src).reshape(x.shape)

    def round_bfloat16(self, x):
        # bfloat16 cast: rounds to nearest-even like the oracle's bit trick; its VJP passes the
        # cotangent straight through, as JAX does in the vmoe wrapper this models
        return x.astype(mx.bfloat16).astype(x.dtype)

    # training hooks
    def grad(self, fn, params, x):
        grads = mx.grad(fn, argnums=(0, 1))(params, x)
        return {**grads[0], "x": grads[1]}

    def value_and_grad(self, fn):
        return mx.value_and_grad(fn, argnums=0)

    def compile(self, fn):
        return mx.compile(fn)

    def seed(self, seed):
        # an explicit key, split per draw, so draws replay after seed() whatever else ran
        self._key = mx.random.key(seed)

    def normal(self, shape):
        self._key, key = mx.random.split(self._key)
        return mx.random.normal(tuple(shape), dtype=mx.float32, key=key)

    def save(self, path, tensors):
        # atomic: write a temp file beside the target, fsync, rename over it; the temp name
        # ends in .safetensors because mx.save_safetensors appends it to any other name
        path = os.path.abspath(os.fspath(path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path),
                                   prefix=f".{os.path.basename(path)}.", suffix=".safetensors")
        os.close(fd)
        try:
            arrays = {k: v if isinstance(v, mx.array) else mx.array(np.asarray(v))
                      for k, v in tensors.items()}
            mx.save_safetensors(tmp, arrays)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load(self, path):
        try:
            # format given: mx.load guesses it from the extension otherwise
            tensors = mx.load(os.fspath(path), format="safetensors")
        except (OSError, RuntimeError, ValueError) as e:
            raise ValueError(f"{path}: cannot load safetensors ({e})") from None
        return {k: self.asarray(v) for k, v in tensors.items()}
