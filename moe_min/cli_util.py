"""What the command-line modules share: opening a backend and calling into the library so that
a bad input is one line and exit status 1, never a traceback (`moe-min --debug` shows it)."""

from __future__ import annotations

import contextlib

import click

from moe_min.ops import get_backend

MAX_COUNT = 2 ** 31 - 1  # steps, tokens, repeats: past this no run ends in a lifetime
COUNT = click.IntRange(1, MAX_COUNT)
SEED = click.IntRange(0, 2 ** 32 - 1)
_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


def _debug() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and ctx.find_root().params.get("debug"))


def backend(name: str, device: str | None, **options):
    try:
        return run_library(get_backend, name, device, **options)
    except TypeError:  # a backend whose factory takes no such option
        if not options:
            raise
        raise click.ClickException(f"backend {name!r} takes no option "
                                   f"{', '.join(options)}") from None


def run_library(fn, *args, **kwargs):
    """Call into the library; a bad input (config, --set, data, checkpoint, prompt) or a fault
    (out of memory, disk full) becomes one line and exit status 1, never a traceback."""
    from moe_min.models.data import DataError
    from moe_min.spec import SpecError

    try:
        return fn(*args, **kwargs)
    except (ValueError, DataError, SpecError, OSError, ImportError, RuntimeError,
            MemoryError) as e:
        if _debug():
            raise
        raise click.ClickException(_one_line(e)) from None


def _one_line(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
    if isinstance(e, MemoryError):
        return f"out of memory ({text}): lower the sizes (--set, --batch-size, --tokens, ...)"
    return text


@contextlib.contextmanager
def _one_line_errors(ctx: click.Context | None):
    """Usage errors exit 1 on one line like every other refusal; an exception no boundary
    check foresaw is one line too, naming its type, unless --debug asks for the traceback."""
    try:
        yield
    except _HELP:  # `moe-min` alone prints the help
        raise
    except click.UsageError as e:
        raise click.ClickException(e.format_message()) from None
    except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
        raise
    except Exception as e:
        if ctx is not None and ctx.params.get("debug"):
            raise
        raise click.ClickException(f"{type(e).__name__}: {_one_line(e)} (unexpected: "
                                   "`moe-min --debug ...` shows where)") from None


class _Command(click.Command):
    """A command that refuses an empty value: '' would silently mean the default (`--out ''`
    wrote into the current directory, `--backend ''` picked the default backend)."""

    def invoke(self, ctx):
        for param in self.params:
            value = ctx.params.get(param.name)
            if value == "" or (isinstance(value, tuple) and "" in value):
                raise click.BadParameter("'' is empty: expected a value (leave the option out "
                                         "for its default)", ctx=ctx, param=param)
        return super().invoke(ctx)


class OneLineGroup(click.Group):
    """The `moe-min` groups: every error, parsing's included, is one line and exit status 1;
    no option takes an empty value."""

    command_class = _Command

    def make_context(self, info_name, args, parent=None, **extra):
        with _one_line_errors(None):
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx):
        with _one_line_errors(ctx):
            return super().invoke(ctx)
