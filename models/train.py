"""Train a routed byte-level LM (or the Soft MoE encoder) on one machine, in the order it runs
(nanoGPT `train.py`, mlx-examples `transformer_lm/main.py`): config, data, parameters,
optimizer, then the loop (batch, value_and_grad, AdamW, report, evaluate, checkpoint).

Checkpoints are `OUT/checkpoint/` = model.safetensors + optimizer.safetensors + config.json
(model config with its routing spec, train settings, step, checksums), never pickled. Every
file is written atomically, and the directory itself is swapped in by renaming a symlink, so
a kill at any moment leaves the previous checkpoint whole. A run depends only on (settings,
seed, step), so `resume=True` continues the same loss curve. May import: anything but cli.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import typing
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from moe_min.helpers import read_bounded, write_atomic
from moe_min.models import configs, data, distributed, evaluation, limits, optim, plots
from moe_min.ops import backend_entry_points, get_backend
from moe_min.spec import _check_type, _fail
from moe_min.tensorio import load_safetensors, save_safetensors

FORMAT = "moe_min.checkpoint/1"
MAX_COUNT = 2 ** 31 - 1  # steps, windows: past this no run ends in a lifetime
FILES = ("model.safetensors", "optimizer.safetensors")


class CheckpointError(ValueError):
    """A missing, truncated or tampered checkpoint; the message is one line."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that changes the numbers of a run besides the model config (STYLE §2.5)."""

    steps: int = 1000
    batch_size: int = 16  # small batches, more steps: best per second on CPU (measured)
    lr: float = 6e-3
    min_lr_ratio: float = 0.1  # the cosine's floor is lr * min_lr_ratio (nanoGPT: lr / 10)
    warmup: int = 100
    # the cosine decays over `horizon` steps, fixed by the first run: 0 means `steps` then.
    # A resumed run with more --steps goes on at the floor, exactly as one run that long with
    # the same horizon would (README, "Resume")
    horizon: int = 0
    seed: int = 0
    eval_every: int = 250  # steps; also where checkpoints are written
    eval_windows: int = 64  # windows per periodic evaluation (and for the train split)
    final_windows: int = 0  # windows of the last evaluation; 0: the whole validation split
    eval_batch: int = 64
    mask_rate: float = 0.15  # encoder only: the fraction of bytes masked (BERT)
    compile: bool = True  # the backend's jit around the whole step, where it has one
    data: str | None = None  # a UTF-8 text file; None: CPython's pydoc topics
    optimizer: optim.AdamW = field(default_factory=optim.AdamW)

    def __post_init__(self):  # types first (a checkpoint's JSON may hold anything), then ranges
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            _check_type(self, f.name, getattr(self, f.name), hints[f.name])
        ranges = {name: (1, MAX_COUNT) for name in ("steps", "batch_size", "eval_every",
                                                     "eval_windows", "eval_batch")}
        ranges.update({name: (0, MAX_COUNT) for name in ("warmup", "horizon", "final_windows")},
                      seed=(0, 2 ** 32 - 1), min_lr_ratio=(0, 1))
        for name, (low, high) in ranges.items():
            if not low <= getattr(self, name) <= high:
                _fail(self, name, getattr(self, name), f"{low} <= {name} <= {high}")
        if not self.lr > 0:
            _fail(self, "lr", self.lr, "a finite lr > 0")
        if not 0 < self.mask_rate <= 1:
            _fail(self, "mask_rate", self.mask_rate, "0 < mask_rate <= 1")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{**d, "optimizer": optim.AdamW(**d["optimizer"])})


def default_backend() -> str:
    """$MOE_MIN_BACKEND, else MLX (Metal or CUDA when present, else CPU on OpenBLAS), else
    tinygrad: the first installed framework with autodiff."""
    found, chosen = backend_entry_points(), os.environ.get("MOE_MIN_BACKEND")
    if chosen is not None and chosen not in found:  # a typo must not silently pick another
        raise ValueError(f"MOE_MIN_BACKEND={chosen!r}: expected one of {', '.join(sorted(found))}")
    for name in (chosen, "mlx", "tinygrad"):
        if name and name in found:
            return name
    raise ValueError("no backend with autodiff installed: pip install 'moe-min[mlx]'")


