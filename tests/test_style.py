"""``ruff check`` (pyflakes, syntax errors, import order, line length; settings in
pyproject.toml) and ``ruff format --check`` pass on the library, the tools, the benchmarks and
the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


PATHS = ["opsd_megatron", "tools", "bench", "tests"]


def _ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ruff", *args, "--no-cache", *PATHS],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_ruff_check_is_clean():
    import tomllib

    rules = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"]["select"]
    assert "E501" in rules, "line length must stay enforced (E501)"
    out = _ruff("check")
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_code_is_formatted():
    out = _ruff("format", "--check")
    assert out.returncode == 0, "run `ruff format`:\n" + out.stdout[-4000:] + out.stderr[-2000:]
