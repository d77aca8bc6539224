"""scripts/sz.py: the line budget holds, and the counter skips what it should."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SZ = ROOT / "scripts" / "sz.py"


def _sz():
    spec = importlib.util.spec_from_file_location("sz", SZ)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_file_is_within_its_line_budget():
    done = subprocess.run([sys.executable, str(SZ)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_counter_skips_docstrings_comments_and_blank_lines():
    source = textwrap.dedent('''\
        """Module docstring,
        on two lines."""

        # a comment-only line
        import math  # a trailing comment does not hide code


        class A:
            """Class docstring."""

            x: int = 1
            "attribute docstring"

            def f(self):
                \'\'\'Function docstring.\'\'\'
                # comment
                return (1 +
                        2)

        TEXT = """a string value
        is code, every line"""
        ''')
    # counted: import, class, x, def, return (2 lines), TEXT (2 lines)
    assert _sz().count_lines(source) == 8


def test_over_budget_file_fails_the_run(tmp_path):
    (tmp_path / "moe_min").mkdir()
    (tmp_path / "moe_min" / "helpers.py").write_text("x = 1\n" * 81)  # budget 80
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_big.py").write_text("x = 1\n" * 1000)  # informational
    done = subprocess.run(
        [sys.executable, str(SZ), str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "moe_min/helpers.py: 81 > 80" in done.stderr
    assert "test_big" not in done.stderr
