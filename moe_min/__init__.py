"""moe_min: one routing spec, one lowering, many backends, one float64 oracle."""

# --- layout (packaging; keep this block first) ----------------------------------------------
# The repo keeps `backends/` and `models/` at its top level, but they are only ever importable
# as `moe_min.backends` and `moe_min.models`. A wheel copies them into `moe_min/` (see
# hatch_build.py). In a source checkout (editable install, or run from the repo) `moe_min/` has
# no such folders, so the repo root joins this package's search path; nothing is put on sys.path.
import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "backends")) and _os.path.isfile(
    _os.path.join(_root, "backends", "__init__.py")
):
    __path__.append(_root)
del _os, _here, _root

__version__ = "0.1.0"
# --- end layout ---------------------------------------------------------------------------
