"""Nothing lost, nothing silent (issue 11, items 4 and 5): a fresh run never replaces another
run, a non-finite loss stops training before a checkpoint is written, reads are bounded, and
the learning-rate horizon of a resumed run is the first run's, bit for bit. MLX, tiny sizes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import load_backend
from moe_min.cli import main
from moe_min.models import train as tr

TINY = ["--config", "tiny-dense", "--set", "layers=1", "--set", "dim=16", "--set", "heads=2",
        "--set", "context=16", "--set", "mlp.hidden=32", "--batch-size", "4",
        "--backend", "mlx"]


def _run(args):
    return CliRunner().invoke(main, ["train", *TINY, *args])


def _digest(out: Path) -> dict:
    files = [p for p in sorted(out.rglob("*")) if p.is_file()]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    result = _run(["--steps", "4", "--eval-every", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _one_line_error(result, message):
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and lines[-1].startswith("Error: "), result.output
    assert message in lines[-1], lines[-1]


def test_a_fresh_run_refuses_an_out_that_holds_another_run(run_dir):
    before = _digest(run_dir)
    _one_line_error(_run(["--steps", "2", "--out", str(run_dir)]), "holds another run")
    assert _digest(run_dir) == before  # checkpoint and metrics untouched


def test_overwrite_replaces_the_run_and_resume_with_overwrite_is_refused(run_dir):
    _one_line_error(CliRunner().invoke(main, ["train", "--out", str(run_dir), "--resume",
                                              "--overwrite"]), "give one of them")
    result = _run(["--steps", "2", "--eval-every", "2", "--out", str(run_dir), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert tr.load_checkpoint(run_dir / "checkpoint").step == 2
    steps = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all('"step": 3' not in s and '"step": 4' not in s for s in steps)


@pytest.mark.parametrize("flag, value, message", [
    ("--steps", "0", "TrainConfig.steps = 0: expected >= 1"),
    ("--batch-size", "0", "TrainConfig.batch_size = 0"),
    ("--lr", "inf", "expected a finite lr > 0"),
    ("--lr", "nan", "expected a finite lr > 0"),
    ("--lr", "-1", "expected a finite lr > 0"),
    ("--eval-every", "0", "TrainConfig.eval_every = 0"),
])
def test_bad_training_flags_are_refused_before_anything_is_written(flag, value, message,
                                                                   tmp_path):
    _one_line_error(_run([flag, value, "--out", str(tmp_path / "run")]), message)
    assert not (tmp_path / "run").exists()


def test_a_non_finite_loss_stops_training_before_any_checkpoint(tmp_path):
    out = tmp_path / "explode"
    result = _run(["--steps", "6", "--eval-every", "2", "--lr", "1e30", "--out", str(out)])
    _one_line_error(result, "stopped before writing a checkpoint; no checkpoint was written")
    assert "step 2:" in result.output and not (out / "checkpoint").exists()


def test_a_non_finite_loss_later_keeps_the_last_good_checkpoint(run_dir, monkeypatch):
    good = _digest(run_dir / "checkpoint")
    make_step = tr.make_step

    def poisoned(ops, config, tc, *world):  # step 6 of the resumed run returns a NaN loss
        step, calls = make_step(ops, config, tc, *world), []

        def run(params, opt_state, x, y, lr):
            calls.append(1)
            loss, norm, params, opt_state = step(params, opt_state, x, y, lr)
            return (loss * float("nan") if len(calls) == 2 else loss), norm, params, opt_state
        return run
    monkeypatch.setattr(tr, "make_step", poisoned)
    result = CliRunner().invoke(main, ["train", "--out", str(run_dir), "--resume",
                                       "--steps", "8"])
    _one_line_error(result, "step 6: the training loss is nan")
    assert "the last good checkpoint (step 4) is kept" in result.output
    assert _digest(run_dir / "checkpoint") == good
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".")]  # no temp files


def test_resume_with_more_steps_keeps_the_first_runs_horizon(run_dir):
    result = CliRunner().invoke(main, ["train", "--out", str(run_dir), "--resume",
                                       "--steps", "6"])
    assert result.exit_code == 0, result.output
    tc = tr.load_checkpoint(run_dir / "checkpoint").train
    assert (tc.horizon, tc.steps) == (4, 6)


@pytest.mark.parametrize("what", ["fifo", "dev_zero"])  # a directory, a missing file: click
def test_data_that_is_not_a_bounded_regular_file_is_refused(what, tmp_path):
    path = {"fifo": tmp_path / "fifo", "dev_zero": Path("/dev/zero")}[what]
    if what == "fifo":
        os.mkfifo(path)  # a read would block forever: refused before any read
    _one_line_error(_run(["--data", str(path), "--out", str(tmp_path / "run")]),
                    "not a regular file")


@pytest.mark.parametrize("what", ["fifo", "dev_zero", "directory"])
def test_bounded_reads_refuse_what_is_not_a_regular_file(what, tmp_path):
    from moe_min.helpers import read_bounded

    path = {"fifo": tmp_path / "fifo", "dev_zero": Path("/dev/zero"), "directory": tmp_path}[what]
    if what == "fifo":
        os.mkfifo(path)
    with pytest.raises(OSError, match="directory" if what == "directory" else "regular file"):
        read_bounded(path)
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * 100)
    with pytest.raises(OSError, match="100 bytes: a file may be at most 10"):
        read_bounded(big, limit=10)


def test_resuming_past_the_first_runs_steps_continues_at_the_floor_bit_for_bit(tmp_path):
    ops = load_backend("mlx", "cpu")
    config = tr.model_config("tiny-dense", ["layers=1", "dim=16", "heads=2", "context=16",
                                            "mlp.hidden=32"])
    base = dict(batch_size=4, lr=1e-2, warmup=2, eval_every=3, eval_windows=2, final_windows=2)
    tr.train(config, tr.TrainConfig(steps=6, **base), out=tmp_path / "a", backend=ops)
    tr.train(out=tmp_path / "a", backend=ops, resume=True, steps=9)
    tr.train(config, tr.TrainConfig(steps=9, horizon=6, **base), out=tmp_path / "b",
             backend=ops)
    a, b = (tr.load_checkpoint(tmp_path / x / "checkpoint") for x in "ab")
    assert a.step == b.step == 9
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name


@pytest.mark.parametrize("args, message", [
    (["conform", "numpy", "--include", "["], "--include '[': not a regular expression"),
    (["conform", "numpy", "--exclude", "(x"], "--exclude '(x': not a regular expression"),
    (["conform", "numpy", "--include", "no_such_case"], "no case selected"),
    (["conform", "tinygrad", "--device", "NOPE"], "tinygrad device 'NOPE': expected one of"),
    (["train", "--set", "vocab=10", "--out", "{tmp}/v"], "vocab 10: the corpus holds byte id"),
    (["train", "--batch-size", "100000000", "--out", "{tmp}/b"], "lower --batch-size"),
    (["bench", "layer", "--capacity", "-1"], "capacity '-1': expected a positive factor"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_more_bad_cli_input_is_one_line_before_any_work(args, message, tmp_path):
    result = CliRunner().invoke(main, [a.format(tmp=tmp_path) for a in args])
    _one_line_error(result, message)
    assert not list(tmp_path.iterdir())  # nothing written


def test_non_finite_values_in_a_layer_are_errors_naming_the_weights():
    from moe_min.layers import forward
    from moe_min.spec import ExpertMLP, SoftMoE, TokenChoice

    ops = load_backend("mlx", "cpu")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 8, 4)).astype(np.float32)
    experts = {"expert_w1": rng.standard_normal((2, 4, 8)).astype(np.float32),
               "expert_w2": rng.standard_normal((2, 8, 4)).astype(np.float32)}
    soft = {**experts, "slot_mu": rng.standard_normal((4, 2, 1)).astype(np.float32),
            "slot_scale": np.ones((), np.float32)}
    bad = x.copy()
    bad[0, 3, 1] = np.nan
    with pytest.raises(ValueError, match="slot_mu and slot_scale"):
        forward(SoftMoE(num_experts=2), ops.asarray(bad),
                {k: ops.asarray(v) for k, v in soft.items()}, ops, expert=ExpertMLP(8))
    weights = {**experts, "router_w": rng.standard_normal((4, 2)).astype(np.float32)}
    weights["expert_w2"][1, 0, 0] = np.inf
    with pytest.raises(ValueError, match="layer output contains NaN or inf"):
        forward(TokenChoice(num_experts=2, top_k=2, capacity="dropless"), ops.asarray(x),
                {k: ops.asarray(v) for k, v in weights.items()}, ops, expert=ExpertMLP(8))


def test_token_ids_outside_the_vocabulary_are_refused_before_a_gather():
    from moe_min.models import decode, lm
    from moe_min.models.configs import LMConfig

    config = LMConfig(vocab=16, dim=8, layers=1, heads=2, context=16)
    decoder = decode.Decoder(load_backend("mlx", "cpu"), config, lm.init_params(config))
    with pytest.raises(ValueError, match="token ids 3..16: expected 0..15"):
        decoder.prefill(np.array([[3, 16]]))
