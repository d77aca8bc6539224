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
