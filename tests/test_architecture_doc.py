"""docs/architecture.md stays true to the code: every file its reading-order table lists exists,
and every function or class (``Class.method`` too) it names is defined in that file; every other
path it names exists; and the table's order is the order in which one step first calls into each
of its files (measured with ``bench/step_reading_path.py``'s profiler)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def _defined(path: Path) -> set[str]:
    """Top-level functions and classes, and ``Class.method`` for each method."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(f"{node.name}.{item.name}")
    return names


def _table_rows(text: str) -> list[tuple[str, list[str]]]:
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].isdigit():
            (path,) = re.findall(r"`([^`]+)`", cells[1])
            rows.append((path, re.findall(r"`([^`]+)`", cells[2])))
    return rows


def test_the_reading_order_names_real_files_and_functions():
    rows = _table_rows(DOC.read_text())
    assert len(rows) >= 5, "the reading-order table was not found"
    assert len(rows) <= 10, "the step's reading order promises at most 10 files"
    problems = []
    for path, names in rows:
        f = ROOT / path
        if not f.is_file():
            problems.append(f"{path}: no such file")
            continue
        defined = _defined(f)
        problems += [f"{path}: no {n}" for n in names if n not in defined]
    assert not problems, problems


def test_every_path_the_page_names_exists():
    text = DOC.read_text()
    paths = set(re.findall(r"`((?:opsd_megatron/|tests/)?\w+/[\w/]+\.py)`", text))
    missing = []
    for p in paths:
        candidates = [ROOT / p, ROOT / "opsd_megatron" / p]
        if not any(c.is_file() for c in candidates):
            missing.append(p)
    assert paths and not missing, missing


@pytest.mark.slow
def test_the_reading_order_is_the_order_a_step_first_calls_each_file(tmp_path):
    from bench.step_reading_path import first_call_order, step_events, table_files
    from opsd_megatron.testing import run_distributed

    table = table_files()
    events = run_distributed(step_events, 1, str(tmp_path), timeout=300)[0]
    assert first_call_order(events, set(table)) == table
