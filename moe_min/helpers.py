"""Small utilities that import nothing from moe_min."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

MAX_READ = 2 ** 31  # bytes: a corpus, a checkpoint file or a case file larger is refused


def physical_memory() -> int:
    """Bytes of RAM on this machine: the bound for sizes checked before any allocation."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(need: int, what: str, lower: str) -> None:
    """Refuse work that needs `need` bytes when the machine has less: an allocation that large
    dies in a MemoryError, or in the kernel's OOM killer, long after the input was given."""
    have = physical_memory()
    if need > have:
        gib = need / 2 ** 30
        shown = f"{gib:,.1f}" if gib < 1e6 else f"{gib:.2g}"
        raise ValueError(f"{what} needs about {shown} GiB, this machine has "
                         f"{have / 2**30:,.0f} GiB: {lower}")


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



def check_writable(path) -> Path:
    """`path` if a file can be written there: checked before a long run, not after it."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise OSError(f"{path}: not a regular file: expected a file path to write")
    if not path.parent.is_dir():
        raise OSError(f"{path}: its directory {path.parent} does not exist")
    return path


def write_atomic(path, data: bytes, mode: int = 0o644) -> None:
    """Write `data` to a temp file beside `path`, fsync, then rename it over `path`: a kill or a
    full disk leaves the old file whole and no temp file behind. A `path` that exists and is
    not a regular file (a directory, /dev/full, a FIFO) is refused: a rename would replace it."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # mkstemp's 0600 would hide the file from other users
        os.replace(tmp, path)
    except BaseException as e:
        os.unlink(tmp)
        if isinstance(e, OSError):  # ENOSPC, EFBIG, EIO: the old file stays as it was
            raise OSError(f"{path}: not written ({e.strerror or e})") from None
        raise
