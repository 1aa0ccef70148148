"""Load (problem, reference solution) pairs: the synthetic task, local JSONL/Parquet files, or an HF
dataset name, with field mapping, length filtering, deduplication and a seeded shuffle.

A malformed row (not UTF-8, not JSON, not a mapping, a missing or empty field) raises an error
naming the file and its 1-based line, or, with ``skip_malformed``, is skipped and counted. Local
paths are read locally, never looked up on the Hub (``data/sources.py``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from opsd_megatron.data.grading import reference_answer
from opsd_megatron.data.sources import DataError, read_dataset, read_rows_file, resolve
from opsd_megatron.data.synthetic import addition_problems

__all__ = ["DataError", "ProblemSet", "load_problems"]


@dataclass
class ProblemSet:
    rows: list[dict]
    skipped_malformed: int = 0
    dropped_too_long: int = 0
    dropped_duplicates: int = 0
    sources: list[str] = field(default_factory=list)


def _raw_rows(cfg) -> list[tuple[str, object]]:
    if cfg.source.startswith("synthetic:"):
        if cfg.source != "synthetic:arith":
            raise DataError(
                f"data.source={cfg.source!r}: the only synthetic task is synthetic:arith"
            )
        rows = addition_problems(cfg.num_synthetic, seed=cfg.shuffle_seed)
        out = [(f"synthetic:arith row {i}", r) for i, r in enumerate(rows, 1)]
    else:
        out = _source_rows(cfg)
    if cfg.skip_first >= len(out):
        raise DataError(
            f"data.skip_first={cfg.skip_first} leaves no rows of data.source={cfg.source!r} "
            f"({len(out)} rows)"
        )
    return out[cfg.skip_first :]


def _source_rows(cfg) -> list[tuple[str, object]]:
    """Every row of the comma-separated files / datasets of ``data.source``, in order."""
    out = []
    for spec in (s.strip() for s in cfg.source.split(",")):
        kind, where = resolve("data.source", spec, "dataset")
        if kind == "file":
            out += read_rows_file(where)
            continue
        ds = read_dataset(where, cfg.split)  # a saved dataset directory or a Hub name
        out += [(f"{spec} row {i}", r) for i, r in enumerate(ds, 1)]
    return out


def load_problems(cfg, count_tokens=None, solution_required: bool = True) -> ProblemSet:
    """``cfg``: a DataConfig. ``count_tokens(text) -> int`` enables the length filters.
    ``solution_required=False`` (reference-free OPSD): rows need a problem and an answer only."""
    result = ProblemSet(rows=[])
    seen = set()
    for where, row in _raw_rows(cfg):
        try:
            if isinstance(row, Exception):
                raise row
            if not isinstance(row, dict):
                raise DataError(f"{where}: not a JSON object")
            fields = {}
            for key in (cfg.problem_field, cfg.solution_field):
                value = row.get(key)
                if key == cfg.solution_field and not solution_required and value in (None, ""):
                    value = None
                elif not isinstance(value, str) or not value.strip():
                    raise DataError(f"{where}: field '{key}' is missing or not non-empty text")
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
        if count_tokens and (
            count_tokens(problem) > cfg.max_problem_tokens
            or count_tokens(solution or "") > cfg.max_solution_tokens
        ):
            result.dropped_too_long += 1
            continue
        answer = row.get("answer")
        answer = str(answer) if answer not in (None, "") else reference_answer(solution or "")
        if answer is None and (cfg.teacher_uses_answer or not solution_required):
            why = (
                "data.teacher_template uses {answer}"
                if solution_required
                else "teacher.context=peer_success grades rollouts against it"
            )
            err = DataError(
                f"{where}: {why}, but the row has no 'answer' and "
                f"its solution no \\boxed{{}} or '#### N' line"
            )
            if not cfg.skip_malformed:
                raise err
            result.skipped_malformed += 1
            continue
        result.rows.append(
            {
                "id": str(row.get("id", where)),
                "problem": problem,
                "solution": solution,
                "answer": answer,
            }
        )
    if not result.rows:
        raise DataError(f"data.source={cfg.source!r}: no usable rows")
    random.Random(cfg.shuffle_seed).shuffle(result.rows)
    return result
