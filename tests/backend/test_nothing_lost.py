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

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import load_backend  # tests/conftest.py, on sys.path under pytest
from moe_min.cli import main
from moe_min.models import train as tr
from refusal_api import API_ROWS  # tests/backend, on sys.path under pytest
from refusal_rows import CLI_ROWS, SIZES, TRAIN


ROWS = CLI_ROWS + API_ROWS

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
