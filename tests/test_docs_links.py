"""The README and docs/*.md point at things that exist: every relative Markdown link resolves
from the page that holds it, and every repository path a page names in backticks (a file of the
library — also as ``losses/jsd.py`` relative to the package —, the tests, recipes, launch scripts,
tools or benchmarks) is there."""

from __future__ import annotations

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


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_repository_paths_exist(page):
    missing = []
    for path in set(PATH.findall(page.read_text())):
        head = path.split("/")[0]
        if head in TOP:
            ok = (ROOT / path).exists()
        elif head in PACKAGES:  # relative to the library package
            ok = (ROOT / "opsd_megatron" / path).exists()
        else:  # an output (OUT/..., runs/...) or another machine's path
            continue
        if not ok:
            missing.append(path)
    assert not missing, f"{page.name}: no such path {sorted(missing)}"


def test_the_checker_sees_a_dead_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("see [x](nowhere.md) and [y](https://example.org) and [z](#anchor)")
    assert _links(page.read_text()) == ["nowhere.md"]
