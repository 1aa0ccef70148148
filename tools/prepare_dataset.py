#!/usr/bin/env python3
"""Write a training set as JSONL (id, problem, solution, answer), read the way a run reads it:
any ``data.source`` (JSONL/parquet files, a saved HF dataset, ``synthetic:arith``) with its field
mapping, de-duplicated, malformed rows named. ``--drop-solutions`` keeps problems and answers only —
the data reference-free OPSD (``teacher.context=peer_success``) trains on.

Example (the demo's training problems without their worked solutions):
    python tools/prepare_dataset.py synthetic:arith --out runs/demo_variants/answers_only.jsonl \\
        --drop-solutions data.num_synthetic=4000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from opsd_megatron.config import ConfigError, DataConfig, load_structured
from opsd_megatron.data.dataset import load_problems
from opsd_megatron.errors import UserError


def prepare(source: str, out: Path, drop_solutions: bool, overrides: list[str]) -> int:
    """Write the rows to ``out`` (atomically); returns how many."""
    cfg = load_structured(
        DataConfig, None, [f"source={source}"] + [_data_key(o) for o in overrides]
    )
    rows = load_problems(cfg).rows
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w") as f:
        for row in rows:
            keep = {k: v for k, v in row.items() if not (drop_solutions and k == "solution")}
            f.write(json.dumps(keep) + "\n")
    os.replace(tmp, out)
    return len(rows)


def _data_key(override: str) -> str:
    key, sep, value = override.partition("=")
    if not sep or not key.startswith("data."):
        raise ConfigError(f"override {override!r} must be data.KEY=VALUE")
    return f"{key[len('data.') :]}={value}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="prepare_dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "source", help="a data.source: file path(s), a saved HF dataset, synthetic:arith"
    )
    p.add_argument("--out", required=True, type=Path, help="the JSONL file to write")
    p.add_argument("--drop-solutions", action="store_true", help="write problems and answers only")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.add_argument("overrides", nargs="*", help="data.KEY=VALUE, e.g. data.problem_field=question")
    args = p.parse_intermixed_args(argv)
    if args.out.exists() and not args.force:
        print(f"error: {args.out} exists (--force replaces it)", file=sys.stderr)
        return 2
    try:
        n = prepare(args.source, args.out, args.drop_solutions, args.overrides)
    except (UserError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {n} rows to {args.out}" + (" (no solutions)" if args.drop_solutions else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
