"""The `moe-min` command line: thin commands that parse, call the library and print."""

from __future__ import annotations

import sys

import click

from moe_min.cli_bench import bench
from moe_min.cli_util import COUNT, MAX_COUNT, SEED, OneLineGroup
from moe_min.cli_util import backend as _backend
from moe_min.cli_util import run_library as _run_library
from moe_min.helpers import check_writable
from moe_min.ops import backend_entry_points, fast_ops, get_backend


@click.group(cls=OneLineGroup)
@click.option("--debug", is_flag=True, help="Show an error's traceback, not just its line.")
def main(debug):
    """moe_min: one routing spec, lowered onto several array frameworks."""


@main.command()
@click.argument("backend")
@click.option("--device", default=None, help="Backend device (see `moe-min info`).")
@click.option("--cases", "cases_dir", default=None, type=click.Path(file_okay=False),
              help="Corpus directory (default: the one shipped in the package).")
@click.option("--include", multiple=True, help="Regex on case names; repeatable.")
@click.option("--exclude", multiple=True, help="Regex on case names; repeatable.")
@click.option("--junit", type=click.Path(dir_okay=False), help="Write JUnit XML here.")
@click.option("-v", "--verbose", is_flag=True,
              help="Show every row's detail: the worst element, of passing rows too.")
def conform(backend, device, cases_dir, include, exclude, junit, verbose):
    """Run the conformance corpus against BACKEND; exit 1 on any failure."""
    from moe_min.conformance.runner import (Runner, failures, format_rows, summary,
                                            write_junit)

    runner = Runner(_backend(backend, device), cases_dir)
    for pattern in include:
        _run_library(runner.include, pattern)
    for pattern in exclude:
        _run_library(runner.exclude, pattern)
    if junit:  # before the run, not after it
        _run_library(check_writable, junit)
    try:
        rows = runner.run()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_rows(rows, verbose))
    if junit:
        _run_library(write_junit, rows, junit, suite=f"moe-min conform {backend}")
    if failures(rows):
        click.echo(failures(rows))
    click.echo(summary(rows))
    sys.exit(1 if any(r.status == "failed" for r in rows) else 0)


@main.command()
def info():
    """List installed backends, their devices and capabilities."""
    for name in sorted(backend_entry_points()):
        try:
            ops = get_backend(name)
        except Exception as e:  # a broken optional backend must not hide the others
            click.echo(f"{name:<10} unavailable: {e}")
            continue
        caps = ops.caps
        click.echo(f"{name:<10} devices={','.join(caps.devices)} autodiff={caps.autodiff} "
                   f"jit={caps.jit} float64={caps.float64} "
                   f"fast ops={','.join(fast_ops(ops)) or 'none'} "
                   f"(used here: {','.join(getattr(ops, 'fused', fast_ops(ops))) or 'none'})")
        for key, value in (ops.info() if hasattr(ops, "info") else {}).items():
            click.echo(f"{'':<10} {key}: {value}")


# ---- training and sampling (models/train.py, models/generate.py) ---------------------------

class _Progress:
    """A click progress bar (click is a dependency already) with loss, tokens/s and ETA."""

    def __init__(self, ranks: int = 1):
        self.bar, self.label = None, "train" if ranks == 1 else f"train x{ranks} ranks"

    def __call__(self, done, total, record):
        if self.bar is None:
            self.bar = click.progressbar(length=total - done + 1, label=self.label, width=24,
                                         show_eta=True, item_show_func=lambda text: text)
        self.bar.update(1, f"step {done}  loss {record['objective']:.3f}  "
                           f"{record['tokens_per_s']:,.0f} tok/s")
        if done == total:
            self.bar.render_finish()

    def log(self, text: str):
        """A line above the bar: clear the bar's line first; it redraws at the next step."""
        if self.bar is not None and not getattr(self.bar, "hidden", True):
            click.echo("\r\033[K", nl=False)
        click.echo(text)


@main.command()
@click.option("--config", "config_name", default=None, help="Preset name, e.g. tiny-mod.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field (dotted for nested specs); repeatable.")
@click.option("--backend", default=None, help="Default: mlx if installed, else tinygrad.")
@click.option("--device", default=None)
@click.option("--data", "data_path", default=None, type=click.Path(dir_okay=False),
              help="A UTF-8 text file (default: CPython's pydoc topics).")
