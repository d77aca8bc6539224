"""The faults the table of refusals prepares (tests/backend/refusal_rows.py): damage to a copy
of a trained run's checkpoint or to a case file, and in-process faults (a full disk, a NaN loss)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np

from moe_min.conformance.case import case_paths
from moe_min.models import train as tr
from moe_min.tensorio import load_safetensors, save_safetensors

# ---- faults, prepared on a copy of the trained run -------------------------------------------

def ckpt(run: Path) -> Path:
    return (run / "checkpoint").resolve()


def edit_config(run: Path, edit):
    path = ckpt(run) / "config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def rewrite_model(run: Path, change):
    """Change the weights and record their new checksum: a fault the checksum cannot catch."""
    path = ckpt(run) / "model.safetensors"
    tensors, meta = load_safetensors(path)
    change(tensors)
    save_safetensors(path, tensors, meta)
    edit_config(run, lambda m: m["files"].update({path.name: tr._sha256(path)}))


def replace_model(run: Path, raw: bytes, checksum: bool):
    path = ckpt(run) / "model.safetensors"
    path.write_bytes(raw)
    if checksum:
        edit_config(run, lambda m: m["files"].update({path.name: tr._sha256(path)}))


def flip_byte(run, tmp):
    raw = bytearray((ckpt(run) / "model.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    replace_model(run, bytes(raw), checksum=False)


def nan_weight(tensors):
    tensors["embed"][0, 0] = np.nan


def model_is_a_directory(run, tmp):
    (ckpt(run) / "model.safetensors").unlink()
    (ckpt(run) / "model.safetensors").mkdir()


def config_is_dev_zero(run, tmp):
    (ckpt(run) / "config.json").unlink()
    (ckpt(run) / "config.json").symlink_to("/dev/zero")


def case_dir(tmp: Path, change=None, raw: bytes | None = None) -> None:
    """{tmp}/cases holding one shipped case, changed (tensors, metadata) or replaced by bytes."""
    src = next(p for p in case_paths() if p.stem == "token_choice__k2_glu")
    dst = tmp / "cases" / src.name
    dst.parent.mkdir()
    shutil.copy(src, dst)
    if raw is not None:
        dst.write_bytes(raw)
    if change is not None:
        tensors, meta = load_safetensors(dst)
        change(tensors, meta)
        if "checksum" in meta:  # case files that carry one (issue 12): this edit is the fault
            from moe_min.conformance import case as case_file  # under test, not the checksum

            meta["checksum"] = case_file.checksum(meta["spec"], meta["case"], tensors)
        save_safetensors(dst, tensors, meta)


def case_meta(edit):
    def change(tensors, meta):
        case = json.loads(meta["case"])
        edit(case)
        meta["case"] = json.dumps(case)
    return lambda run, tmp: case_dir(tmp, change)


def case_spec(tensors, meta):
    meta["spec"] = meta["spec"].replace('"top_k": 2', '"top_k": 9')


def case_shape(tensors, meta):
    tensors["param/router_w"] = tensors["param/router_w"][:-1]


def full_disk_at(name: str):
    """os.fsync fails with ENOSPC for the file `name`, as a disk that fills mid-checkpoint."""
    def patch(monkeypatch, run):
        fsync = os.fsync

        def full(fd):
            if os.readlink(f"/proc/self/fd/{fd}").rpartition("/")[2].startswith(f".{name}."):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return fsync(fd)
        monkeypatch.setattr(os, "fsync", full)
    return patch


def nan_loss_at_second_step(monkeypatch, run):
    make_step = tr.make_step

    def poisoned(ops, config, tc, *world):
        step, calls = make_step(ops, config, tc, *world), []

        def run_step(params, opt_state, x, y, lr):
            calls.append(1)
            loss, norm, params, opt_state = step(params, opt_state, x, y, lr)
            return (loss * float("nan") if len(calls) == 2 else loss), norm, params, opt_state
        return run_step
    monkeypatch.setattr(tr, "make_step", poisoned)


def no_checkpoint_in(name: str):
    def wrote(tmp: Path):
        assert not (tmp / name / "checkpoint").exists() and not (tmp / name / "checkpoints").exists()
    return wrote
