"""How many library files one OPSD step visits, as a reader stepping into each function the first
time it runs: a profiler over one ``train_step`` of the tiny recipe (default path, one rank).

    PYTHONPATH=. python bench/step_reading_path.py

Prints the files in first-call order and the returns (entering a file already visited), for the
files of docs/architecture.md's reading-order table and for every library function.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rank(out: str):
    from opsd_megatron.config import load_config, validate_layout
    from opsd_megatron.models.from_config import arch_of
    from opsd_megatron.train import step as step_module
    from opsd_megatron.train.components import build_components
    from tests.train.tiny import RECIPE, overrides

    cfg = load_config(RECIPE, overrides(Path(out), 1, 1, 1))
    c = build_components(cfg, validate_layout(cfg, 1, arch=arch_of(cfg.model)))
    step_module.train_step(c, c.algorithm, 0)  # warm: lazy imports and caches
    lib, events = str(ROOT / "opsd_megatron") + "/", []

    def profile(frame, event, arg):
        path = frame.f_code.co_filename
        if event == "call" and path.startswith(lib) and not frame.f_code.co_name.startswith("<"):
            events.append((path[len(lib) :], frame.f_code.co_name))

    sys.setprofile(profile)
    step_module.train_step(c, c.algorithm, 1)
    sys.setprofile(None)
    return events


def reading_path(events, files=None) -> tuple[list[str], int]:
    """Files in the order a reader first enters each function (consecutive repeats merged) and
    the number of returns to a file already visited."""
    seen_fn, seq = set(), []
    for path, name in events:
        if (files is not None and path not in files) or (path, name) in seen_fn:
            continue
        seen_fn.add((path, name))
        if not seq or seq[-1] != path:
            seq.append(path)
    visited, returns = set(), 0
    for path in seq:
        returns += path in visited
        visited.add(path)
    return seq, returns


def main() -> None:
    import tempfile

    from opsd_megatron.testing import run_distributed

    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = re.findall(r"^\| \d+ \| `opsd_megatron/([^`]+)`", doc, re.M)
    with tempfile.TemporaryDirectory() as out:
        events = run_distributed(_rank, 1, out, timeout=600)[0]
    for label, files in (("reading-order table", set(table)), ("every library function", None)):
        seq, returns = reading_path(events, files)
        print(f"{label}: {len(set(seq))} files, {returns} returns")
        print("  " + " -> ".join(seq))


if __name__ == "__main__":
    main()
