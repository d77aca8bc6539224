"""The table of refusals, the command-line half (tests/backend/test_nothing_lost.py runs it):
the Row record and one Row per bad input or fault of every moe-min command (the faults they
prepare: refusal_faults.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from refusal_faults import (  # tests/backend, on sys.path under pytest
    ckpt,
    edit_config,
    rewrite_model,
    replace_model,
    flip_byte,
    nan_weight,
    model_is_a_directory,
    config_is_dev_zero,
    case_dir,
    case_meta,
    case_spec,
    case_shape,
    full_disk_at,
    nan_loss_at_second_step,
    no_checkpoint_in,
)

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


# a pickle stream (protocol 4) of {'embed': 3}, written out so that no test imports pickle:
# the checkpoint loader must refuse it as a safetensors file without unpickling it
PICKLED = b"\x80\x04\x95\x0e\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x05embed\x94K\x03s."


CLI_ROWS = [
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
        CASES, damage=lambda run, tmp: case_dir(tmp, raw=b"abc")),
    Row("conform/case-garbage", "header of", CASES,
        damage=lambda run, tmp: case_dir(tmp, raw=b"garbage!" * 4)),
    Row("conform/case-no-tolerance", "None: expected [rtol, atol]",  # y's tolerance
        CASES, damage=case_meta(lambda case: case["tolerance"].pop("y"))),
    Row("conform/case-bad-mode", "needs a mode of train, eval or causal",
        CASES, damage=case_meta(lambda case: case.update(mode="sideways"))),
    Row("conform/case-spec-out-of-range", "TokenChoice.top_k = 9: expected 1 <= top_k",
        CASES, damage=lambda run, tmp: case_dir(tmp, case_spec)),
    Row("conform/case-param-shape", "router_w has shape (3, 3): expected (4, 3)",
        CASES, damage=lambda run, tmp: case_dir(tmp, case_shape)),
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
        patch=full_disk_at("out.xml"), mid_run=True),
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
        mid_run=True, wrote=no_checkpoint_in("new")),
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
        patch=nan_loss_at_second_step, mid_run=True),
    Row("train/resume-disk-full-mid-checkpoint", "the checkpoint of step 4 was not written ("
        "{run}/checkpoints/", ["train", "--resume", "--steps", "4", "--out", "{run}"],
        patch=full_disk_at("optimizer.safetensors"), mid_run=True),
    # generate
    Row("generate/checkpoint-missing", "{tmp}/nowhere: no checkpoint here (no config.json)",
        ["generate", "--checkpoint", "{tmp}/nowhere"]),
    Row("generate/checkpoint-truncated", "model.safetensors: checksum mismatch (truncated",
        ["generate", "--checkpoint", "{ckpt}"], damage=lambda run, tmp: replace_model(
            run, (ckpt(run) / "model.safetensors").read_bytes()[:1000], checksum=False)),
    Row("generate/checkpoint-flipped-byte", "model.safetensors: checksum mismatch",
        ["generate", "--checkpoint", "{ckpt}"], damage=flip_byte),
    Row("generate/checkpoint-pickle", "model.safetensors: header of",
        ["generate", "--checkpoint", "{ckpt}"], damage=lambda run, tmp: replace_model(
            run, PICKLED, checksum=True)),
    Row("generate/checkpoint-reshaped", "weights do not match the config (e.g. 'embed')",
        ["generate", "--checkpoint", "{ckpt}"],
        damage=lambda run, tmp: edit_config(run, lambda m: m["model"].update(dim=32))),
    Row("generate/checkpoint-wrong-keys", "weights do not match the config (e.g. 'extra')",
        ["generate", "--checkpoint", "{ckpt}"], damage=lambda run, tmp: rewrite_model(
            run, lambda t: t.update(extra=np.zeros(2, np.float32)))),
    Row("generate/checkpoint-nan-weights", "'embed' holds NaN or inf: expected finite float32",
        ["generate", "--checkpoint", "{ckpt}"],
        damage=lambda run, tmp: rewrite_model(run, nan_weight)),
    Row("generate/checkpoint-int-weights", "'blocks.0.attn.wk' is int32: expected finite float32",
        ["generate", "--checkpoint", "{ckpt}"], damage=lambda run, tmp: rewrite_model(
            run, lambda t: t.update({k: v.astype(np.int32) for k, v in t.items()}))),
    Row("generate/checkpoint-step-tampered", "step -5: expected an integer in 1..2",
        ["generate", "--checkpoint", "{ckpt}"],
        damage=lambda run, tmp: edit_config(run, lambda m: m.update(step=-5))),
    Row("generate/checkpoint-config-garbled", "config.json: unreadable",
        ["generate", "--checkpoint", "{ckpt}"],
        damage=lambda run, tmp: (ckpt(run) / "config.json").write_text("{not json")),
    Row("generate/checkpoint-config-keys-missing", "config.json: bad contents ('train')",
        ["generate", "--checkpoint", "{ckpt}"],
        damage=lambda run, tmp: edit_config(run, lambda m: m.pop("train"))),
    Row("generate/checkpoint-model-is-a-directory", "model.safetensors: missing, or not a file",
        ["generate", "--checkpoint", "{ckpt}"], damage=model_is_a_directory),
    Row("generate/checkpoint-config-is-dev-zero", "config.json: not a regular file",
        ["generate", "--checkpoint", "{ckpt}"], damage=config_is_dev_zero),
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
]
