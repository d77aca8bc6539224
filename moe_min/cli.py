"""The `moe-min` command line: thin commands that parse, call the library and print."""

from __future__ import annotations

import sys

import click

from moe_min.ops import backend_entry_points, get_backend


def _backend(name: str, device: str | None):
    try:
        return get_backend(name, device)
    except (ValueError, ImportError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None


@click.group()
def main():
    """moe_min: one routing spec, lowered onto several array frameworks."""


@main.command()
@click.argument("backend")
@click.option("--device", default=None, help="Backend device (see `moe-min info`).")
@click.option("--cases", "cases_dir", default=None, type=click.Path(file_okay=False),
              help="Corpus directory (default: the one shipped in the package).")
@click.option("--include", multiple=True, help="Regex on case names; repeatable.")
@click.option("--exclude", multiple=True, help="Regex on case names; repeatable.")
@click.option("--junit", type=click.Path(dir_okay=False), help="Write JUnit XML here.")
@click.option("-v", "--verbose", is_flag=True, help="Show the worst element of every row.")
def conform(backend, device, cases_dir, include, exclude, junit, verbose):
    """Run the conformance corpus against BACKEND; exit 1 on any failure."""
    from moe_min.conformance.runner import Runner, format_rows, summary, write_junit

    runner = Runner(_backend(backend, device), cases_dir)
    for pattern in include:
        runner.include(pattern)
    for pattern in exclude:
        runner.exclude(pattern)
    try:
        rows = runner.run()
    except ValueError as e:
        raise click.ClickException(str(e)) from None
    click.echo(format_rows(rows, verbose))
    if junit:
        write_junit(rows, junit, suite=f"moe-min conform {backend}")
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
                   f"jit={caps.jit} float64={caps.float64}")
        for key, value in (ops.info() if hasattr(ops, "info") else {}).items():
            click.echo(f"{'':<10} {key}: {value}")


@main.group()
def bench():
    """Speed, as ratios measured side by side in one run."""


def _print_timings(timings):
    for t in timings:
        shown = "n/a" if t.seconds is None else f"{t.seconds * 1e3:9.1f} ms"
        click.echo(f"  {t.name:<28} {shown:>12}  {t.note}")


@bench.command("layer")
@click.option("--backend", default="numpy", show_default=True)
@click.option("--device", default=None)
@click.option("--tokens", default=4096, show_default=True)
@click.option("--dim", default=512, show_default=True)
@click.option("--hidden", default=1024, show_default=True)
@click.option("--experts", default=8, show_default=True)
@click.option("--top-k", default=2, show_default=True)
@click.option("--activation", default="relu", show_default=True,
              type=click.Choice(["relu", "gelu", "gelu_tanh", "silu"]))
@click.option("--repeat", default=5, show_default=True)
def bench_layer(backend, device, tokens, dim, hidden, experts, top_k, activation, repeat):
    """A token-choice MoE layer vs a dense MLP of equal active FLOPs, and routing alone."""
    from moe_min import bench as b

    ops = _backend(backend, device)
    click.echo(f"{backend} on {ops.device}: T={tokens} D={dim} H={hidden} E={experts} "
               f"K={top_k} {activation}; {b.environment()}")
    timings = b.layer(ops, tokens, dim, hidden, experts, top_k, activation, repeat)
    if activation == "relu":
        timings += b.mlx_lm_layer(ops, tokens, dim, hidden, experts, top_k, repeat)
    _print_timings(timings)
    for label, value in b.ratios(timings):
        click.echo(f"  {label:<32} {value:6.2f}x")


@bench.command("matmul")
@click.option("--backend", default="numpy", show_default=True)
@click.option("--device", default=None)
@click.option("--size", default=1024, show_default=True)
def bench_matmul(backend, device, size):
    """float32 matmul throughput of a backend next to NumPy's."""
    from moe_min import bench as b

    click.echo(b.environment())
    _print_timings(b.matmul_gflops(_backend(backend, device), size))
