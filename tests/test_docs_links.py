"""The README and docs/*.md point at things that exist: every relative Markdown link resolves
from the page that holds it, and every repository path a page names in backticks (a file of the
library — also as ``losses/jsd.py`` relative to the package —, the tests, recipes, launch scripts,
tools or benchmarks) is there; so is every such path the library's docstrings name."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
TOP = ("opsd_megatron", "tests", "recipes", "launch", "tools", "bench", "docs", ".ci")
PACKAGES = tuple(p.name for p in (ROOT / "opsd_megatron").iterdir() if p.is_dir())
PATH = re.compile(r"`((?:[\w.-]+/)+[\w.-]+\.(?:py|yaml|sh|slurm|md|png))`")


def _links(text: str) -> list[str]:
    return [t for t in LINK.findall(text) if not re.match(r"^(https?:|mailto:|#)", t)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    dead = [t for t in _links(page.read_text()) if not (page.parent / t.split("#")[0]).exists()]
    assert not dead, f"{page.name}: dead links {dead}"


def _missing(text: str) -> list[str]:
    missing = []
    for path in set(PATH.findall(text)):
        head = path.split("/")[0]
        if head in TOP:
            ok = (ROOT / path).exists()
        elif head in PACKAGES:  # relative to the library package
            ok = (ROOT / "opsd_megatron" / path).exists()
        else:  # an output (OUT/..., runs/...) or another machine's path
            continue
        if not ok:
            missing.append(path)
    return sorted(missing)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_repository_paths_exist(page):
    missing = _missing(page.read_text())
    assert not missing, f"{page.name}: no such path {missing}"


def _docstrings(module: Path) -> str:
    tree = ast.parse(module.read_text())
    defs = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, defs))]
    return "\n".join(d for d in (ast.get_docstring(n, clean=False) for n in nodes) if d)


def test_paths_named_in_the_librarys_docstrings_exist():
    missing = {
        str(m.relative_to(ROOT)): _missing(_docstrings(m))
        for m in sorted((ROOT / "opsd_megatron").rglob("*.py"))
    }
    missing = {m: paths for m, paths in missing.items() if paths}
    assert not missing, f"docstrings name paths that do not exist: {missing}"


def test_the_checker_sees_a_dead_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see [x](nowhere.md) and [y](https://example.org) and [z](#anchor)")
    assert _links(page.read_text()) == ["nowhere.md"]
