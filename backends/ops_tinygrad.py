"""The tinygrad backend: the op contract on tinygrad Tensors (float32 compute, int32 indices) on
any tinygrad device: "CPU" (needs clang), "CL" (an OpenCL driver), "CUDA", "METAL", ...
Autodiff via Tensor.gradient, jit via TinyJit, seeded normal draws, safetensors I/O.
Every tinygrad quirk the contract has to paper over lives in this file, one comment each.

Speed: tinygrad generates and compiles a kernel per new graph and shape, so a conformance run
is mostly codegen. For it, on a few cores: PARALLEL=0 (no compile worker pool, whose workers
restart every 16 kernels and reopen the device) and NOOPT=1 (no kernel tuning: the corpus's
arrays are tiny); both are tinygrad environment variables.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import tempfile
from importlib import metadata

import numpy as np
from tinygrad import Device, Tensor, TinyJit, dtypes
from tinygrad.device import ALL_DEVICES
from tinygrad.engine.realize import capturing
from tinygrad.nn.state import safe_load, safe_save
from tinygrad.tensor import all_tensors

from moe_min.ops import Caps

_DTYPES = {"float": dtypes.float32, "int": dtypes.int32, "bool": dtypes.bool}
_NUMPY = {"float": np.float32, "int": np.int32, "bool": np.bool_}


def _kind(dtype) -> str:
    if dtype == dtypes.bool:
        return "bool"
    if dtypes.is_int(dtype):
        return "int"
    if dtypes.is_float(dtype):
        return "float"
    raise NotImplementedError(f"asarray: the tinygrad backend has no counterpart for {dtype}")


@functools.cache
def working_devices() -> tuple[str, ...]:
    """tinygrad devices that open and run one kernel here (probed once per process)."""
    found = []
    for name in ALL_DEVICES:
        try:
            if (Tensor([1.0], device=name) + 1).tolist() == [2.0]:
                found.append(name)
        except Exception:  # a missing driver, library or compiler: the device is not listed
            continue
    return tuple(found)


def _positional_cl_args(dev) -> None:
    """tinygrad's OpenCL runtime binds a kernel's buffers by parameter slot but is handed only
    the buffers the kernel still uses: a kernel whose codegen dropped an input (slots 0, 2, 3)
    reads past its list (IndexError, or a scalar bound as a buffer). Renumber each program's
    signature by position, on this device only (tinygrad 0.14 and master, Aug 2026)."""
    if getattr(dev, "_moe_min_positional", False):
        return
    program_t = dev.runtime_t

    def make(device, obj):
        sig = tuple((n, i, dt, shape) for i, (n, _, dt, shape) in enumerate(obj.signature))
        return program_t(device, dataclasses.replace(obj, signature=sig))
    dev.runtime_t, dev._moe_min_positional = make, True


class TinygradOps:
    name = "tinygrad"

    def __init__(self, device: str | None = None):
        self.device = Device.canonicalize(device)  # upper-cases: "cl" -> "CL", None: default
        if self.device.split(":")[0] not in ALL_DEVICES:  # tinygrad: "No module named ..."
            raise ValueError(f"tinygrad device {device!r}: expected one of "
                             f"{', '.join(ALL_DEVICES)} (working here: "
                             f"{', '.join(working_devices()) or 'none'})")
        try:  # a known device without its driver fails in a library call (OSError, ...)
            dev = Device[self.device]
        except Exception as e:
            raise ValueError(f"tinygrad device {device!r} cannot open here ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); working here: "
                             f"{', '.join(working_devices()) or 'none'}") from None
        if self.device.split(":")[0] == "CL":
            _positional_cl_args(dev)
        supported = dev.renderer.supported_dtypes()
        self._float64, self._bf16 = dtypes.float64 in supported, dtypes.bfloat16 in supported
        self._in_grad = 0

    @property
    def caps(self) -> Caps:
        return Caps(autodiff=True, jit=True, float64=self._float64, devices=working_devices())

    def info(self) -> dict[str, str]:
        return {"tinygrad": metadata.version("tinygrad"), "device": self.device,
                "renderer": type(Device[self.device].renderer).__name__}

    # conversion and creation
    def asarray(self, x, dtype=None):
        if isinstance(x, Tensor):
            want = _DTYPES[dtype or _kind(x.dtype)]
            x = x if x.device in (None, self.device) else x.to(self.device)
            return x if x.dtype == want else x.cast(want)
        a = np.asarray(x)
        if dtype is None:
            if a.dtype.kind not in "biuf":
                raise NotImplementedError(f"asarray: the tinygrad backend has no {a.dtype} arrays")
            dtype = "float" if a.dtype.kind == "f" else "bool" if a.dtype.kind == "b" else "int"
        a = np.ascontiguousarray(a, _NUMPY[dtype]).reshape(a.shape)  # it makes 0-d arrays 1-d
        # a 0-d array becomes a CONST uop, no buffer; CONST uops are shared, so a gradient
        # w.r.t. one would collect every equal literal in the graph: go through shape (1,)
        if a.ndim == 0:
            return self._upload(a.reshape(1), dtype).reshape(())
        return self._upload(a, dtype)

    def _upload(self, a: np.ndarray, dtype: str):
        """A realized device tensor holding `a`. Tensor(a) schedules a copy kernel through the
        whole scheduler (~2 ms, the largest cost of a decode step); an allocated buffer and a
        host copy into it take 0.2 ms. Falls back where the allocator has no host copy."""
        if a.size == 0 or not hasattr(Device[self.device].allocator, "_copyin"):
            return Tensor(a, device=self.device)
        t = Tensor.empty(*a.shape, dtype=_DTYPES[dtype], device=self.device)
        buf = t.uop.buffer.allocate()
        buf.allocator._copyin(buf._buf, memoryview(a).cast("B"))
        return t

    def to_numpy(self, x):
        if not isinstance(x, Tensor):
            return np.asarray(x)
        # a host read syncs: realize every live lazy tensor on this device in one schedule, so
        # outputs read one by one share kernels instead of each re-running (and compiling) its
        # whole graph. Not inside grad or a jit capture: a realized tensor cuts the gradient
        # graph, and a capture would replay the extra work
        if not (x.uop.is_realized or self._in_grad or capturing):
            live = (t for ref in list(all_tensors) if (t := ref()) is not None)
            Tensor.realize(x, *(t for t in live if t is not x and t.device == self.device and
                                not t.uop.is_virtual and not t.uop.is_realized))
        return x.numpy()

    def zeros(self, shape, dtype="float"):
        # buffer=False: a broadcast constant that fuses into its consumers; tinygrad's default
        # materialises every zeros() in a kernel of its own
        return Tensor.full(tuple(shape), 0, dtype=_DTYPES[dtype], buffer=False)

    def arange(self, n):
        return Tensor.arange(n, dtype=dtypes.int32)

    def astype(self, x, dtype):
        return x.cast(_DTYPES[dtype])

    # shape
    def reshape(self, x, shape):
        return x.reshape(tuple(shape))

    def transpose(self, x, axes):
        return x.permute(tuple(axes))

    def concatenate(self, xs, axis):
        return xs[0].cat(*xs[1:], dim=axis)

    def broadcast_to(self, x, shape):
        return x.expand(tuple(shape))

    # elementwise
    def exp(self, x):
        return x.exp()

    def log(self, x):
        return x.log()

    def sqrt(self, x):
        return x.sqrt()

    def erf(self, x):
        return x.erf()  # Abramowitz-Stegun 7.1.26, |error| < 1.5e-7

    def cos(self, x):
        # materialised: tinygrad's cos/sin are long polynomial code, and fused into a consumer
        # they are recomputed per output element (RoPE's angles inside the q·k matmul and its
        # backward: T x Dh times over, 0.5 s of a 2 s training step at width 128)
        return x.cos().contiguous()

    def sin(self, x):
        return x.sin().contiguous()

    def tanh(self, x):
        # tinygrad's tanh is 2·sigmoid(2x) - 1 and its sigmoid 1/(1 + 2^-x): for large |x| the
        # backward multiplies inf by 0 (NaN). This form only exponentiates -2|x| <= 0.
        e = (-2.0 * (x < 0).where(-x, x)).exp()
        r = (1.0 - e) / (1.0 + e)
        return (x < 0).where(-r, r)

    def sigmoid(self, x):
        e = (-(x < 0).where(-x, x)).exp()  # the same NaN-gradient quirk as tanh
        return (x < 0).where(e / (1.0 + e), 1.0 / (1.0 + e))

    def maximum(self, a, b):
        return a.maximum(b)

    def where(self, cond, a, b):
        out = cond.where(a, b)
        # two Python scalars give tinygrad's "weak" dtypes: pin them to the contract's
        if out.dtype in dtypes.weaks:
            return out.cast(dtypes.int32 if dtypes.is_int(out.dtype) else dtypes.float32)
        return out

    # reductions
    def sum(self, x, axis=None, keepdims=False):
        return x.sum(axis, keepdim=keepdims)

    def mean(self, x, axis=None, keepdims=False):
        return x.mean(axis, keepdim=keepdims)

    def max(self, x, axis=None, keepdims=False):
        return x.max(axis, keepdim=keepdims)

    def logsumexp(self, x, axis, keepdims=False):
        m = x.max(axis, keepdim=True).detach()
        out = m + (x - m).exp().sum(axis, keepdim=True).log()
        return out if keepdims else out.squeeze(axis)

    def softmax(self, x, axis):
        return x.softmax(axis)

    def all_finite(self, x):
        return bool(x.isfinite().all().item())

    # order and indexing
    def matmul(self, a, b):
        return a @ b

    def _ranked(self, x, k: int, descending: bool):
        """The first k positions of the stable order along the last axis, and its one-hot
        (.., N, k). rank_i = #{j: x_j before x_i} + #{j < i: x_j == x_i} is a permutation,
        stable by construction (tinygrad's bitonic sort keeps ties only by observation): two
        fused reductions, O(N²) work, the pairwise top-k of tinygrad's own MoE (llm/model.py)."""
        x = x.detach()
        x = x.cast(dtypes.int32) if x.dtype == dtypes.bool else x
        if dtypes.is_float(x.dtype):  # NaN sorts last, as in NumPy (tied with ±inf by index)
            x = x.isnan().where(-np.inf if descending else np.inf, x)
        n = x.shape[-1]
        xi, xj = x.unsqueeze(-1), x.unsqueeze(-2)
        ahead = (xj > xi) if descending else (xj < xi)
        lower = Tensor.arange(n).reshape(n, 1) > Tensor.arange(n)  # [i, j]: j < i, no kernel
        rank = (ahead | ((xj == xi) & lower)).sum(-1)
        hot = rank.unsqueeze(-1) == Tensor.arange(k)
        index = hot.where(Tensor.arange(n).reshape(n, 1), 0).sum(-2)
        return index.cast(dtypes.int32), hot

    def argsort(self, x, axis=-1, descending=False):
        x = x.transpose(axis, -1)
        return self._ranked(x, x.shape[-1], descending)[0].transpose(axis, -1)

    def top_k(self, x, k, axis=-1):
        x = x.transpose(axis, -1)
        index, hot = self._ranked(x, k, True)
        values = hot.where(x.unsqueeze(-1), 0.0).sum(-2)  # a gather, differentiable in x
        return values.transpose(axis, -1), index.transpose(axis, -1)

    def take(self, x, idx, axis):
        # tensor indexing is a one-hot reduce that codegen folds into an indexed load
        return x[(slice(None),) * (axis % len(x.shape)) + (idx.detach(),)]

    def take_along_axis(self, x, idx, axis):
        axis %= len(x.shape)
        # tinygrad's gather wants a full-shape index: broadcast both on the other axes
        shape = [max(a, b) for a, b in zip(x.shape, idx.shape, strict=True)]
        x = x.expand([s if d != axis else x.shape[d] for d, s in enumerate(shape)])
        idx = idx.detach().expand([s if d != axis else idx.shape[d] for d, s in enumerate(shape)])
        return x.gather(axis, idx)

    def scatter_add(self, x, idx, src, axis):
        # scatter(reduce="add") refuses a tensor source; scatter_reduce("sum") accumulates
        # repeated indices and is a where + sum, so it differentiates in x and src
        return x.scatter_reduce(axis, idx.detach(), src.cast(x.dtype).expand(idx.shape), "sum")

    def cumsum(self, x, axis):
        return x.cumsum(axis)

    def stop_gradient(self, x):
        return x.detach()

    def round_bfloat16(self, x):
        if self._bf16:
            r = x.detach().cast(dtypes.bfloat16).cast(dtypes.float32)
        else:  # no bfloat16 on this device: nearest-even on the float32 bit pattern
            bits = x.detach().bitcast(dtypes.uint32)
            r = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).bitcast(dtypes.float32)
        return x + (r - x).detach()  # straight-through gradient; r - x and the sum are exact

    # training hooks
    def _leaf(self, v):
        """A realized, buffer-backed tensor: a gradient target that no later realize rewrites
        (a realized tensor cuts tinygrad's gradient graph) and that is no shared CONST."""
        t = self.asarray(v).realize()
        return t if t.uop.has_buffer_identity() else self.asarray(t.numpy())

    def _value_and_grad(self, fn, params, args, with_x):
        params = {k: self._leaf(v) for k, v in params.items()}
        if with_x:
            args = (self._leaf(args[0]), *args[1:])
        self._in_grad += 1
        try:
            value = fn(params, *args)
        finally:
            self._in_grad -= 1
        targets = [*params.values(), args[0]] if with_x else list(params.values())
        grads = value.gradient(*targets)
        Tensor.realize(value, *grads)  # one schedule for the value and every gradient
        return value, dict(zip([*params, "x"] if with_x else params, grads, strict=True))

    def grad(self, fn, params, x):
        return self._value_and_grad(fn, params, (x,), with_x=True)[1]

    def value_and_grad(self, fn):
        return lambda params, *args: self._value_and_grad(fn, params, args, with_x=False)

    def compile(self, fn):
        # TinyJit: tensor arguments (also inside one level of list/dict), the same shapes on
        # every call, Python control flow frozen at capture; it replays from the third call and
        # writes its results into the same buffers each time. A state fed back as the next
        # call's input (a KV cache, params and optimizer state) is then one of its own output
        # buffers, which TinyJit copies before every replay. Two jits taking turns read each
        # other's outputs instead: no copies (the decode step: -20 % time). The second skips
        # the eager first call (kernels are built by then) and captures at once.
        first, second = TinyJit(fn), TinyJit(fn)
        second.cnt = 1
        turn = itertools.cycle((first, second))

        def run(*args, **kwargs):
            return next(turn)(*args, **kwargs)

        return run

    def seed(self, seed):
        Tensor.manual_seed(seed)

    def normal(self, shape):
        return Tensor.randn(*shape, dtype=dtypes.float32, device=self.device)

    def save(self, path, tensors):
        # atomic: a temp file beside the target, fsync, rename over it
        path = os.path.abspath(os.fspath(path))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")
        os.close(fd)
        try:
            safe_save({k: self.asarray(self.to_numpy(v)).realize() for k, v in tensors.items()},
                      tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def load(self, path):
        try:  # safe_load maps the file on tinygrad's DISK device; read it out at once
            return {k: self.asarray(v.numpy()) for k, v in safe_load(os.fspath(path)).items()}
        except (OSError, ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: cannot load safetensors ({type(e).__name__}: {e})") from None
