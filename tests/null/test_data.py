"""models/data.py: the corpus, its split, seeded batches, the bigram entropy, and the one-line
error for a file that is not UTF-8. No backend needed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moe_min.models import data


def test_default_corpus_is_the_utf8_bytes_of_the_pydoc_topics():
    import pydoc_data.topics

    tokens = data.load_corpus()
    assert tokens.dtype == np.uint8
    assert tokens.tobytes() == "".join(pydoc_data.topics.topics.values()).encode("utf-8")
    assert len(tokens) > 100_000


def test_split_is_first_90_percent_then_last_10_percent_in_order():
    tokens = np.arange(1000) % 256
    train, val = data.split(tokens)
    assert len(train) == 900 and len(val) == 100
    assert np.array_equal(np.concatenate([train, val]), tokens)


def test_batches_are_windows_of_the_split_and_depend_only_on_seed_and_step():
    tokens = np.arange(5000, dtype=np.int64) % 251  # a window is identified by its first byte
    batch = data.batch_at(tokens, step=7, batch_size=8, block=16, seed=3)
    assert batch.shape == (8, 17) and batch.dtype == np.int32
    for row in batch:  # consecutive bytes of the corpus
        assert np.array_equal(np.diff(row) % 251, np.ones(16))
    assert np.array_equal(batch, data.batch_at(tokens, 7, 8, 16, 3))
    assert not np.array_equal(batch, data.batch_at(tokens, 8, 8, 16, 3))
    assert not np.array_equal(batch, data.batch_at(tokens, 7, 8, 16, 4))


def test_batches_refuse_a_split_shorter_than_a_window():
    with pytest.raises(data.DataError, match="shorter than one window"):
        data.batch_at(np.zeros(10, np.uint8), 0, 2, 16, 0)


def test_eval_windows_tile_the_split_without_overlap():
    tokens = np.arange(100) % 256
    windows = data.eval_windows(tokens, block=10)
    assert windows.shape == (9, 11)  # (100 - 1) // 10 windows of 11 bytes
    assert np.array_equal(windows[:, 1:].ravel()[:10], np.arange(1, 11))  # targets in order
    assert np.array_equal(windows[1, 0], 10)
    assert data.eval_windows(tokens, 10, limit=3).shape == (3, 11)


def test_bigram_entropy_hand_checked_examples():
    assert data.bigram_entropy(np.array([1, 2] * 50)) == pytest.approx(0.0)
    # after "a" comes "b" or "c" equally often, after "b"/"c" always "a": H = 1/2 * ln 2
    text = np.frombuffer(b"ab" + b"acab" * 200 + b"a", np.uint8)
    assert data.bigram_entropy(text) == pytest.approx(0.5 * math.log(2), abs=2e-3)


def test_bigram_entropy_of_the_default_corpus_is_about_2_45_nats():
    assert data.bigram_entropy(data.load_corpus()) == pytest.approx(2.45, abs=0.01)


def test_unigram_entropy_is_above_bigram_entropy():
    tokens = data.load_corpus()
    assert data.unigram_entropy(tokens) > data.bigram_entropy(tokens) + 0.5  # 3.26 vs 2.45


def test_text_file_is_read_as_utf8_bytes(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("héllo wörld\n", encoding="utf-8")
    assert data.load_corpus(path).tobytes() == "héllo wörld\n".encode()


def test_non_utf8_file_is_one_line_naming_the_file_and_the_offset(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("abc café".encode("latin-1"))
    with pytest.raises(data.DataError) as err:
        data.load_corpus(path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and "offset 7" in message and "0xe9" in message


def test_missing_file_is_one_line(tmp_path):
    with pytest.raises(data.DataError, match="cannot read"):
        data.load_corpus(tmp_path / "nope.txt")


def test_encode_decode_round_trip_and_cut_characters():
    tokens = data.encode("naïve ∑")
    assert data.decode(tokens) == "naïve ∑"
    assert data.decode(tokens[:-1]).endswith("\ufffd")  # a cut multi-byte character
