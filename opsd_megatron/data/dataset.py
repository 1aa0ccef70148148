"""Load (problem, reference solution) pairs: the synthetic task, local JSONL/Parquet files, or an HF
dataset name, with field mapping, length filtering, deduplication and a seeded shuffle.

A malformed row (not a mapping, a missing or non-text field) raises an error naming the file and
row, or, with ``skip_malformed``, is skipped and counted.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from opsd_megatron.data.synthetic import addition_problems


class DataError(ValueError):
    pass


@dataclass
class ProblemSet:
    rows: list[dict]
    skipped_malformed: int = 0
    dropped_too_long: int = 0
    dropped_duplicates: int = 0
    sources: list[str] = field(default_factory=list)


def _read_local(path: Path) -> list:
    if path.suffix == ".jsonl":
        rows = []
        with path.open() as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    rows.append(DataError(f"{path}: row {i}: not valid JSON ({err.msg})"))
        return rows
    if path.suffix == ".parquet":
        from datasets import load_dataset

        return list(load_dataset("parquet", data_files=str(path), split="train"))
    raise DataError(f"{path}: unsupported data file type (use .jsonl or .parquet)")


def _raw_rows(cfg) -> list[tuple[str, int, object]]:
    if cfg.source.startswith("synthetic:"):
        if cfg.source != "synthetic:arith":
            raise DataError(f"data.source={cfg.source!r}: the only synthetic task is synthetic:arith")
        rows = addition_problems(cfg.num_synthetic, seed=cfg.shuffle_seed)
        return [("synthetic:arith", i, r) for i, r in enumerate(rows)]
    out = []
    paths = [Path(p) for p in cfg.source.split(",")]
    if all(p.suffix in (".jsonl", ".parquet") for p in paths):
        for p in paths:
            if not p.is_file():
                raise DataError(f"{p}: data file not found")
            out += [(str(p), i, r) for i, r in enumerate(_read_local(p))]
        return out
    from datasets import load_dataset  # an HF dataset name (needs network or a local cache)

    ds = load_dataset(cfg.source, split=cfg.split)
    return [(cfg.source, i, r) for i, r in enumerate(ds)]


def load_problems(cfg, count_tokens=None) -> ProblemSet:
    """``cfg``: a DataConfig. ``count_tokens(text) -> int`` enables the length filters."""
    result = ProblemSet(rows=[])
    seen = set()
    for where, i, row in _raw_rows(cfg):
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"{where}: row {i}: not a JSON object")
            fields = {}
            for key in (cfg.problem_field, cfg.solution_field):
                value = row.get(key)
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{where}: row {i}: field '{key}' is missing or not non-empty text")
                fields[key] = value
        except DataError:
            if cfg.skip_malformed:
                result.skipped_malformed += 1
                continue
            raise
        problem, solution = fields[cfg.problem_field], fields[cfg.solution_field]
        if cfg.deduplicate:
            if problem in seen:
                result.dropped_duplicates += 1
                continue
            seen.add(problem)
        if count_tokens and (count_tokens(problem) > cfg.max_problem_tokens
                             or count_tokens(solution) > cfg.max_solution_tokens):
            result.dropped_too_long += 1
            continue
        result.rows.append({"id": str(row.get("id", f"{where}:{i}")), "problem": problem, "solution": solution,
                            "answer": row.get("answer")})
    if not result.rows:
        raise DataError(f"data.source={cfg.source!r}: no usable rows")
    random.Random(cfg.shuffle_seed).shuffle(result.rows)
    return result