def model_config(name: str, overrides: list[str] = ()):
    """A preset with `--set` overrides applied (models.configs reports bad keys and values)."""
    if name not in configs.PRESETS:
        raise ValueError(f"unknown config {name!r}: expected one of "
                         f"{', '.join(sorted(configs.PRESETS))}")
    return configs.apply_overrides(configs.PRESETS[name], list(overrides))


def is_encoder(config) -> bool:
    return isinstance(config, configs.EncoderConfig)


def model_module(config):
    from moe_min.models import encoder, lm

    return encoder if is_encoder(config) else lm


# ---- checkpoints ---------------------------------------------------------------------------

def _sha256(path: Path) -> str:
    return hashlib.sha256(read_bounded(path, what="checkpoint file")).hexdigest()


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # makes the renames inside `path` durable
    os.close(fd)


def save_checkpoint(out: Path, config, train: TrainConfig, step: int, params: dict,
                    opt_state: dict, extra: dict | None = None) -> Path:
    """Write a new directory OUT/checkpoints/step-N-xxxx/ completely (each file atomic,
    config.json with the checksums last), then point the OUT/checkpoint symlink at it with
    one rename; only then remove the older directories. A failed write (a full disk) removes
    what it wrote and leaves the current checkpoint as it was."""
    out, link = Path(out), Path(out) / "checkpoint"
    if link.exists() and not link.is_symlink():
        raise CheckpointError(f"{link}: exists and is not the symlink this run manages")
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(dir=out / "checkpoints", prefix=f"step-{step:07d}-"))
    try:
        _write_checkpoint(new, config, train, step, params, opt_state, extra)
    except BaseException as e:
        shutil.rmtree(new, ignore_errors=True)
        if isinstance(e, OSError):
            raise OSError(f"the checkpoint of step {step} was not written ({e}); the current "
                          f"checkpoint in {out} is unchanged") from None
        raise
    tmp_link = out / f".checkpoint-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    os.symlink(Path("checkpoints") / new.name, tmp_link)
    os.replace(tmp_link, link)  # the one atomic switch from the old checkpoint to the new
    _fsync_dir(out)
    for old in (out / "checkpoints").iterdir():  # the old one, and any a kill left behind
        if old.name != new.name:
            shutil.rmtree(old, ignore_errors=True)
    return link


def _write_checkpoint(new: Path, config, train: TrainConfig, step: int, params: dict,
                      opt_state: dict, extra: dict | None):
    save_safetensors(new / FILES[0], params, {"format": FORMAT})
    save_safetensors(new / FILES[1], opt_state, {"format": FORMAT})
    write_atomic(new / "config.json", json.dumps({
        "format": FORMAT, "kind": type(config).__name__, "model": config.to_dict(),
        "train": asdict(train), "step": step, "rng": {"seed": train.seed, "step": step},
        "files": {f: _sha256(new / f) for f in FILES},
        "shapes": {k: list(v.shape) for k, v in params.items()}, **(extra or {})},
        indent=1, sort_keys=True).encode())
    new.chmod(0o755)  # mkdtemp makes it private; share it like the files
    _fsync_dir(new)
    _fsync_dir(new.parent)


@dataclass
class Checkpoint:
    config: object
    train: TrainConfig
    step: int
    params: dict  # name -> np.ndarray
    opt_state: dict
    meta: dict


