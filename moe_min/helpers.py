"""Small utilities that import nothing from moe_min."""

from __future__ import annotations

import os
import stat

MAX_READ = 2 ** 31  # bytes: a corpus, a checkpoint file or a case file larger is refused


def read_bounded(path, limit: int = MAX_READ, what: str = "file") -> bytes:
    """The bytes of a regular file of at most `limit` bytes. A FIFO, a device (/dev/zero) or a
    directory is refused before any read, so nothing reads forever or without bound; the error
    is an OSError whose message names the path and what was expected."""
    try:
        info = os.stat(path)
    except OSError as e:
        raise OSError(f"{path}: cannot read ({e.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file (a FIFO, " \
            "socket or device)"
        raise OSError(f"{path}: {kind}: expected a regular {what}")
    if info.st_size > limit:
        raise OSError(f"{path}: {info.st_size:,} bytes: a {what} may be at most {limit:,}")
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while we read
        raise OSError(f"{path}: more than {limit:,} bytes: a {what} may be at most {limit:,}")
    return data

