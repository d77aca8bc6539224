"""Nothing lost, nothing silent (issue 11): the table of refusals. Every bad input or fault that
reaches moe-min's command line or its public Python API is one row of `ROWS`, run by one
parametrised test. A CLI row passes when the refusal is one line, `Error: ...`, naming the
value and what is accepted, with exit status 1 and no traceback, AND nothing was lost: the run
it was pointed at (a trained checkpoint and its metrics) is byte-identical and still loads, no
temp file is left behind, and nothing else was written. An API row passes when the call raises
a ValueError or TypeError whose one-line message names the input and what is accepted.
`test_every_option_of_every_command_has_a_row` keeps the table complete as the CLI grows.
Besides the table: resume's horizon, bit for bit (item 5), and --debug. MLX, tiny sizes.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import load_backend  # tests/conftest.py, on sys.path under pytest
from moe_min.cli import main
from moe_min.conformance.case import case_paths
from moe_min.models import train as tr
from moe_min.tensorio import load_safetensors, save_safetensors

SIZES = ["layers=1", "dim=16", "heads=2", "context=16", "mlp.hidden=32"]
TRAIN = ["train", "--config", "tiny-dense", *[a for s in SIZES for a in ("--set", s)],
         "--batch-size", "4", "--backend", "mlx"]
CASES = ["conform", "numpy", "--cases", "{cases}"]  # a corpus of one case file, damaged
RANGE = "2147483647"  # the largest count a flag takes (2^31 - 1)


@dataclasses.dataclass
class Row:
    """argv: the CLI call ({run}, {ckpt}, {tmp}, {fifo}, {latin1}, {cases}, {encoder} filled in),
    or call: a Python call that must raise. damage(run, tmp) prepares the fault first (the
    checkpoint or case file it breaks is then the baseline that must stay as it is). patch
    (monkeypatch, run) injects a fault in-process. mid_run: the error comes after work began,
    so lines before it are allowed (the run's own output), and what it wrote is checked by
    `wrote(tmp)` instead of "nothing new"."""

    id: str
    message: str
    argv: list[str] | None = None
    call: Callable | None = None
    damage: Callable | None = None
    patch: Callable | None = None
    env: dict | None = None
    mid_run: bool = False
    wrote: Callable | None = None


# ---- faults, prepared on a copy of the trained run -------------------------------------------

def _ckpt(run: Path) -> Path:
    return (run / "checkpoint").resolve()


def _edit_config(run: Path, edit):
    path = _ckpt(run) / "config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _rewrite_model(run: Path, change):
    """Change the weights and record their new checksum: a fault the checksum cannot catch."""
    path = _ckpt(run) / "model.safetensors"
    tensors, meta = load_safetensors(path)
    change(tensors)
    save_safetensors(path, tensors, meta)
    _edit_config(run, lambda m: m["files"].update({path.name: tr._sha256(path)}))


def _replace_model(run: Path, raw: bytes, checksum: bool):
    path = _ckpt(run) / "model.safetensors"
    path.write_bytes(raw)
    if checksum:
        _edit_config(run, lambda m: m["files"].update({path.name: tr._sha256(path)}))


def _flip_byte(run, tmp):
    raw = bytearray((_ckpt(run) / "model.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    _replace_model(run, bytes(raw), checksum=False)


def _nan_weight(tensors):
    tensors["embed"][0, 0] = np.nan


def _model_is_a_directory(run, tmp):
    (_ckpt(run) / "model.safetensors").unlink()
    (_ckpt(run) / "model.safetensors").mkdir()


def _config_is_dev_zero(run, tmp):
    (_ckpt(run) / "config.json").unlink()
    (_ckpt(run) / "config.json").symlink_to("/dev/zero")


def _case_dir(tmp: Path, change=None, raw: bytes | None = None) -> None:
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


def _case_meta(edit):
    def change(tensors, meta):
        case = json.loads(meta["case"])
        edit(case)
        meta["case"] = json.dumps(case)
    return lambda run, tmp: _case_dir(tmp, change)


def _case_spec(tensors, meta):
    meta["spec"] = meta["spec"].replace('"top_k": 2', '"top_k": 9')


def _case_shape(tensors, meta):
    tensors["param/router_w"] = tensors["param/router_w"][:-1]


def _full_disk_at(name: str):
    """os.fsync fails with ENOSPC for the file `name`, as a disk that fills mid-checkpoint."""
    def patch(monkeypatch, run):
        fsync = os.fsync

        def full(fd):
            if os.readlink(f"/proc/self/fd/{fd}").rpartition("/")[2].startswith(f".{name}."):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return fsync(fd)
        monkeypatch.setattr(os, "fsync", full)
    return patch


def _nan_loss_at_second_step(monkeypatch, run):
    make_step = tr.make_step

    def poisoned(ops, config, tc, *world):
        step, calls = make_step(ops, config, tc, *world), []

        def run_step(params, opt_state, x, y, lr):
            calls.append(1)
            loss, norm, params, opt_state = step(params, opt_state, x, y, lr)
            return (loss * float("nan") if len(calls) == 2 else loss), norm, params, opt_state
        return run_step
    monkeypatch.setattr(tr, "make_step", poisoned)


def _no_checkpoint_in(name: str):
    def wrote(tmp: Path):
        assert not (tmp / name / "checkpoint").exists() and not (tmp / name / "checkpoints").exists()
    return wrote


# ---- the Python API rows ----------------------------------------------------------------------

def _layer(kind="tc", x=None, drop=(), noise=None, **change):
    """moe_min.layers.forward (NumPy backend) on a 4-wide, 2-expert layer of 8 tokens, one
    input or parameter changed, or dropped."""
    from moe_min.layers import forward
    from moe_min.spec import ExpertMLP, SoftMoE, TokenChoice

    ops = load_backend("numpy", None)
    rng = np.random.default_rng(0)
    spec = {"tc": TokenChoice(num_experts=2, top_k=1), "soft": SoftMoE(num_experts=2),
            "noisy": TokenChoice(num_experts=2, top_k=1, noise="additive"),
            "fixed": TokenChoice(num_experts=2, top_k=1, capacity="fixed",
                                 expert_capacity=10 ** 12)}[kind]
    params = {"router_w": rng.standard_normal((4, 2)), "expert_w1": rng.standard_normal((2, 4, 8)),
              "expert_w2": rng.standard_normal((2, 8, 4)),
              "slot_mu": rng.standard_normal((4, 2, 1)), "slot_scale": np.ones(()), **change}
    x = rng.standard_normal((1, 8, 4)) if x is None else x
    forward(spec, ops.asarray(x), {k: ops.asarray(v) for k, v in params.items() if k not in drop},
            ops, expert=ExpertMLP(8), mode="eval" if noise is None else "train",
            noise=None if noise is None else ops.asarray(noise))


def _not_a_spec():
    from moe_min.layers import forward

    ops = load_backend("numpy", None)
    forward({"kind": "TokenChoice"}, ops.asarray(np.ones((1, 8, 4))), {}, ops)


def _with(array, index, value):
    array = array.copy()
    array[index] = value
    return array


def _raw_numpy_on_mlx():
    from moe_min.layers import forward
    from moe_min.spec import ExpertMLP, TokenChoice

    ops = load_backend("mlx", "cpu")
    rng = np.random.default_rng(0)
    params = {"router_w": rng.standard_normal((4, 2)), "expert_w1": rng.standard_normal((2, 4, 8)),
              "expert_w2": rng.standard_normal((2, 8, 4))}
    forward(TokenChoice(num_experts=2, top_k=1), rng.standard_normal((1, 8, 4)),
            {k: ops.asarray(v) for k, v in params.items()}, ops, expert=ExpertMLP(8))


def _lm_ids(ids):
    from moe_min.models import lm
    from moe_min.models.configs import LMConfig

    config = LMConfig(vocab=16, dim=8, layers=1, heads=2, context=16)
    lm.forward(load_backend("mlx", "cpu"), config, lm.init_params(config), np.array(ids),
               mode="eval")


def _decoder_ids():
    from moe_min.models import decode, lm
    from moe_min.models.configs import LMConfig

    config = LMConfig(vocab=16, dim=8, layers=1, heads=2, context=16)
    decode.Decoder(load_backend("mlx", "cpu"), config, lm.init_params(config)).prefill(
        np.array([[3, 16]]))


def _spec_json(text):
    from moe_min.spec import from_json

    return lambda: from_json(text)


def _spec(**kw):
    from moe_min.spec import TokenChoice

    return lambda: TokenChoice(**kw)


# ---- the table ----------------------------------------------------------------------------

ROWS = [
    # the moe-min group itself
    Row("top/unknown-option", "No such option '--nope'", ["--nope", "info"]),
    Row("top/unknown-command", "No such command 'nosuch'", ["nosuch"]),
    Row("top/debug-takes-no-value", "Option '--debug' does not take a value", ["--debug=1", "info"]),
    Row("info/extra-argument", "Got unexpected extra argument (extra)", ["info", "extra"]),
    # conform
    Row("conform/backend-empty", "Invalid value for 'BACKEND': '' is empty", ["conform", ""]),
    Row("conform/backend-unknown", "unknown backend 'nosuch': expected one of mlx, numpy",
        ["conform", "nosuch"]),
    Row("conform/device-numpy-gpu", "device 'gpu'", ["conform", "numpy", "--device", "gpu"]),
    Row("conform/device-tinygrad-unknown", "tinygrad device 'NOPE': expected one of",
        ["conform", "tinygrad", "--device", "NOPE"]),
    Row("conform/device-tinygrad-bad-index", "tinygrad device 'CL:abc' cannot open here",
        ["conform", "tinygrad", "--device", "CL:abc"]),
    Row("conform/cases-absent", "cases directory {tmp}/absent does not exist",
        ["conform", "numpy", "--cases", "{tmp}/absent"]),
    Row("conform/case-truncated", "token_choice__k2_glu.safetensors: truncated (3 bytes",
        CASES, damage=lambda run, tmp: _case_dir(tmp, raw=b"abc")),
    Row("conform/case-garbage", "header of", CASES,
        damage=lambda run, tmp: _case_dir(tmp, raw=b"garbage!" * 4)),
    Row("conform/case-no-tolerance", "None: expected [rtol, atol]",  # y's tolerance
        CASES, damage=_case_meta(lambda case: case["tolerance"].pop("y"))),
    Row("conform/case-bad-mode", "needs a mode of train, eval or causal",
        CASES, damage=_case_meta(lambda case: case.update(mode="sideways"))),
    Row("conform/case-spec-out-of-range", "TokenChoice.top_k = 9: expected 1 <= top_k",
        CASES, damage=lambda run, tmp: _case_dir(tmp, _case_spec)),
    Row("conform/case-param-shape", "router_w has shape (3, 3): expected (4, 3)",
        CASES, damage=lambda run, tmp: _case_dir(tmp, _case_shape)),
    Row("conform/include-not-regex", "--include '[': not a regular expression",
        ["conform", "numpy", "--include", "["]),
    Row("conform/include-selects-nothing", "no case selected",
        ["conform", "numpy", "--include", "no_such_case"]),
    Row("conform/exclude-not-regex", "--exclude '(x': not a regular expression",
        ["conform", "numpy", "--exclude", "(x"]),
    Row("conform/junit-dir-absent", "{tmp}/no/out.xml: its directory {tmp}/no does not exist",
        ["conform", "numpy", "--include", "k2_glu", "--junit", "{tmp}/no/out.xml"]),
    Row("conform/junit-device", "/dev/full: not a regular file",
        ["conform", "numpy", "--include", "k2_glu", "--junit", "/dev/full"]),
    Row("conform/junit-disk-full", "out.xml: not written (No space left on device)",
        ["conform", "numpy", "--include", "k2_glu$", "--junit", "{tmp}/out.xml"],
        patch=_full_disk_at("out.xml"), mid_run=True),
    Row("conform/verbose-takes-no-value", "Option '--verbose' does not take a value",
        ["conform", "numpy", "--verbose=2"]),
    # train
    Row("train/config-unknown", "unknown config 'nope': expected one of small-dense",
        ["train", "--config", "nope", "--out", "{tmp}/new"]),
    Row("train/config-empty", "Invalid value for '--config': '' is empty",
        ["train", "--config", "", "--out", "{tmp}/new"]),
    Row("train/set-not-key-value", "--set 'dim': expected key=value",
        ["train", "--set", "dim", "--out", "{tmp}/new"]),
    Row("train/set-wrong-type", "--set dim: 'wide': expected an integer",
        [*TRAIN, "--set", "dim=wide", "--out", "{tmp}/new"]),
    Row("train/set-vocab-below-corpus", "vocab 10: the corpus holds byte id",  # it segfaulted
        [*TRAIN, "--set", "vocab=10", "--out", "{tmp}/new"]),
    Row("train/set-absurd-vocab", "this machine has", [*TRAIN, "--set", "vocab=99999999999",
                                                       "--out", "{tmp}/new"]),
    Row("train/set-absurd-context", "batch size 4 x context 100000: a step of a model of about",
        [*TRAIN, "--set", "context=100000", "--out", "{tmp}/new"]),  # attention is T x T
    Row("train/set-moe-unused", "LMConfig.moe_first = 1: expected < layers (1): no block would be"
        " MoE", [*TRAIN, "--set", "moe=TokenChoice", "--out", "{tmp}/new"]),
    Row("train/set-odd-head-dim", "LMConfig.heads = 2: expected an even head dim (dim/heads = 9",
        [*TRAIN, "--set", "dim=18", "--out", "{tmp}/new"]),
    Row("train/set-soft-moe-decoder", "--set moe: 'SoftMoE': expected one of TokenChoice, "
        "ExpertChoice, none", [*TRAIN, "--set", "moe=SoftMoE", "--out", "{tmp}/new"]),
    Row("train/set-nested-without-kind", "moe = None has no field 'num_experts'",
        [*TRAIN, "--set", "moe.num_experts=4", "--out", "{tmp}/new"]),
    Row("train/set-nan-capacity", "MixtureOfDepths.capacity = nan: expected a finite number",
        [*TRAIN, "--set", "layers=2", "--set", "mod=MixtureOfDepths", "--set", "mod.capacity=nan",
         "--out", "{tmp}/new"]),
    Row("train/backend-no-autodiff", "backend 'numpy' has no autodiff",
        [*TRAIN, "--backend", "numpy", "--out", "{tmp}/new"]),
    Row("train/backend-empty", "Invalid value for '--backend': '' is empty",
        [*TRAIN, "--backend", "", "--out", "{tmp}/new"]),
    Row("train/backend-env-typo", "MOE_MIN_BACKEND='nope': expected one of",
        ["train", "--steps", "1", "--out", "{tmp}/new"], env={"MOE_MIN_BACKEND": "nope"}),
    Row("train/device-unknown", "mlx backend device 'nope': expected one of cpu",
        [*TRAIN, "--device", "nope", "--out", "{tmp}/new"]),
    Row("train/data-fifo", "{fifo}: not a regular file", [*TRAIN, "--data", "{fifo}", "--out",
                                                          "{tmp}/new"]),
    Row("train/data-dev-zero", "/dev/zero: not a regular file (a FIFO, socket or device)",
        [*TRAIN, "--data", "/dev/zero", "--out", "{tmp}/new"]),
    Row("train/data-directory", "Invalid value for '--data': File '{tmp}' is a directory",
        [*TRAIN, "--data", "{tmp}", "--out", "{tmp}/new"]),
    Row("train/data-not-utf8", "not UTF-8 text (byte 0xe9 at offset 3",
        [*TRAIN, "--data", "{latin1}", "--out", "{tmp}/new"]),
    Row("train/steps-0", f"TrainConfig.steps = 0: expected 1 <= steps <= {RANGE}",
        [*TRAIN, "--steps", "0", "--out", "{tmp}/new"]),
    Row("train/steps-huge", f"TrainConfig.steps = {10 ** 21}: expected 1 <= steps <= {RANGE}",
        [*TRAIN, "--steps", str(10 ** 21), "--out", "{tmp}/new"]),
    Row("train/batch-size-0", f"TrainConfig.batch_size = 0: expected 1 <= batch_size <= {RANGE}",
        [*TRAIN, "--batch-size", "0", "--out", "{tmp}/new"]),
    Row("train/batch-size-absurd", "lower --batch-size",
        [*TRAIN, "--batch-size", "100000000", "--out", "{tmp}/new"]),
    Row("train/lr-inf", "TrainConfig.lr = inf: expected a finite number",
        [*TRAIN, "--lr", "inf", "--out", "{tmp}/new"]),
    Row("train/lr-nan", "TrainConfig.lr = nan: expected a finite number",
        [*TRAIN, "--lr", "nan", "--out", "{tmp}/new"]),
    Row("train/lr-negative", "TrainConfig.lr = -1.0: expected a finite lr > 0",
        [*TRAIN, "--lr", "-1", "--out", "{tmp}/new"]),
    Row("train/lr-not-a-number", "Invalid value for '--lr': 'fast' is not a valid float",
        [*TRAIN, "--lr", "fast", "--out", "{tmp}/new"]),
    Row("train/lr-explodes", "the training loss is", [*TRAIN, "--steps", "6", "--eval-every", "2",
                                                      "--lr", "1e30", "--out", "{tmp}/new"],
        mid_run=True, wrote=_no_checkpoint_in("new")),
    Row("train/seed-negative", "'--seed': -1 is not in the range 0<=x<=4294967295",
        [*TRAIN, "--seed", "-1", "--out", "{tmp}/new"]),
    Row("train/seed-huge", "'--seed': 4294967296 is not in the range 0<=x<=4294967295",
        [*TRAIN, "--seed", "4294967296", "--out", "{tmp}/new"]),
    Row("train/eval-every-0", f"TrainConfig.eval_every = 0: expected 1 <= eval_every <= {RANGE}",
        [*TRAIN, "--eval-every", "0", "--out", "{tmp}/new"]),
    Row("train/out-empty", "Invalid value for '--out': '' is empty", [*TRAIN, "--out", ""]),
    Row("train/out-holds-a-run", "{run} holds another run", [*TRAIN, "--out", "{run}"]),
    Row("train/out-is-a-file", "out {run}/metrics.jsonl: exists and is not a directory",
        [*TRAIN, "--out", "{run}/metrics.jsonl"]),
    Row("train/overwrite-with-a-bad-set-keeps-the-run", "vocab 10: the corpus holds byte id",
        [*TRAIN, "--set", "vocab=10", "--out", "{run}", "--overwrite"]),
    Row("train/resume-with-config", "--resume continues the run in --out with its own config",
        ["train", "--resume", "--config", "tiny-moe", "--out", "{run}"]),
    Row("train/resume-and-overwrite", "give one of them",
        ["train", "--resume", "--overwrite", "--out", "{run}"]),
    Row("train/resume-nothing-there", "{tmp}/empty/checkpoint: no checkpoint here",
        ["train", "--resume", "--out", "{tmp}/empty"],
        damage=lambda run, tmp: (tmp / "empty").mkdir()),
    Row("train/resume-steps-behind", "steps 1: the run in {run} is at step 2 already: expected "
        "steps > 2", ["train", "--resume", "--steps", "1", "--out", "{run}"]),
    Row("train/resume-steps-0", f"TrainConfig.steps = 0: expected 1 <= steps <= {RANGE}",
        ["train", "--resume", "--steps", "0", "--out", "{run}"]),
    Row("train/resume-nan-loss-keeps-last-good", "step 4: the training loss is nan (gradient "
        "norm", ["train", "--resume", "--steps", "6", "--out", "{run}"],
        patch=_nan_loss_at_second_step, mid_run=True),
    Row("train/resume-disk-full-mid-checkpoint", "the checkpoint of step 4 was not written ("
        "{run}/checkpoints/", ["train", "--resume", "--steps", "4", "--out", "{run}"],
        patch=_full_disk_at("optimizer.safetensors"), mid_run=True),
    # generate
    Row("generate/checkpoint-missing", "{tmp}/nowhere: no checkpoint here (no config.json)",
        ["generate", "--checkpoint", "{tmp}/nowhere"]),
    Row("generate/checkpoint-truncated", "model.safetensors: checksum mismatch (truncated",
        ["generate", "--checkpoint", "{ckpt}"], damage=lambda run, tmp: _replace_model(
            run, (_ckpt(run) / "model.safetensors").read_bytes()[:1000], checksum=False)),
    Row("generate/checkpoint-flipped-byte", "model.safetensors: checksum mismatch",
        ["generate", "--checkpoint", "{ckpt}"], damage=_flip_byte),
    Row("generate/checkpoint-pickle", "model.safetensors: header of",
        ["generate", "--checkpoint", "{ckpt}"], damage=lambda run, tmp: _replace_model(
            run, pickle.dumps({"embed": np.zeros(3)}), checksum=True)),
    Row("generate/checkpoint-reshaped", "weights do not match the config (e.g. 'embed')",
        ["generate", "--checkpoint", "{ckpt}"],
        damage=lambda run, tmp: _edit_config(run, lambda m: m["model"].update(dim=32))),
    Row("generate/checkpoint-wrong-keys", "weights do not match the config (e.g. 'extra')",
        ["generate", "--checkpoint", "{ckpt}"], damage=lambda run, tmp: _rewrite_model(
            run, lambda t: t.update(extra=np.zeros(2, np.float32)))),
    Row("generate/checkpoint-nan-weights", "'embed' holds NaN or inf: expected finite float32",
        ["generate", "--checkpoint", "{ckpt}"],
        damage=lambda run, tmp: _rewrite_model(run, _nan_weight)),
    Row("generate/checkpoint-int-weights", "'blocks.0.attn.wk' is int32: expected finite float32",
        ["generate", "--checkpoint", "{ckpt}"], damage=lambda run, tmp: _rewrite_model(
            run, lambda t: t.update({k: v.astype(np.int32) for k, v in t.items()}))),
    Row("generate/checkpoint-step-tampered", "step -5: expected an integer in 1..2",
        ["generate", "--checkpoint", "{ckpt}"],
        damage=lambda run, tmp: _edit_config(run, lambda m: m.update(step=-5))),
    Row("generate/checkpoint-config-garbled", "config.json: unreadable",
        ["generate", "--checkpoint", "{ckpt}"],
        damage=lambda run, tmp: (_ckpt(run) / "config.json").write_text("{not json")),
    Row("generate/checkpoint-config-keys-missing", "config.json: bad contents ('train')",
        ["generate", "--checkpoint", "{ckpt}"],
        damage=lambda run, tmp: _edit_config(run, lambda m: m.pop("train"))),
    Row("generate/checkpoint-model-is-a-directory", "model.safetensors: missing, or not a file",
        ["generate", "--checkpoint", "{ckpt}"], damage=_model_is_a_directory),
    Row("generate/checkpoint-config-is-dev-zero", "config.json: not a regular file",
        ["generate", "--checkpoint", "{ckpt}"], damage=_config_is_dev_zero),
    Row("generate/checkpoint-encoder", "an encoder (Soft MoE) checkpoint cannot generate",
        ["generate", "--checkpoint", "{encoder}"]),
    Row("generate/prompt-empty", "Invalid value for '--prompt': '' is empty",
        ["generate", "--checkpoint", "{ckpt}", "--prompt", ""]),
    Row("generate/prompt-too-long", "the prompt is 32 bytes: the context is 16",
        ["generate", "--checkpoint", "{ckpt}", "--prompt", "x" * 32]),
    Row("generate/max-tokens-0", f"'--max-tokens': 0 is not in the range 1<=x<={RANGE}",
        ["generate", "--checkpoint", "{ckpt}", "--max-tokens", "0"]),
    Row("generate/temperature-nan", "sampler temperature nan: expected a finite number >= 0",
        ["generate", "--checkpoint", "{ckpt}", "--temperature", "nan"]),
    Row("generate/temperature-negative", "sampler temperature -1.0: expected a finite number",
        ["generate", "--checkpoint", "{ckpt}", "--temperature", "-1"]),
    Row("generate/top-k-negative", f"'--top-k': -1 is not in the range 0<=x<={RANGE}",
        ["generate", "--checkpoint", "{ckpt}", "--top-k", "-1"]),
    Row("generate/top-p-0", "sampler top_p 0.0: expected 0 < top_p <= 1",
        ["generate", "--checkpoint", "{ckpt}", "--top-p", "0"]),
    Row("generate/seed-negative", "'--seed': -1 is not in the range 0<=x<=4294967295",
        ["generate", "--checkpoint", "{ckpt}", "--seed", "-1"]),
    Row("generate/backend-unknown", "unknown backend 'nosuch'",
        ["generate", "--checkpoint", "{ckpt}", "--backend", "nosuch"]),
    Row("generate/device-empty", "Invalid value for '--device': '' is empty",
        ["generate", "--checkpoint", "{ckpt}", "--device", ""]),
    # bench layer, matmul, generate
    Row("bench/layer-tokens-0", f"'--tokens': 0 is not in the range 1<=x<={RANGE}",
        ["bench", "layer", "--tokens", "0"]),
    Row("bench/layer-tokens-absurd", "lower --tokens, --dim, --hidden or --experts",
        ["bench", "layer", "--tokens", "2000000000"]),
    Row("bench/layer-dim-0", "'--dim': 0 is not in the range", ["bench", "layer", "--dim", "0"]),
    Row("bench/layer-hidden-0", "'--hidden': 0 is not in the range",
        ["bench", "layer", "--hidden", "0"]),
    Row("bench/layer-experts-0", "'--experts': 0 is not in the range",
        ["bench", "layer", "--experts", "0"]),
    Row("bench/layer-top-k-above-experts", "TokenChoice.top_k = 3: expected 1 <= top_k <= "
        "num_experts (2)", ["bench", "layer", "--experts", "2", "--top-k", "3"]),
    Row("bench/layer-activation", "'--activation': 'tanh' is not one of 'relu'",
        ["bench", "layer", "--activation", "tanh"]),
    Row("bench/layer-glu-takes-no-value", "Option '--glu' does not take a value",
        ["bench", "layer", "--glu=1"]),
    Row("bench/layer-repeat-0", "'--repeat': 0 is not in the range",
        ["bench", "layer", "--repeat", "0"]),
    Row("bench/layer-scheme", "'--scheme': 'topk' is not one of", ["bench", "layer", "--scheme",
                                                                    "topk"]),
    Row("bench/layer-capacity-negative", "capacity '-1': expected a positive factor or 'dropless'",
        ["bench", "layer", "--capacity", "-1"]),
    Row("bench/layer-capacity-ignored", "--capacity dropless: only token choice takes it",
        ["bench", "layer", "--scheme", "soft_moe", "--capacity", "dropless"]),
    Row("train/ranks-0", "'--ranks': 0 is not in the range 1<=x<=64", ["train", "--ranks", "0"]),
    Row("train/ranks-absurd", "'--ranks': 100000 is not in the range 1<=x<=64",
        ["train", "--ranks", "100000"]),
    Row("train/hostfile-missing", "--hostfile {tmp}/hosts.json: no such file",
        ["train", "--hostfile", "{tmp}/hosts.json"]),
    Row("train/expert-parallel-alone", "--expert-parallel shards experts over ranks: add --ranks",
        ["train", "--expert-parallel"]),
    Row("train/distributed-without-ranks", "no MLX distributed group to join",
        ["train", "--distributed"]),
    Row("bench/layer-also-fused-no-such-option", "backend 'numpy' takes no option fused",
        ["bench", "layer", "--also-fused", "none"]),
    Row("bench/layer-also-fused-unknown", "fused ops 'rope,fast': expected all, none, default "
        "or a comma-separated list of", ["bench", "layer", "--backend", "mlx", "--also-fused",
                                        "rope,fast"]),
    Row("bench/layer-compile-takes-no-value", "Option '--compile' does not take a value",
        ["bench", "layer", "--compile=yes"]),
    Row("bench/layer-backend-unknown", "unknown backend 'nosuch'",
        ["bench", "layer", "--backend", "nosuch"]),
    Row("bench/layer-device", "device 'gpu'", ["bench", "layer", "--device", "gpu"]),
    Row("bench/matmul-size-0", "'--size': 0 is not in the range", ["bench", "matmul", "--size",
                                                                   "0"]),
    Row("bench/matmul-size-absurd", "a 1000000x1000000 float32 matmul needs about",
        ["bench", "matmul", "--size", "1000000"]),
    Row("bench/matmul-backend-empty", "Invalid value for '--backend': '' is empty",
        ["bench", "matmul", "--backend", ""]),
    Row("bench/matmul-device", "tinygrad device 'NOPE'",
        ["bench", "matmul", "--backend", "tinygrad", "--device", "NOPE"]),
    Row("bench/generate-config-encoder", "tiny-soft-encoder: an encoder does not generate",
        ["bench", "generate", "--config", "tiny-soft-encoder"]),
    Row("bench/generate-checkpoint-missing", "{tmp}/nowhere: no checkpoint here",
        ["bench", "generate", "--checkpoint", "{tmp}/nowhere"]),
    Row("bench/generate-prompt-len-past-context", "--prompt-len 64: the context of {ckpt} is 16"
        ": expected at most 15", ["bench", "generate", "--checkpoint", "{ckpt}"]),  # the default
    Row("bench/generate-prompt-len-0", f"'--prompt-len': 0 is not in the range 1<=x<={RANGE}",
        ["bench", "generate", "--prompt-len", "0"]),
    Row("bench/generate-tokens-0", "'--tokens': 0 is not in the range",
        ["bench", "generate", "--tokens", "0"]),
    Row("bench/generate-train-steps-negative", f"'--train-steps': -1 is not in the range 0<=x<="
        f"{RANGE}", ["bench", "generate", "--train-steps", "-1"]),
    Row("bench/generate-fused-unknown", "fused ops 'gemm': expected all, none, default or a "
        "comma-separated list of", ["bench", "generate", "--fused", "gemm"]),
    Row("bench/generate-skip", "'--skip': 'never' is not one of 'both', 'mask', 'branch'",
        ["bench", "generate", "--skip", "never"]),
    Row("bench/generate-compare-mlx-takes-no-value", "Option '--compare-mlx' does not take a "
        "value", ["bench", "generate", "--compare-mlx=no"]),
    Row("bench/generate-backend-unknown", "unknown backend 'nosuch'",
        ["bench", "generate", "--backend", "nosuch"]),
    Row("bench/generate-device", "mlx backend device 'tpu'",
        ["bench", "generate", "--device", "tpu"]),
    # the Python API: spec values and JSON
    Row("spec/top-k-above-experts", "TokenChoice.top_k = 9: expected 1 <= top_k <= num_experts "
        "(8)", call=_spec(top_k=9)),
    Row("spec/capacity-factor-nan", "TokenChoice.capacity_factor = nan: expected a finite number",
        call=_spec(capacity_factor=float("nan"))),
    Row("spec/bool-for-int", "TokenChoice.num_experts = True: expected an integer",
        call=_spec(num_experts=True)),
    Row("spec/json-unknown-key", "TokenChoice: unknown key(s) ['capacity_factr']",
        call=_spec_json('{"kind": "TokenChoice", "capacity_factr": 1.0}')),
    Row("spec/json-invalid", "spec is not valid JSON", call=_spec_json("{kind: TokenChoice")),
    Row("spec/json-not-an-object", "spec kind [1]: expected one of", call=_spec_json("[1]")),
    Row("spec/train-config-type", "TrainConfig.compile = 'yes': expected True or False",
        call=lambda: tr.TrainConfig(compile="yes")),
    Row("spec/adamw-beta", "AdamW.beta1 = 1.5: expected 0 <= beta1 < 1",
        call=lambda: tr.optim.AdamW(beta1=1.5)),
    # the Python API: layer inputs (moe_min.layers.forward), token ids
    Row("layer/x-wrong-width", "router_w has shape (4, 2): expected (5, 2)",
        call=lambda: _layer(x=np.zeros((1, 8, 5)))),
    Row("layer/x-one-dimensional", "x has shape (4,): expected (B, T, D) or (T, D)",
        call=lambda: _layer(x=np.zeros(4))),
    Row("layer/x-empty", "x has shape (1, 0, 4): expected (B, T, D) or (T, D), none of them 0",
        call=lambda: _layer(x=np.zeros((1, 0, 4)))),
    Row("layer/x-int", "x is int64: expected a float array",
        call=lambda: _layer(x=np.ones((1, 8, 4), np.int64))),
    Row("layer/x-not-a-backend-array", "x is a numpy.ndarray: expected an array of the backend",
        call=_raw_numpy_on_mlx),
    Row("layer/router-missing", "params has no 'router_w': TokenChoice reads router_w",
        call=lambda: _layer(drop=("router_w",))),
    Row("layer/experts-count", "expert_w1 has shape (3, 4, 8): expected (2, 4, 8)",
        call=lambda: _layer(expert_w1=np.zeros((3, 4, 8)))),
    Row("layer/noise-shape", "noise has shape (1, 8, 5): expected 16 standard-normal draws",
        call=lambda: _layer("noisy", noise=np.zeros((1, 8, 5)))),
    Row("layer/x-nan", "router logits contain NaN or inf: check the input and router_w",
        call=lambda: _layer(x=_with(np.ones((1, 8, 4)), (0, 3, 1), np.nan))),
    Row("layer/soft-moe-x-nan", "check the input and slot_mu and slot_scale",
        call=lambda: _layer("soft", x=_with(np.ones((1, 8, 4)), (0, 3, 1), np.nan))),
    Row("layer/expert-weight-inf", "the layer output contains NaN or inf though the routing was "
        "finite", call=lambda: _layer(expert_w2=_with(np.ones((2, 8, 4)), (1, 0, 0), np.inf))),
    Row("layer/absurd-capacity", "lower the capacity or num_experts", call=lambda: _layer("fixed")),
    Row("layer/spec-not-a-spec", "spec is dict: expected one of TokenChoice",
        call=_not_a_spec),
    Row("lm/token-ids-above-vocab", "tokens: ids 3..99: expected 0..15 (the vocabulary)",
        call=lambda: _lm_ids([[3, 99]])),
    Row("lm/token-ids-negative", "tokens: ids -1..3: expected 0..15", call=lambda: _lm_ids(
        [[3, -1]])),
    Row("lm/tokens-past-context", "tokens have shape (1, 40): expected (B, T) with B >= 1 and "
        "1 <= T <= 16", call=lambda: _lm_ids(np.zeros((1, 40), int))),
    Row("lm/decoder-ids", "token ids 3..16: expected 0..15", call=_decoder_ids),
]


# ---- running a row --------------------------------------------------------------------------

def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A tiny run, 2 steps: a checkpoint (step 2) and its metrics; each row gets a copy."""
    load_backend("mlx", "cpu")  # trains on MLX: skipped with its reason where it cannot run
    out = tmp_path_factory.mktemp("trained") / "run"
    result = CliRunner().invoke(main, [*TRAIN, "--steps", "2", "--eval-every", "2", "--out",
                                       str(out)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Path:
    """A Soft MoE encoder checkpoint: it trains through the same loop (masked bytes, no
    causal mode), but cannot generate."""
    out = tmp_path_factory.mktemp("encoder")
    result = tr.train(tr.model_config("tiny-soft-encoder", SIZES + ["layers=2"]), tr.TrainConfig(
        steps=2, batch_size=4, eval_every=2, eval_windows=4, final_windows=4),
        out=out, backend=load_backend("mlx", "cpu"))
    assert "causal" not in result and np.isfinite(result["eval"]["loss"])
    return out / "checkpoint"


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_a_bad_input_or_fault_is_one_line_and_nothing_is_lost(row, trained, encoder, tmp_path,
                                                              monkeypatch):
    if row.call is not None:
        with np.errstate(invalid="ignore"), pytest.raises((ValueError, TypeError)) as error:
            row.call()
        text = str(error.value)
        assert "\n" not in text and row.message in text, text
        return
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "latin1.txt").write_bytes("abcé".encode("latin-1"))
    if row.damage:
        row.damage(run, tmp_path)
    before, listing = _snapshot(run), _listing(tmp_path)
    monkeypatch.chdir(tmp_path)  # a default path (runs/latest) would land here, and be seen
    places = {"run": run, "ckpt": run / "checkpoint", "tmp": tmp_path, "fifo": tmp_path / "fifo",
              "latin1": tmp_path / "latin1.txt", "cases": tmp_path / "cases", "encoder": encoder}
    if row.patch:
        row.patch(monkeypatch, run)
    result = CliRunner().invoke(main, [a.format(**places) for a in row.argv], env=row.env)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and lines[-1].startswith("Error: "), result.output
    assert row.message.format(**places) in lines[-1], lines[-1]
    assert row.mid_run or len(lines) == 1, result.output  # refused before any work
    after = _snapshot(run)
    assert after.keys() == before.keys(), "a file of the run was added or removed"
    for name, old in before.items():  # byte for byte; a run's metrics may only grow
        assert after[name] == old or (row.mid_run and name == "metrics.jsonl" and
                                      after[name].startswith(old)), name
    assert not [p for p in tmp_path.rglob(".*")], "a temp file was left behind"
    if row.wrote:
        row.wrote(tmp_path)
    else:
        assert _listing(tmp_path) == listing  # nothing new anywhere
    if not row.damage:
        assert tr.load_checkpoint(run / "checkpoint").step == 2  # and it still loads
    assert Path("/dev/full").is_char_device()  # never replaced by a rename


def test_a_file_size_limit_mid_checkpoint_keeps_the_last_one_in_a_real_process(trained,
                                                                                tmp_path):
    """The console script under RLIMIT_FSIZE (writes past it fail with EFBIG, as a full disk's
    do with ENOSPC): exit status 1, one line, the step-2 checkpoint whole, no temp file."""
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    model, optimizer = ((run / "checkpoint" / f).stat().st_size for f in tr.FILES)
    assert model < optimizer  # the limit lets the model file through, not the optimizer's
    limit = (model + optimizer) // 2
    before = _snapshot(run)

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    result = subprocess.run(
        [sys.executable, "-c", "from moe_min.cli import main; main()", "train", "--resume",
         "--steps", "4", "--out", str(run)], capture_output=True, text=True, preexec_fn=cap,
        timeout=300)
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "the checkpoint of step 4 was not written" in lines[-1], lines[-1]
    assert "File too large" in lines[-1] and "is unchanged" in lines[-1], lines[-1]
    after = _snapshot(run)
    assert after.keys() == before.keys() and not [p for p in run.rglob(".*")]
    assert all(after[k] == v for k, v in before.items() if k != "metrics.jsonl")
    assert after["metrics.jsonl"].startswith(before["metrics.jsonl"])  # steps 3, 4 logged
    assert tr.load_checkpoint(run / "checkpoint").step == 2


def test_every_option_of_every_command_has_a_row():
    """A new flag without a row of its own fails here."""
    argvs = [r.argv for r in ROWS if r.argv]
    missing = []

    def walk(command, path):
        for param in command.params:
            if isinstance(param, click.Argument):
                covered = any(a[:len(path)] == path and len(a) > len(path) and
                              not a[len(path)].startswith("-") for a in argvs)
            else:
                covered = any(a[:len(path)] == path and any(
                    arg.split("=")[0] in param.opts + param.secondary_opts for arg in a)
                    for a in argvs)
            if not covered:
                missing.append(f"{' '.join(['moe-min', *path])} {param.name}")
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, [*path, name])
    walk(main, [])
    assert len(ROWS) >= 40 and not missing, missing


def test_debug_shows_the_traceback_that_the_one_line_hides():
    plain = CliRunner().invoke(main, ["train", "--steps", "0", "--out", "x"])
    debug = CliRunner().invoke(main, ["--debug", "train", "--steps", "0", "--out", "x"])
    assert plain.exit_code == 1 and plain.output.startswith("Error: TrainConfig.steps = 0")
    assert isinstance(debug.exception, ValueError) and "steps = 0" in str(debug.exception)


# ---- resume semantics (item 5) -----------------------------------------------------------

def test_overwrite_replaces_the_run_only_once_every_input_is_checked(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    result = CliRunner().invoke(main, [*TRAIN, "--steps", "3", "--eval-every", "3",
                                       "--out", str(run), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert tr.load_checkpoint(run / "checkpoint").step == 3
    assert len(list((run / "checkpoints").iterdir())) == 1  # the old one is gone
    steps = {json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert steps == {1, 2, 3}


def test_resume_with_more_steps_keeps_the_first_runs_horizon(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run, symlinks=True)
    result = CliRunner().invoke(main, ["train", "--out", str(run), "--resume", "--steps", "4"])
    assert result.exit_code == 0, result.output
    tc = tr.load_checkpoint(run / "checkpoint").train
    assert (tc.horizon, tc.steps) == (2, 4)


def test_resuming_past_the_first_runs_steps_continues_at_the_floor_bit_for_bit(tmp_path):
    ops = load_backend("mlx", "cpu")
    config = tr.model_config("tiny-dense", SIZES)
    base = dict(batch_size=4, lr=1e-2, warmup=2, eval_every=3, eval_windows=2, final_windows=2)
    tr.train(config, tr.TrainConfig(steps=6, **base), out=tmp_path / "a", backend=ops)
    tr.train(out=tmp_path / "a", backend=ops, resume=True, steps=9)
    tr.train(config, tr.TrainConfig(steps=9, horizon=6, **base), out=tmp_path / "b",
             backend=ops)
    a, b = (tr.load_checkpoint(tmp_path / x / "checkpoint") for x in "ab")
    assert a.step == b.step == 9
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name


def test_the_memory_bound_covers_every_presets_parameters():
    from moe_min.models import limits
    from moe_min.models.configs import PRESETS

    for name, config in PRESETS.items():
        drawn = sum(v.size for v in tr.model_module(config).init_params(config).values())
        assert drawn <= limits.parameter_count(config) <= 2 * drawn, name
