"""Benchmarks: JSONL files with id/problem/answer (the format of shared/data), an HF dataset name
with a field mapping, or held-out synthetic addition problems."""

from __future__ import annotations

import json
from pathlib import Path

from opsd_megatron.data.synthetic import addition_problems

HELD_OUT_SEED = 987654  # synthetic eval problems come from their own stream


def load_benchmark(spec: str, cfg) -> tuple[str, list[dict]]:
    """(name, rows with id/problem/answer/answer_type) for one benchmark spec."""
    if spec.startswith("synthetic:arith"):
        n = int(spec.split(":")[2]) if spec.count(":") == 2 else 200
        rows = [{"id": r["id"], "problem": r["problem"], "answer": r["answer"], "solution": r["solution"]}
                for r in addition_problems(n, seed=HELD_OUT_SEED)]
        return "synthetic_arith", rows
    path = Path(spec)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: benchmark file not found")
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rows.append({"id": str(r.get("id", i)), "problem": r[cfg.problem_field],
                             "answer": str(r[cfg.answer_field]), "answer_type": r.get("answer_type"),
                             "solution": r.get(cfg.solution_field)})
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}: row {i}: needs '{cfg.problem_field}' and '{cfg.answer_field}' ({err})") from err
        name = path.stem
    else:
        from datasets import load_dataset

        ds = load_dataset(spec, split=cfg.split)
        rows = [{"id": str(r.get("id", i)), "problem": r[cfg.problem_field], "answer": str(r[cfg.answer_field]),
                 "answer_type": r.get("answer_type"), "solution": r.get(cfg.solution_field)} for i, r in enumerate(ds)]
        name = spec.replace("/", "_")
    return name, rows[: cfg.max_problems] if cfg.max_problems else rows
