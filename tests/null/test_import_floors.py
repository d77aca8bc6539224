"""Import floors (DESIGN.md "Floors of the house"): lower floors never import higher ones.

Every import is read with `ast`, including those inside functions and `if TYPE_CHECKING:`.
Relative imports are resolved against the module's installed name: `backends/x.py` is
`moe_min.backends.x`, `models/x.py` is `moe_min.models.x`. Files not written yet are skipped.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TREES = {"moe_min": "moe_min", "backends": "moe_min.backends", "models": "moe_min.models"}

# module -> the moe_min modules it may import, as short names: "spec" is moe_min.spec, "x.*" is
# the package x and everything under it, "moe_min" the package's own __init__.
# None: anything but cli. A module with no entry (a new file) gets None until it is given one.
# LEAVES are utilities that import nothing from moe_min; every floor above spec/oracle may use them.
LEAVES = "helpers tensorio"
ALLOWED = {
    "spec": "",  # and the stdlib only, see OUTSIDE
    "helpers": "",
    "tensorio": "helpers",
    "oracle": "spec",  # and only math and numpy, see OUTSIDE
    "ops": f"spec {LEAVES}",
    "routing": f"spec ops {LEAVES}",
    "grouped": f"spec ops routing {LEAVES}",  # dropless through a fused op (layers uses it)
    "inputs": f"spec ops routing {LEAVES}",  # a layer call's inputs, checked
    "layers": f"spec ops routing grouped inputs {LEAVES}",
    "moe_min": f"spec ops routing grouped inputs layers {LEAVES}",
    "conformance.*": f"moe_min spec ops routing grouped inputs layers oracle conformance.* "
                     f"{LEAVES}",
    "backends.*": f"moe_min spec ops routing grouped inputs layers backends.* {LEAVES}",
    "models.*": None,
    "cli": None,  # and nothing imports cli: only the console-script entry point calls it
}
OUTSIDE = {  # modules whose imports from outside moe_min are limited too
    "moe_min.spec": (frozenset(sys.stdlib_module_names), "the stdlib only"),
    "moe_min.oracle": (frozenset({"__future__", "math", "numpy"}), "only math and numpy"),
}


def _full(short: str) -> str:
    return short if short == "moe_min" else f"moe_min.{short}"


def _matches(entry: str, module: str) -> bool:
    """Does the short-name `entry` cover the dotted `module`?"""
    if entry.endswith(".*"):
        return (module + ".").startswith(_full(entry[:-1]))
    return module == _full(entry)


def _rule(module: str) -> list[str] | None:
    for key, allowed in ALLOWED.items():
        if _matches(key, module):
            return None if allowed is None else allowed.split()
    return None


def _module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = [TREES[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


FILES = sorted(p for top in TREES for p in (ROOT / top).rglob("*.py"))
MODULES = {_module_name(p) for p in FILES} | {_full(k.removesuffix(".*")) for k in ALLOWED}


def _imports(path: Path, module: str):
    """Yield (line, imported module) for every import in the file, relative ones resolved."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[: len(parts) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:  # `from pkg import sub` imports the submodule pkg.sub
                sub = f"{base}.{alias.name}"
                yield node.lineno, sub if sub in MODULES else base


def _violations(path: Path, root: Path = ROOT) -> list[str]:
    module, rel = _module_name(path, root), path.relative_to(root).as_posix()
    rule, outside = _rule(module), OUTSIDE.get(module)
    bad = []
    for line, target in _imports(path, module):
        top = target.split(".")[0]
        if top in ("backends", "models"):
            bad.append(
                f"{rel}:{line}: imports {target!r}: write 'moe_min.{target}' (the top-level "
                "folders are not packages once installed)"
            )
        elif top == "moe_min" and target != module:
            if _matches("cli.*", target) or (
                rule is not None and not any(_matches(e, target) for e in rule)
            ):
                allowed = "anything but cli" if rule is None else " ".join(rule) or "nothing"
                bad.append(
                    f"{rel}:{line}: {module} may not import {target} (its floor allows: {allowed})"
                )
        elif top != "moe_min" and outside is not None and top not in outside[0]:
            bad.append(f"{rel}:{line}: {module} may not import {target!r} ({outside[1]})")
    return bad


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_module_respects_its_import_floor(path):
    bad = _violations(path)
    assert not bad, "\n".join(bad)


def _check(tmp_path, rel: str, source: str) -> list[str]:
    """Run the checker on a made-up file at tmp_path/rel, as if tmp_path were the repo."""
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    return _violations(path, tmp_path)


def test_checker_flags_a_lower_floor_importing_a_higher_one(tmp_path):
    assert _check(tmp_path, "moe_min/spec.py", "import json\nfrom . import ops\n") == [
        "moe_min/spec.py:2: moe_min.spec may not import moe_min.ops (its floor allows: nothing)"
    ]
    assert (
        "moe_min.routing" in _check(tmp_path, "moe_min/ops.py", "from moe_min import routing\n")[0]
    )
    assert "moe_min.oracle" in _check(tmp_path, "backends/ops_x.py", "from .. import oracle\n")[0]
    assert (
        "moe_min.models"
        in _check(tmp_path, "moe_min/conformance/runner.py", "from moe_min.models import lm\n")[0]
    )
    assert "moe_min.cli" in _check(tmp_path, "models/lm.py", "from moe_min.cli import main\n")[0]


def test_checker_limits_outside_imports_of_spec_and_oracle(tmp_path):
    assert _check(tmp_path, "moe_min/spec.py", "def f():\n    import numpy\n") == [
        "moe_min/spec.py:2: moe_min.spec may not import 'numpy' (the stdlib only)"
    ]
    source = "import math\nimport numpy as np\nfrom .spec import TokenChoice\nimport typing\n"
    assert _check(tmp_path, "moe_min/oracle.py", source) == [
        "moe_min/oracle.py:4: moe_min.oracle may not import 'typing' (only math and numpy)"
    ]


def test_checker_resolves_relative_imports_against_the_installed_names(tmp_path):
    source = "from ..ops import Caps\nfrom ..layers import apply\nfrom . import ops_numpy\n"
    assert _check(tmp_path, "backends/ops_x.py", source) == []
    source = "from ..oracle import forward\nfrom .case import Case\nfrom . import anything\n"
    assert _check(tmp_path, "moe_min/conformance/runner.py", source) == []
    assert (
        "write 'moe_min.backends.ops_numpy'"
        in _check(tmp_path, "models/lm.py", "import backends.ops_numpy\n")[0]
    )