@click.option("--steps", type=int, default=None)
@click.option("--batch-size", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--seed", type=SEED, default=None)
@click.option("--eval-every", type=int, default=None)
@click.option("--out", default="runs/latest", show_default=True, type=click.Path())
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--overwrite", is_flag=True, help="Replace the run that --out holds.")
@click.option("--ranks", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Data-parallel processes on this machine (mx.distributed, ring on loopback).")
@click.option("--hostfile", type=click.Path(dir_okay=False), default=None,
              help="Data parallel over the machines of an mlx.launch hostfile.")
@click.option("--expert-parallel", is_flag=True, help="Shard each MoE layer's experts over the "
              "ranks (E divisible by their number).")
@click.option("--distributed", "joined", is_flag=True, hidden=True)  # each rank, from launch
def train(config_name, overrides, backend, device, data_path, steps, batch_size, lr, seed,
          eval_every, out, resume, overwrite, ranks, hostfile, expert_parallel, joined):
    """Train a routed byte-level model; metrics, plots and checkpoint go to --out."""
    from moe_min.models import distributed as dist
    from moe_min.models import train as t

    if not joined and (ranks > 1 or hostfile or expert_parallel):
        sys.exit(_run_library(dist.launch, sys.argv[1:], ranks, hostfile, expert_parallel))
    world = _run_library(dist.join, expert_parallel) if joined else dist.ALONE

    given = {"batch_size": batch_size, "lr": lr, "seed": seed, "eval_every": eval_every,
             "data": data_path}
    given = {k: v for k, v in given.items() if v is not None}
    if resume and (config_name or overrides or given):
        raise click.ClickException("--resume continues the run in --out with its own config "
                                   "and settings: give only --out, --steps, --backend, --device "
                                   "and the ranks")
    config = None if resume else _run_library(t.model_config, config_name or "tiny-dense",
                                              overrides)
    if resume and overwrite:
        raise click.ClickException("--resume continues the run in --out; --overwrite replaces "
                                   "it: give one of them")
    tc = None if resume else _run_library(t.TrainConfig, **given, **(
        {"steps": steps} if steps is not None else {}))
    progress = _Progress(world.size) if world.rank == 0 else None  # rank 0 alone reports
    on_step = progress and (dist.Traffic(world, progress, progress.log) if joined else progress)
    result = _run_library(t.train, config, tc, out=out, backend=backend, device=device,
                          resume=resume, steps=steps if resume else None, on_step=on_step,
                          log=progress and progress.log, overwrite=overwrite, world=world)
    if progress:
        click.echo(f"done: {result['tokens_per_s'] or 0:,.0f} tokens/s; checkpoint {out}/"
                   "checkpoint")


@main.command()
@click.option("--checkpoint", "checkpoint", default="runs/latest/checkpoint", show_default=True,
              type=click.Path())
@click.option("--prompt", default="def ", show_default=True)
@click.option("--max-tokens", type=COUNT, default=200, show_default=True)
@click.option("--temperature", type=float, default=0.8, show_default=True)
@click.option("--top-k", type=click.IntRange(0, MAX_COUNT), default=0, show_default=True,
              help="0: no top-k cut.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=SEED, default=0, show_default=True)
@click.option("--backend", default=None, help="Default: mlx if installed, else tinygrad.")
@click.option("--device", default=None)
def generate(checkpoint, prompt, max_tokens, temperature, top_k, top_p, seed, backend, device):
    """Sample text from a trained decoder, streamed as it is produced."""
    from moe_min.models import generate as g
    from moe_min.models import train as t

    ckpt = _run_library(t.load_checkpoint, checkpoint, optimizer=False)
    if t.is_encoder(ckpt.config):
        raise click.ClickException(f"{checkpoint}: an encoder (Soft MoE) checkpoint cannot "
                                   "generate: Soft MoE is not causal")
    _run_library(g.check_prompt, ckpt.config, len(prompt.encode("utf-8")))
    ops = _backend(backend or _run_library(t.default_backend), device)
    sampler = _run_library(g.make_sampler, temperature, top_k, top_p, seed)
    click.echo(prompt, nl=False)
    stats = {}
    _, speed, count = g.generate(ops, ckpt.config, ckpt.params, prompt, max_tokens=max_tokens,
                                 sampler=sampler, emit=lambda s: click.echo(s, nl=False),
                                 stats=stats)
    routed = "".join(f"; block {i} routed {f:.0%}" for i, f in stats.get(
        "routed_fraction", {}).items())
    steady = (f"; {stats['steady_tokens_per_s']:.0f} tokens/s after "
              f"{stats['compile_seconds']:.1f} s of compiles") if stats.get("compile_seconds") else ""
    click.echo(f"\n[{count} tokens, {speed:.1f} tokens/s{steady}{routed}]", err=True)

main.add_command(bench)
