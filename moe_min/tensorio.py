"""Safetensors files read and written with NumPy alone: 8 bytes of header length, a JSON
header, raw little-endian data. Writes are byte-reproducible and atomic (temp file, fsync,
rename), so a crash mid-write leaves the previous file intact. May import: stdlib, numpy.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np

from moe_min.helpers import read_bounded

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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
    data, tensors = raw[8 + size:], {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES.get(info["dtype"], "V"))
        if dtype.kind == "V" or end > len(data) or end - begin != dtype.itemsize * int(
                np.prod(info["shape"], dtype=np.int64)):
            raise ValueError(f"{path}: tensor {name!r} ({info['dtype']}, shape {info['shape']}, "
                             f"bytes {begin}..{end}) does not fit the file's {len(data)} bytes")
        tensors[name] = np.frombuffer(data[begin:end], dtype).reshape(info["shape"]).copy()
    return tensors, header.get("__metadata__", {})
