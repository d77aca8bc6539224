"""Packaging: the repo's top-level `backends/` and `models/` install as `moe_min.backends` and
`moe_min.models` and never as top-level packages, from a wheel and from an editable install;
the conformance cases ship in the wheel."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CASES = "moe_min/conformance/cases"

# Run in a child `python -I` (no PYTHONPATH, no user site, no script dir or cwd on sys.path) from
# a temp cwd outside the repo. -I ignores PYTHONPATH, so a wheel's --target dir is prepended here.
CHECK = textwrap.dedent("""
    import importlib.util, json, sys
    sys.path[:0] = json.loads(sys.argv[1])
    import moe_min, moe_min.backends, moe_min.models
    out = {m: sys.modules[m].__file__ for m in ("moe_min", "moe_min.backends", "moe_min.models")}
    out["top_level"] = {name: getattr(importlib.util.find_spec(name), "origin", None)
                        for name in ("backends", "models")}
    for target in json.loads(sys.argv[2]):
        module, _, attr = target.partition(":")
        getattr(importlib.import_module(module), attr)
    out["sys_path"] = sys.path
    print(json.dumps(out))
""")


def _check(tmp_path, prepend: list[str], entry_points: list[str] = ()) -> dict:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    cmd = [sys.executable, "-I", "-c", CHECK, json.dumps(prepend), json.dumps(list(entry_points))]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def _copy_of_repo(dest: Path) -> Path:
    """The files a build reads, plus a dummy conformance case that .gitignore would hide."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("moe_min", "backends", "models"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "hatch_build.py", "README.md", "LICENSE", ".gitignore"):
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, dest / name)
    dummy = dest / CASES / "token_choice" / "dummy__case.safetensors"
    dummy.parent.mkdir(parents=True, exist_ok=True)
    dummy.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")  # an empty safetensors file
    with open(dest / ".gitignore", "a") as f:
        f.write("\n*.safetensors\n")  # say checkpoints: the cases must ship all the same
    return dest


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """A snapshot of the repo: others may be writing to the tree while this runs."""
    return _copy_of_repo(tmp_path_factory.mktemp("src"))


@pytest.fixture(scope="module")
def wheel(src, tmp_path_factory) -> Path:
    pytest.importorskip(
        "hatchling", reason="the wheel is built without isolation: pip install -e '.[test]'"
    )
    out = tmp_path_factory.mktemp("dist")
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(src))
    (path,) = out.glob("moe_min-*.whl")
    return path


def test_wheel_nests_backends_and_models_under_moe_min(src, wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"moe_min"}, sorted(tops)
    for top in ("backends", "models"):
        expected = {f"moe_min/{p.relative_to(src).as_posix()}" for p in (src / top).rglob("*.py")}
        assert f"moe_min/{top}/__init__.py" in expected
        assert expected <= set(names), sorted(expected - set(names))
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_ships_the_conformance_cases(src, wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert f"{CASES}/token_choice/dummy__case.safetensors" in names  # though .gitignore'd
    shipped = {p.relative_to(src).as_posix() for p in (src / CASES).rglob("*.safetensors")}
    assert shipped <= names, sorted(shipped - names)


def test_wheel_metadata_entry_points_and_core_dependencies(wheel):
    with zipfile.ZipFile(wheel) as whl:
        info = next(n.split("/")[0] for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        entry_points = whl.read(f"{info}/entry_points.txt").decode()
        meta = whl.read(f"{info}/METADATA").decode()
    assert "moe-min = moe_min.cli:main" in entry_points
    group = entry_points.split("[moe_min.backends]\n", 1)[1].split("\n\n")[0].splitlines()
    assert "numpy = moe_min.backends.ops_numpy:NumpyOps" in group
    assert "mlx = moe_min.backends.ops_mlx:MlxOps" in group
    requires = [
        line.split(":", 1)[1].strip()
        for line in meta.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert sorted(r for r in requires if "extra ==" not in r) == ["click", "numpy"]
    assert "Requires-Python: >=3.10" in meta


def test_installed_wheel_imports_moe_min_backends_and_no_top_level_backends(src, wheel, tmp_path):
    target = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel))
    assert not {"backends", "models"} & {p.name for p in target.iterdir()}
    numpy_ops = "moe_min.backends.ops_numpy:NumpyOps"  # the entry point's target, once written
    out = _check(
        tmp_path, [str(target)], [numpy_ops] if (src / "backends/ops_numpy.py").exists() else []
    )
    assert out["moe_min"] == str(target / "moe_min" / "__init__.py")
    assert out["moe_min.backends"] == str(target / "moe_min" / "backends" / "__init__.py")
    assert out["moe_min.models"] == str(target / "moe_min" / "models" / "__init__.py")
    assert out["top_level"] == {"backends": None, "models": None}


def _editable_checkout() -> Path | None:
    try:
        text = metadata.distribution("moe-min").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return None
    info = json.loads(text or "{}")
    if not info.get("dir_info", {}).get("editable"):
        return None
    return Path(info["url"].removeprefix("file://"))


def test_editable_install_maps_only_moe_min(tmp_path):
    checkout = _editable_checkout()
    if checkout is None or checkout.resolve() != ROOT:
        pytest.skip(
            f"moe-min is not installed editable from {ROOT} in {sys.prefix} "
            f"(found: {checkout}); run `make test`"
        )
    out = _check(tmp_path, [])
    assert out["moe_min"] == str(ROOT / "moe_min" / "__init__.py")
    assert out["moe_min.backends"] == str(ROOT / "backends" / "__init__.py")
    assert out["moe_min.models"] == str(ROOT / "models" / "__init__.py")
    assert out["top_level"] == {"backends": None, "models": None}
    assert str(ROOT) not in out["sys_path"]
