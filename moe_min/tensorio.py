"""Safetensors files read and written with NumPy alone: 8 bytes of header length, a JSON
header, raw little-endian data. Writes are byte-reproducible and atomic (temp file, fsync,
rename), so a crash mid-write leaves the previous file intact. May import: stdlib, numpy.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from moe_min.helpers import read_bounded, write_atomic

_DTYPES = {"F64": "<f8", "F32": "<f4", "I64": "<i8", "I32": "<i4", "U8": "u1", "BOOL": "?"}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


def save_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]):
    """Write byte-reproducibly (sorted names, sorted JSON), atomically (temp file + rename)."""
    header, chunks, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        array = np.array(tensors[name], order="C")  # ascontiguousarray would make 0-d 1-d
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        data = array.tobytes()
        header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format aligns the data to 8 bytes
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, struct.pack("<Q", len(text)) + text + b"".join(chunks))


def load_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file; a missing, truncated or malformed file is a ValueError that
    names the file and what is wrong."""
    try:
        raw = read_bounded(path, what="safetensors file")
    except OSError as e:
        raise ValueError(str(e)) from None
    if len(raw) < 8:
        raise ValueError(f"{path}: truncated ({len(raw)} bytes; a safetensors file has >= 8)")
    (size,) = struct.unpack("<Q", raw[:8])
    if 8 + size > len(raw):
        raise ValueError(f"{path}: header of {size} bytes runs past the end of the file")
    try:
        header = json.loads(raw[8:8 + size])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: header is not valid JSON ({e})") from None
    # MLX writes "__metadata__": null when there is none
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
        raise ValueError(f"{path}: header is not a JSON object of tensors and __metadata__")
    data, tensors = raw[8 + size:], {}
    for name, info in header.items():
        if name != "__metadata__":
            tensors[name] = _tensor(path, name, info, data)
    return tensors, header.get("__metadata__") or {}


def _tensor(path: Path, name: str, info, data: bytes) -> np.ndarray:
    """One tensor of the file, its header entry checked before any array is made."""
    try:
        dtype = np.dtype(_DTYPES[info["dtype"]])
        shape = [int(n) for n in info["shape"] if isinstance(n, int) and n >= 0]
        begin, end = (int(v) for v in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: tensor {name!r}: header entry {info!r}: expected dtype (one "
                         f"of {', '.join(_DTYPES)}), shape and data_offsets") from None
    if len(shape) != len(info["shape"]) or not 0 <= begin <= end <= len(data) or \
            end - begin != dtype.itemsize * int(np.prod(shape, dtype=object)):
        raise ValueError(f"{path}: tensor {name!r} ({info['dtype']}, shape {info['shape']}, "
                         f"bytes {begin}..{end}) does not fit the file's {len(data)} bytes")
    return np.frombuffer(data[begin:end], dtype).reshape(shape).copy()
