"""What the command-line modules share: opening a backend and calling into the library so that
a bad input is one line and exit status 1, never a traceback."""

from __future__ import annotations

import click

from moe_min.ops import get_backend


def backend(name: str, device: str | None, **options):
    try:
        return get_backend(name, device, **options)
    except TypeError:  # a backend whose factory takes no such option
        raise click.ClickException(f"backend {name!r} takes no option "
                                   f"{', '.join(options)}") from None
    except (ValueError, ImportError, RuntimeError) as e:
        raise click.ClickException(str(e)) from None


def run_library(fn, *args, **kwargs):
    """Call into the library; a bad input (config, --set, data, checkpoint, prompt) becomes
    one line and exit status 1, never a traceback."""
    from moe_min.models.data import DataError
    from moe_min.spec import SpecError

    try:
        return fn(*args, **kwargs)
    except (ValueError, DataError, SpecError, OSError) as e:
        raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) \
            from None
