"""Benchmarks: JSONL files with id/problem/answer (the format of shared/data), an HF dataset (a
saved directory or a Hub name) with a field mapping, or held-out synthetic addition problems."""

from __future__ import annotations

from opsd_megatron.data.sources import DataError, read_dataset, read_rows_file, resolve
from opsd_megatron.data.synthetic import addition_problems

HELD_OUT_SEED = 987654  # synthetic eval problems come from their own stream


def _row(where: str, r, cfg) -> dict:
    """One benchmark row; the answer must be non-empty text or a number (never graded against
    "None")."""
    if isinstance(r, Exception):
        raise r
    if not isinstance(r, dict):
        raise DataError(f"{where}: not a JSON object")
    problem, answer = r.get(cfg.problem_field), r.get(cfg.answer_field)
    if not isinstance(problem, str) or not problem.strip():
        raise DataError(f"{where}: field '{cfg.problem_field}' is missing or not non-empty text")
    if (
        isinstance(answer, bool)
        or not isinstance(answer, (str, int, float))
        or not str(answer).strip()
    ):
        raise DataError(
            f"{where}: field '{cfg.answer_field}' is missing, null or empty (got {answer!r})"
        )
    return {
        "id": str(r.get("id", where)),
        "problem": problem,
        "answer": str(answer),
        "answer_type": r.get("answer_type"),
        "solution": r.get(cfg.solution_field),
    }


def _synthetic_size(spec: str) -> tuple[int, int]:
    """``synthetic:arith[:N[:DIGITS]]``: N held-out problems (200) of DIGITS-digit addition (3, the
    training task's; 4 or more is out of distribution: longer numbers, one more column)."""
    parts = spec.split(":")
    try:
        if parts[1] != "arith" or len(parts) > 4:
            raise ValueError
        n = int(parts[2]) if len(parts) > 2 else 200
        digits = int(parts[3]) if len(parts) > 3 else 3
        if n < 1 or not 1 <= digits <= 9:
            raise ValueError
    except ValueError:
        raise DataError(
            f"eval.benchmarks: {spec!r} is not synthetic:arith[:N[:DIGITS]] (N >= 1, 1-9 digits)"
        ) from None
    return n, digits


def load_benchmark(spec: str, cfg) -> tuple[str, list[dict]]:
    """(name, rows with id/problem/answer/answer_type) for one benchmark spec."""
    if spec.startswith("synthetic:arith"):
        n, digits = _synthetic_size(spec)
        rows = [
            {
                "id": r["id"],
                "problem": r["problem"],
                "answer": r["answer"],
                "solution": r["solution"],
            }
            for r in addition_problems(n, seed=HELD_OUT_SEED, digits=digits)
        ]
        return ("synthetic_arith" if digits == 3 else f"synthetic_arith_{digits}digit"), rows
    kind, where = resolve("eval.benchmarks", spec, "dataset")
    if kind == "file":
        raw, name = read_rows_file(where), where.stem
    else:
        raw = [(f"{spec} row {i}", r) for i, r in enumerate(read_dataset(where, cfg.split), 1)]
        name = spec.replace("/", "_")
    rows = [_row(at, r, cfg) for at, r in raw]
    return name, rows[: cfg.max_problems] if cfg.max_problems else rows