def load_checkpoint(path: str | Path, optimizer: bool = True) -> Checkpoint:
    """Read and verify a checkpoint directory; any defect is one CheckpointError line."""
    path = Path(path)
    if not os.path.lexists(path / "config.json"):
        raise CheckpointError(f"{path}: no checkpoint here (no config.json)")
    try:
        meta = json.loads(read_bounded(path / "config.json", 2 ** 24, "config file"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path / 'config.json'}: not a {FORMAT} checkpoint")
    try:
        kinds = {"LMConfig": configs.LMConfig, "EncoderConfig": configs.EncoderConfig}
        config = kinds[meta["kind"]].from_dict(meta["model"])
        train = TrainConfig.from_dict(meta["train"])
        step, sums = meta["step"], dict(meta["files"])
        shapes = {k: tuple(v) for k, v in dict(meta["shapes"]).items()}
        if type(step) is not int or not 1 <= step <= train.steps:
            raise ValueError(f"step {step!r}: expected an integer in 1..{train.steps} (its steps)")
        limits.check_config_fits(config)  # before init_params allocates the expected weights
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path / 'config.json'}: bad contents ({e})") from None
    arrays = {}
    for name in FILES[:2] if optimizer else FILES[:1]:
        if not (path / name).is_file():
            raise CheckpointError(f"{path / name}: missing, or not a file")
        if _sha256(path / name) != sums.get(name):
            raise CheckpointError(f"{path / name}: checksum mismatch (truncated or modified "
                                  "since it was written)")
        try:
            arrays[name] = load_safetensors(path / name)[0]
        except ValueError as e:
            raise CheckpointError(str(e)) from None
    params = arrays[FILES[0]]
    want = {k: tuple(v.shape) for k, v in model_module(config).init_params(config, 0).items()}
    got = {k: tuple(v.shape) for k, v in params.items()}
    if got != want or got != shapes:
        bad = sorted((set(got) ^ set(want)) | (set(got) ^ set(shapes))) or \
            [k for k in want if not got.get(k) == want[k] == shapes.get(k)]
        raise CheckpointError(f"{path}: weights do not match the config (e.g. {bad[0]!r})")
    for name, value in params.items():  # garbage must not load as a model
        wrong = f"is {value.dtype}" if value.dtype != np.float32 else \
            "holds NaN or inf" if not np.isfinite(value).all() else None
        if wrong:
            raise CheckpointError(f"{path / FILES[0]}: {name!r} {wrong}: expected finite float32")
    return Checkpoint(config, train, step, params, arrays.get(FILES[1], {}), meta)


# ---- one step, evaluation ------------------------------------------------------------------

def make_step(ops, config, tc: TrainConfig, world=distributed.ALONE):
    """(params, opt_state, x, y, lr) -> (loss, grad norm, params, opt_state): value_and_grad
    of the training loss, averaged over the world's ranks, then AdamW, jitted whole by the
    backend when tc.compile."""
    module = model_module(config)
    if is_encoder(config):
        def loss(params, x, seed):
            return module.loss(ops, config, params, x, tc.mask_rate, seed)[0]
    else:
        def loss(params, x, y):
            return module.loss(ops, config, params, x, y, mode="train")[0]
    grad_fn = ops.value_and_grad(loss)

    def step(params, opt_state, x, y, lr):
        value, grads = world.reduce(*grad_fn(params, x, y))
        params, opt_state, norm = optim.step(ops, tc.optimizer, params, grads, opt_state, lr,
                                             world.norm)
        return value, norm, params, opt_state

    # not jitted: the encoder (it draws masks on the host from an int seed) and routing noise
    # (a jit would bake the backend's random key into the trace)
    noise = getattr(config.moe, "noise", "none") != "none"
    return ops.compile(step) if tc.compile and not is_encoder(config) and not noise else step


def materialize(ops, *trees) -> None:
    """Make lazy backends (MLX, tinygrad) compute every array of `trees` now. The contract has
    no eval(); reading one host value that depends on every array does the same, and keeps
    the graph from growing step after step."""
    arrays = [ops.reshape(ops.sum(a), (1,)) for tree in trees for a in tree.values()]
    ops.to_numpy(ops.concatenate(arrays, axis=0))


# ---- the run -------------------------------------------------------------------------------

def _corpus_id(tokens: np.ndarray) -> str:
    return hashlib.sha256(tokens.tobytes()).hexdigest()[:16]


def holds_a_run(out: Path) -> bool:
    return (out / "checkpoint").exists() or (out / "metrics.jsonl").exists()


