"""Our NumPy safetensors reader/writer: interoperable, atomic, and loud about bad files."""

from __future__ import annotations

import numpy as np
import pytest

from moe_min.conformance.case import read_case
from moe_min.tensorio import load_safetensors, save_safetensors


def test_round_trip_and_the_reference_library_reads_our_files(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.array(2.5),
               "c": np.zeros((0, 3)), "d": np.array([True, False])}
    path = tmp_path / "t.safetensors"
    save_safetensors(path, tensors, {"k": "v"})
    got, meta = load_safetensors(path)
    assert meta == {"k": "v"}
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], v)
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
    theirs = safetensors_numpy.load_file(str(path))
    for k, v in tensors.items():
        np.testing.assert_array_equal(theirs[k], v)
    safetensors_numpy.save_file({"x": np.ones((2, 2), np.float32)}, str(tmp_path / "r.st"))
    np.testing.assert_array_equal(load_safetensors(tmp_path / "r.st")[0]["x"], np.ones((2, 2)))


def test_no_temporary_file_is_left_behind(tmp_path):
    save_safetensors(tmp_path / "t.safetensors", {"a": np.ones(3)}, {})
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:5], "truncated"),
    (lambda b: b[:-8], "does not fit"),
    (lambda b: b[:8] + b"{not json" + b[17:], "not valid JSON"),
    (lambda b: (10**9).to_bytes(8, "little") + b[8:], "runs past the end"),
])
def test_damaged_files_raise_errors_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "t.safetensors"
    save_safetensors(path, {"a": np.ones(4)}, {})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=message) as err:
        load_safetensors(path)
    assert str(path) in str(err.value)


def test_missing_file_and_non_case_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_safetensors(tmp_path / "absent.safetensors")
    save_safetensors(tmp_path / "plain.safetensors", {"a": np.ones(1)}, {})
    with pytest.raises(ValueError, match="not a conformance case"):
        read_case(tmp_path / "plain.safetensors")
