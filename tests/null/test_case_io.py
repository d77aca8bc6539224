"""Our NumPy safetensors reader/writer: interoperable, atomic, and loud about bad files; a
case file edited after generation, or looser than its tolerance bound, is refused on load."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from moe_min.backends.ops_numpy import NumpyOps
from moe_min.conformance.case import (CASES_DIR, TOLERANCE_BOUNDS, case_paths, quantity_kind,
                                      read_case)
from moe_min.conformance.runner import Runner
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


def _copy(tmp_path, stem="token_choice__k2_glu"):
    src = next(p for p in case_paths() if p.stem == stem)
    dst = tmp_path / src.relative_to(CASES_DIR)
    dst.parent.mkdir(parents=True)
    shutil.copy(src, dst)
    return dst


def _edit_expected_value(tensors, meta):
    tensors["expect/y"] = tensors["expect/y"].copy()
    tensors["expect/y"][0, 2, 1] += 1e-3


def _loosen_tolerance(tensors, meta):
    case = json.loads(meta["case"])
    case["tolerance"]["y"] = [1e-2, 1e-3]
    meta["case"] = json.dumps(case, sort_keys=True)


def _drop_checksum(tensors, meta):
    del meta["checksum"]


@pytest.mark.parametrize("edit", [_edit_expected_value, _loosen_tolerance, _drop_checksum])
def test_an_edited_case_file_is_refused_on_load_with_one_line_naming_it(tmp_path, edit):
    path = _copy(tmp_path)
    read_case(path)  # the untouched copy loads
    tensors, meta = load_safetensors(path)
    edit(tensors, meta)
    save_safetensors(path, tensors, meta)
    with pytest.raises(ValueError) as err:
        read_case(path)
    message = str(err.value)
    assert message.startswith("case token_choice__k2_glu: checksum mismatch in ") and \
        "\n" not in message, message
    with pytest.raises(ValueError, match="token_choice__k2_glu: checksum mismatch"):
        Runner(NumpyOps(), tmp_path).run()  # the runner reads through read_case: no row runs


def test_a_resealed_case_with_a_tolerance_past_its_bound_is_refused(tmp_path):
    path = _copy(tmp_path)
    case = read_case(path)
    case.meta["tolerance"]["grad/x"] = [2e-3, 3e-4]  # atol past the gradient bound 2e-4
    case.save(path)  # a fresh checksum: only the bound can catch it
    with pytest.raises(ValueError) as err:
        read_case(path)
    assert str(err.value) == (
        "case token_choice__k2_glu: tolerance of grad/x = [0.002, 0.0003]: expected [rtol, atol] "
        "within [0.002, 0.0002], the bound for grad quantities of token_choice "
        "(TOLERANCE_BOUNDS, moe_min/conformance/case.py)")
    del case.meta["tolerance"]["y"]
    case.meta["tolerance"]["grad/x"] = [2e-3, 2e-4]
    case.save(path)
    with pytest.raises(ValueError, match=r"tolerance of y = None: expected \[rtol, atol\] within"):
        read_case(path)


def test_a_case_saved_on_purpose_keeps_loading_and_its_tolerances_are_its_bounds(tmp_path):
    path = _copy(tmp_path)
    case = read_case(path)
    case.tensors["expect/y"] = case.tensors["expect/y"] * 2  # an intended edit, resealed
    case.save(path)
    np.testing.assert_array_equal(read_case(path).tensors["expect/y"], case.tensors["expect/y"])
    for key, tol in case.meta["tolerance"].items():
        assert tuple(tol) == TOLERANCE_BOUNDS["token_choice"][quantity_kind(key)], key
