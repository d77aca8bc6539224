"""`moe-min bench ...`: speed as ratios measured side by side in one run (moe_min/bench.py,
models/bench_generate.py); never used by tests as assertions."""

from __future__ import annotations

import click

from moe_min.cli_util import COUNT, MAX_COUNT, OneLineGroup
from moe_min.cli_util import backend as _backend
from moe_min.cli_util import run_library as _run_library
from moe_min.helpers import check_fits


@click.group(cls=OneLineGroup)
def bench():
    """Speed, as ratios measured side by side in one run."""


def _print_timings(timings):
    for t in timings:
        shown = "n/a" if t.seconds is None else f"{t.seconds * 1e3:9.1f} ms"
        click.echo(f"  {t.name:<28} {shown:>12}  {t.note}")


@bench.command("layer")
@click.option("--backend", default="numpy", show_default=True)
@click.option("--device", default=None)
@click.option("--tokens", type=COUNT, default=4096, show_default=True)
@click.option("--dim", type=COUNT, default=512, show_default=True)
@click.option("--hidden", type=COUNT, default=1024, show_default=True)
@click.option("--experts", type=COUNT, default=8, show_default=True)
@click.option("--top-k", type=COUNT, default=2, show_default=True)
@click.option("--activation", default="relu", show_default=True,
              type=click.Choice(["relu", "gelu", "gelu_tanh", "silu"]))
@click.option("--glu", is_flag=True, help="SwiGLU experts (vs mlx-lm's SwitchGLU).")
@click.option("--repeat", type=COUNT, default=5, show_default=True)
@click.option("--scheme", default="token_choice", show_default=True,
              type=click.Choice(["token_choice", "expert_choice", "soft_moe"]))
@click.option("--capacity", default=None,
              help="Token choice: a capacity factor (default 1.0), or 'dropless'.")
@click.option("--also-fused", multiple=True, help="Also time the MoE layer with these fused "
              "ops (repeatable: all, none or a comma list; see moe-min info).")
@click.option("--compile", "compiled", is_flag=True,
              help="Time the compiled step (ops.compile; tinygrad needs it to be fast).")
def bench_layer(backend, device, tokens, dim, hidden, experts, top_k, activation, glu, repeat,
                scheme, capacity, also_fused, compiled):
    """A routed layer (--scheme, --capacity) vs a dense MLP of equal active FLOPs, routing alone,
    and mlx-lm's SwitchMLP/SwitchGLU (MLX, bench extra, token choice), timed round-robin."""
    from moe_min import bench as b

    ops = _backend(backend, device)
    act = "silu, gated" if glu else activation
    if capacity is not None and scheme != "token_choice":
        raise click.ClickException(f"--capacity {capacity}: only token choice takes it (expert "
                                   f"choice runs at factor K, Soft MoE at T*K/E slots)")
    capacity = capacity or "1.0"
    _run_library(b.layer_spec, scheme, experts, top_k, capacity, tokens)  # one-line errors
    _run_library(b.check_layer_fits, tokens, dim, hidden, experts, top_k, scheme)
    others = {f"fused={c}": _backend(backend, device, fused=c) for c in also_fused}
    click.echo(f"{backend} on {ops.device}{' compiled' if compiled else ''}: {scheme} "
               f"({capacity if scheme == 'token_choice' else 'K'}"
               f") T={tokens} D={dim} H={hidden} E={experts} K={top_k} {act}; {b.environment()}")
    timings = b.layer(ops, tokens, dim, hidden, experts, top_k, activation, glu, repeat,
                      scheme=scheme, capacity=capacity, variants=others, compiled=compiled)
    _print_timings(timings)
    for label, value in b.ratios(timings):
        click.echo(f"  {label:<32} {value:6.2f}x")


@bench.command("matmul")
@click.option("--backend", default="numpy", show_default=True)
@click.option("--device", default=None)
@click.option("--size", type=COUNT, default=1024, show_default=True)
def bench_matmul(backend, device, size):
    """float32 matmul throughput of a backend next to NumPy's."""
    from moe_min import bench as b

    ops = _backend(backend, device)
    _run_library(check_fits, 4 * 4 * size * size, f"a {size}x{size} float32 matmul",
                 "lower --size")  # a, b, the product, and the backend's copies of a and b
    click.echo(b.environment())
    _print_timings(b.matmul_gflops(ops, size))


@bench.command("generate")
@click.option("--config", "config_name", default="tiny-mod", show_default=True,
              help="A preset (moe-min train --help lists them), with fresh parameters.")
@click.option("--checkpoint", default=None, help="Time a trained checkpoint instead.")
@click.option("--backend", default="mlx", show_default=True)
@click.option("--device", default=None)
@click.option("--skip", type=click.Choice(["both", "mask", "branch"]), default="both",
              show_default=True, help="MoD blocks at decode time (models/decode.py).")
@click.option("--prompt-len", type=COUNT, default=64, show_default=True)
@click.option("--tokens", type=COUNT, default=300, show_default=True,
              help="Decode steps per variant.")
@click.option("--compare-mlx/--no-compare-mlx", default=True, show_default=True)
@click.option("--train-steps", type=click.IntRange(0, MAX_COUNT), default=0, show_default=True,
              help="Also time this many jitted training steps per backend (batch 16).")
@click.option("--fused", multiple=True, help="Instead: compare these choices of fused ops on "
              "--backend (repeatable: all, none, default or a comma list; see moe-min info).")
def bench_generate(config_name, checkpoint, backend, device, skip, prompt_len, tokens,
                   compare_mlx, train_steps, fused):
    """Prefill and decode tokens/s (batch 1) through the compiled static-shape steps, next to
    MLX and the same-shape dense model; first compiles timed apart (models/bench_generate.py)."""
    from moe_min import bench as b
    from moe_min.models import bench_generate as g
    from moe_min.models import train as t
    from moe_min.models.limits import check_config_fits

    if checkpoint:
        ckpt = _run_library(t.load_checkpoint, checkpoint, optimizer=False)
        config, params, name = ckpt.config, ckpt.params, checkpoint
    else:
        config, params, name = _run_library(t.model_config, config_name), None, config_name
    if t.is_encoder(config):
        raise click.ClickException(f"{name}: an encoder does not generate")
    if prompt_len >= config.context:
        raise click.ClickException(f"--prompt-len {prompt_len}: the context of {name} is "
                                   f"{config.context}: expected at most {config.context - 1}")
    _run_library(check_config_fits, config)
    pools = [(backend, device)] + ([("mlx", None)] if compare_mlx and backend != "mlx" else [])
    opened = [_backend(*p) for p in pools]  # a bad --backend/--device: one line, no header
    by_choice = {choice: _backend(backend, device, fused=choice) for choice in fused}
    click.echo(f"bench generate: {name}, batch 1, prompt {prompt_len}, {tokens} decode steps "
               f"per variant; {b.environment()}")
    if fused:
        variants = g.run(g.fused_variants(by_choice, config, params, name), prompt_len, tokens)
        return g.fused_report(variants, click.echo, train_steps)
    variants = [v for ops in opened for v in g.variants(ops, config, params, name, skip)]
    g.report(g.run(variants, prompt_len, tokens), click.echo,
             g.train_rates(variants, name, train_steps))