def _start(config, tc: TrainConfig | None, out: Path, resume: bool, overwrite: bool):
    """(config, settings, first step, (params, optimizer state) or None, corpus id or None):
    a fresh run, or the checkpoint in OUT/checkpoint; nothing is written or removed yet. A
    fresh run never replaces another run's checkpoint and metrics unless told to (overwrite)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out {out}: exists and is not a directory: expected a directory "
                         "(new, or holding a run)")
    if not resume:
        if holds_a_run(out) and not overwrite:
            raise ValueError(f"{out} holds another run (a checkpoint or metrics.jsonl): continue "
                             f"it with --resume, replace it with --overwrite, or pick another --out")
        tc = tc or TrainConfig()
        return config, replace(tc, horizon=tc.horizon or tc.steps), 0, None, None
    if config is not None or tc is not None:
        raise ValueError("resume takes the config and settings from the checkpoint")
    c = load_checkpoint(out / "checkpoint")
    tc = replace(c.train, horizon=c.train.horizon or c.train.steps)  # written before horizons
    return c.config, tc, c.step, (c.params, c.opt_state), c.meta.get("corpus")


def _remove_run(out: Path):
    """--overwrite, once every input is checked: the old run goes before the new one writes,
    so no old checkpoint sits beside new metrics."""
    link = out / "checkpoint"
    target = link.resolve() if link.is_symlink() else None
    if link.is_symlink():
        link.unlink()
    for path in (target, link):
        if path is not None and path.is_dir():
            shutil.rmtree(path)
    (out / "metrics.jsonl").unlink(missing_ok=True)


def train(config=None, tc: TrainConfig | None = None, *, out: str | Path, backend=None,
          device: str | None = None, resume: bool = False, steps: int | None = None,
          on_step=None, log=None, overwrite: bool = False, world=distributed.ALONE) -> dict:
    """Train `config` (an LMConfig or EncoderConfig) under `tc`, writing OUT/metrics.jsonl,
    OUT/loss.png, OUT/load.png and OUT/checkpoint/. With resume=True, config and settings come
    from OUT/checkpoint and the run continues where it stopped (`steps` may extend it).
    `on_step(steps done, steps in all, record)` follows the run (the CLI draws a progress bar),
    `log(text)` gets a line per evaluation. `backend`: a name or a backend object. Returns
    the last validation report with timings. Every input is checked before anything is
    written, removed (overwrite) or allocated. `world`: this process's rank among the ranks of
    a data- or expert-parallel run (models/distributed.py); rank 0 alone writes."""
    out, log, on_step = Path(out), log or (lambda text: None), on_step or (lambda *a: None)
    ops = backend if hasattr(backend, "asarray") else get_backend(backend or default_backend(),
                                                                  device)
    if not ops.caps.autodiff:
        raise ValueError(f"backend {ops.name!r} has no autodiff: train with mlx or tinygrad")
    shared = None
    if world.rank == 0:
        config, tc, start, state, corpus = _start(config, tc, out, resume, overwrite)
        if state is None:  # before init_params allocates the weights
            limits.check_config_fits(config, tc.batch_size)
        params, opt_state = state or (model_module(config).init_params(config, tc.seed), None)
        shared = config, tc, start, params, opt_state, corpus
    config, tc, start, params, opt_state, corpus = world.share(shared)
    tc = replace(tc, steps=steps) if steps is not None else tc
    if resume and tc.steps <= start:
        raise ValueError(f"steps {tc.steps}: the run in {out} is at step {start} already: "
                         f"expected steps > {start} to continue it")
    tokens = data.load_corpus(tc.data)
    limits.check_run_fits(config, tc.batch_size, tokens)
    world.check(ops, config, tc, params)
    train_tokens, val_tokens = data.split(tokens)
    corpus_id = _corpus_id(tokens)
    if resume and corpus != corpus_id:
        raise ValueError(f"the corpus ({tc.data or 'pydoc topics'}) differs from the one the "
                         "checkpoint was trained on")
    if overwrite and world.rank == 0:
        _remove_run(out)
    params = {k: ops.asarray(v) for k, v in world.shard(params).items()}
    opt_state = {k: ops.asarray(v) for k, v in world.shard(opt_state).items()} if opt_state \
        else optim.init_state(ops, params)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"out {out}: cannot create the directory ({e.strerror})") from None
    metrics = plots.Metrics(out / "metrics.jsonl", start) if world.rank == 0 else None
    step_fn = make_step(world.wrap(ops), config, tc, world)
    tokens_per_step = tc.batch_size * config.context
    log(f"{type(config).__name__} {config.dim}d x {config.layers} on {ops.name} "
        f"({ops.device}); {len(train_tokens):,} train / {len(val_tokens):,} val bytes; "
        f"bigram entropy {data.bigram_entropy(tokens):.3f} nats/byte; steps {start}..{tc.steps}")
    train_seconds, report, saved = 0.0, {}, start  # saved: the current checkpoint's step
    for it in range(start, tc.steps):
        t0 = time.perf_counter()
        batch = world.rows(data.batch_at(train_tokens, it, tc.batch_size, config.context,
                                         tc.seed))
        # routing noise and masks: a function of (seed, step, rank)
        draw = world.stream(tc.seed * 1_000_003 + it)
        ops.seed(draw)
        x = ops.asarray(batch[:, :-1], "int")
        y = draw if is_encoder(config) else ops.asarray(batch[:, 1:], "int")
        lr = optim.cosine_lr(it, tc.lr, tc.lr * tc.min_lr_ratio, tc.warmup, tc.horizon)
        loss, norm, params, opt_state = step_fn(params, opt_state, x, y,
                                                ops.asarray(np.float32(lr)))
        materialize(ops, {"loss": loss, "norm": norm}, params, opt_state)
        train_seconds += time.perf_counter() - t0
        done = it + 1
        value, grad_norm = float(ops.to_numpy(loss)), float(ops.to_numpy(norm))
        if not (math.isfinite(value) and math.isfinite(grad_norm)):
            kept = f"the last good checkpoint (step {saved}) is kept" if saved else \
                "no checkpoint was written"
            raise ValueError(f"step {done}: the training loss is {value} (gradient norm "
                             f"{grad_norm}): stopped before writing a checkpoint; {kept} "
                             f"(lower --lr?)")
        if world.rank == 0:
            metrics.add({"step": done, "split": "train", "objective": value,
                         "lr": lr, "grad_norm": grad_norm,
                         "tokens_per_s": (done - start) * tokens_per_step / train_seconds})
            on_step(done, tc.steps, metrics.records[-1])
        if done % tc.eval_every == 0 or done == tc.steps:
            whole, whole_state = world.full(params), world.full(opt_state)  # expert shards
            if world.rank:  # rank 0 evaluates and writes; the others go on to the next all_sum
                continue
            splits = {"train": train_tokens, "val": val_tokens}
            reports = evaluation.validate(ops, config, whole, splits, tc,
                                          final=done == tc.steps)
            for result in reports:
                metrics.add({"step": done, **result})
            report = {r["mode"]: r for r in reports if r["split"] == "val"}
            log(_summary(done, report))
            save_checkpoint(out, config, tc, done,
                            {k: ops.to_numpy(v) for k, v in whole.items()},
                            {k: ops.to_numpy(v) for k, v in whole_state.items()},
                            {"corpus": corpus_id, "backend": ops.name})
            saved = done
            plots.write_all(metrics.records, out)
    trained = tc.steps - start
    return {**report, "step": tc.steps, "train_seconds": train_seconds, "out": str(out),
            "tokens_per_s": trained * tokens_per_step / train_seconds if trained else None}


def _summary(step: int, report: dict) -> str:
    parts = [f"step {step}:"] + [f"val({m}) {r['loss']:.4f}" for m, r in report.items()]
    for i, b in report.get("causal", report.get("eval", {})).get("blocks", {}).items():
        pred = report["eval"]["blocks"][i].get("predictor")
        parts.append(f"b{i} routed {b['routed_fraction']:.3f}" + (
            f" bal.acc {pred['balanced_accuracy']:.3f}" if pred else ""))
    return "  ".join(parts)

