"""Byte-level data: the corpus as uint8 tokens (vocabulary 256), the train/validation split,
seeded batches and the bigram entropy that a model must beat to have learnt anything past
byte pairs. The default corpus is the Python documentation that ships inside CPython
(`pydoc_data.topics`), so training needs no download. May import: stdlib, numpy.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moe_min.helpers import read_bounded

VOCAB = 256
VAL_FRACTION = 0.1  # the last 10 % of the corpus is the validation split


class DataError(ValueError):
    """A corpus that cannot be used; the message is one line naming the file."""


def default_text() -> str:
    import pydoc_data.topics

    return "".join(pydoc_data.topics.topics.values())


def load_corpus(path: str | Path | None = None) -> np.ndarray:
    """The corpus as a uint8 array of UTF-8 bytes: a text file, or the bundled pydoc topics.

    A file that is not UTF-8 is refused (a byte-level model would happily learn it, but a
    wrong `--data` file is far likelier than a deliberate binary one)."""
    if path is None:
        return np.frombuffer(default_text().encode("utf-8"), np.uint8)
    try:
        raw = read_bounded(path, what="text file")
    except OSError as e:
        raise DataError(str(e)) from None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                        f"{e.start}: {e.reason})") from None
    if len(raw) < 2:
        raise DataError(f"{path}: {len(raw)} bytes; a corpus needs at least 2")
    return np.frombuffer(raw, np.uint8)


def split(tokens: np.ndarray, val_fraction: float = VAL_FRACTION):
    """(train, val): the first 1 - val_fraction of the tokens, then the rest, in order."""
    cut = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:cut], tokens[cut:]


def batch_at(tokens: np.ndarray, step: int, batch_size: int, block: int, seed: int):
    """The training batch of `step`: `batch_size` random windows of `block + 1` tokens,
    (B, T+1) int32. It depends only on (seed, step), so a resumed run draws the same batches
    as an uninterrupted one without storing any generator state."""
    if len(tokens) < block + 2:
        raise DataError(f"split of {len(tokens)} tokens is shorter than one window of "
                        f"{block + 1}")
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(tokens) - block - 1, size=batch_size)
    return np.stack([tokens[s:s + block + 1] for s in starts]).astype(np.int32)


def eval_windows(tokens: np.ndarray, block: int, limit: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows of `block + 1` tokens covering the split (the tail
    that fills no window is dropped), (N, T+1) int32; `limit` keeps N evenly spaced ones."""
    n = (len(tokens) - 1) // block
    if n < 1:
        raise DataError(f"split of {len(tokens)} tokens is shorter than one window of "
                        f"{block + 1}")
    windows = np.stack([tokens[i * block:i * block + block + 1] for i in range(n)])
    if limit is not None and limit < n:
        windows = windows[np.linspace(0, n - 1, limit).round().astype(int)]
    return windows.astype(np.int32)


def bigram_entropy(tokens: np.ndarray) -> float:
    """H(next byte | byte) in nats under the corpus's own bigram counts: the loss of the best
    model that sees one byte of context (≈ 2.45 for the default corpus)."""
    tokens = np.asarray(tokens, np.int64)
    counts = np.bincount(tokens[:-1] * VOCAB + tokens[1:], minlength=VOCAB * VOCAB)
    counts = counts.reshape(VOCAB, VOCAB).astype(np.float64)
    rows = counts.sum(axis=1, keepdims=True)
    nz = counts > 0
    p_next = counts / np.where(rows > 0, rows, 1.0)
    return float(-(counts[nz] * np.log(p_next[nz])).sum() / counts.sum())


def unigram_entropy(tokens: np.ndarray) -> float:
    """H(byte) in nats: the loss of a model that ignores context."""
    p = np.bincount(np.asarray(tokens, np.int64), minlength=VOCAB) / len(tokens)
    return float(-sum(q * math.log(q) for q in p if q > 0))


def decode(tokens) -> str:
    """Bytes to text; a multi-byte character cut by sampling shows as U+FFFD."""
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def encode(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
