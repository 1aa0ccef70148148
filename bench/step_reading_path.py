"""How many library files one OPSD step visits, as a reader stepping into each function the first
time it runs: a profiler over one ``train_step`` of the tiny recipe (default path, one rank),
comprehensions, lambdas and generator bodies included (each is code a reader follows).

    PYTHONPATH=. python bench/step_reading_path.py

Prints, for the files of docs/architecture.md's reading-order table and for every library
function: the files in first-call order, the returns (entering a file already visited), and the
returns within each phase (rollout, score, student, optimizer, metrics).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = ("rollout", "score", "student", "optimizer", "metrics")


def step_events(out: str) -> list[tuple[str, str, str]]:
    """(phase, library file, function) for every library call of the second step, in order (the
    first step warms lazy imports and caches). Runs inside a rank."""
    from opsd_megatron.config import load_config, validate_layout
    from opsd_megatron.models.from_config import arch_of
    from opsd_megatron.train import step as step_module
    from opsd_megatron.train.components import build_components
    from tests.train.tiny import RECIPE, overrides

    cfg = load_config(RECIPE, overrides(Path(out), 1, 1, 1))
    c = build_components(cfg, validate_layout(cfg, 1, arch=arch_of(cfg.model)))
    step_module.train_step(c, c.algorithm, 0)
    lib, events, phase = str(ROOT / "opsd_megatron") + "/", [], ["setup"]

    def entering(name, fn):
        def run(*args, **kwargs):
            phase[0] = name
            return fn(*args, **kwargs)

        return run

    alg = c.algorithm
    alg.rollout, alg.score = entering("rollout", alg.rollout), entering("score", alg.score)
    marks = {"normalizer": "student", "finalize_gradients": "optimizer"}
    step_module.loss_contract = _Marks(step_module.loss_contract, marks, phase)
    step_module.step_metrics = entering("metrics", step_module.step_metrics)

    def profile(frame, event, arg):
        path = frame.f_code.co_filename
        if event == "call" and path.startswith(lib):
            code = frame.f_code
            events.append((phase[0], path[len(lib) :], f"{code.co_name}:{code.co_firstlineno}"))

    sys.setprofile(profile)
    try:
        step_module.train_step(c, c.algorithm, 1)
    finally:
        sys.setprofile(None)
    return events


class _Marks:
    """Stands for a module train/step.py uses: reading one of ``marks``' names starts that phase
    (``loss_contract.normalizer``: the student pass; ``.finalize_gradients``: the update)."""

    def __init__(self, module, marks: dict, phase: list):
        self.module, self.marks, self.phase = module, marks, phase

    def __getattr__(self, attr):
        if attr in self.marks:
            self.phase[0] = self.marks[attr]
        return getattr(self.module, attr)


def reading_path(events, files=None, phase=None) -> tuple[list[str], int]:
    """Files in the order a reader first enters each function (consecutive repeats merged) and
    the number of returns to a file already visited."""
    seen_fn, seq = set(), []
    for ph, path, name in events:
        if (files is not None and path not in files) or (phase is not None and ph != phase):
            continue
        if (path, name) in seen_fn:
            continue
        seen_fn.add((path, name))
        if not seq or seq[-1] != path:
            seq.append(path)
    visited, returns = set(), 0
    for path in seq:
        returns += path in visited
        visited.add(path)
    return seq, returns


def table_files() -> list[str]:
    """docs/architecture.md's reading-order table, in its order."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    return re.findall(r"^\| \d+ \| `opsd_megatron/([^`]+)`", doc, re.M)


def first_call_order(events, files) -> list[str]:
    order = []
    for _, path, _ in events:
        if path in files and path not in order:
            order.append(path)
    return order


def main() -> None:
    import argparse
    import tempfile

    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()

    from opsd_megatron.testing import run_distributed

    table = table_files()
    with tempfile.TemporaryDirectory() as out:
        events = run_distributed(step_events, 1, out, timeout=600)[0]
    for label, files in (("reading-order table", set(table)), ("every library function", None)):
        seq, returns = reading_path(events, files)
        per_phase = {p: reading_path(events, files, p)[1] for p in PHASES}
        print(f"{label}: {len(set(seq))} files, {returns} returns; per phase {per_phase}")
        print("  " + " -> ".join(seq))
    print("first-call order of the table's files: " + ", ".join(first_call_order(events, table)))


if __name__ == "__main__":
    main()
