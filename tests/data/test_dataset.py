"""Loading problems: shared JSONL files, field mapping, malformed rows, dedup, length filter,
shuffle; the synthetic task's worked solutions are right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opsd_megatron.config import DataConfig
from opsd_megatron.data.dataset import DataError, load_problems
from opsd_megatron.data.synthetic import addition_problems
from opsd_megatron.errors import UserError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


@pytest.mark.skipif(
    not (SHARED / "math_train_sample.jsonl").exists(), reason="shared data not present"
)
def test_loads_math_train_sample_with_field_mapping():
    cfg = DataConfig(source=str(SHARED / "math_train_sample.jsonl"))
    ps = load_problems(cfg)
    assert len(ps.rows) + ps.dropped_duplicates == 2000 and ps.skipped_malformed == 0
    again = load_problems(cfg)
    assert [r["id"] for r in ps.rows] == [r["id"] for r in again.rows], "seeded shuffle"
    other = load_problems(DataConfig(source=cfg.source, shuffle_seed=1))
    assert [r["id"] for r in ps.rows] != [r["id"] for r in other.rows]
    gsm = load_problems(
        DataConfig(
            source=str(SHARED / "gsm8k_train_sample.jsonl"),
            problem_field="problem",
            solution_field="solution",
        )
    )
    assert len(gsm.rows) > 900


def _write(path: Path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_malformed_rows_error_or_skip(tmp_path):
    f = _write(
        tmp_path / "d.jsonl",
        [{"q": "1+1", "a": "2"}, {"q": "2+2"}, "{not json", [1, 2], {"q": "1+1", "a": "x"}],
    )
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'a' is missing"):
        load_problems(DataConfig(source=str(f), problem_field="q", solution_field="a"))
    ps = load_problems(
        DataConfig(source=str(f), problem_field="q", solution_field="a", skip_malformed=True)
    )
    assert (len(ps.rows), ps.skipped_malformed, ps.dropped_duplicates) == (1, 3, 1)
    bad_json = _write(tmp_path / "e.jsonl", [{"q": "a", "a": "b"}, {"q": "c", "a": "d"}, "{bad"])
    with pytest.raises(DataError, match=r"e.jsonl:3: not valid JSON"):
        load_problems(DataConfig(source=str(bad_json), problem_field="q", solution_field="a"))


def test_skip_first_holds_out_the_first_rows_before_dedup_and_filters(tmp_path):
    """``data.skip_first=N`` drops the source's first N rows as written (across comma-separated
    files), before de-duplication, so the held-out problems are exactly the ones
    ``eval.max_problems=N`` reads from the same file; a malformed row among them is not read."""
    a = _write(tmp_path / "a.jsonl", [{"q": "p1", "a": "1"}, "{bad", {"q": "p2", "a": "2"}])
    b = _write(tmp_path / "b.jsonl", [{"q": "p3", "a": "3"}, {"q": "p1", "a": "1"}])
    cfg = dict(source=f"{a},{b}", problem_field="q", solution_field="a", shuffle_seed=0)
    ps = load_problems(DataConfig(**cfg, skip_first=2))
    assert sorted(r["problem"] for r in ps.rows) == ["p1", "p2", "p3"]
    assert (ps.skipped_malformed, ps.dropped_duplicates) == (0, 0)
    ps = load_problems(DataConfig(**cfg, skip_first=3))
    assert sorted(r["problem"] for r in ps.rows) == ["p1", "p3"]
    with pytest.raises(DataError, match=r"data.skip_first=5 leaves no rows .*\(5 rows\)"):
        load_problems(DataConfig(**cfg, skip_first=5))
    with pytest.raises(UserError, match="data.skip_first must be >= 0"):
        DataConfig(**cfg, skip_first=-1)


ROWS = [
    {"q": "1+1", "a": "2", "ans": "2"},
    {"q": "2+3", "a": "5", "ans": "5"},
    {"q": "", "a": "x", "ans": "x"},  # empty problem
    {"q": "4+4", "a": None, "ans": None},  # null solution / answer
    {"q": "5+1", "a": "6", "ans": "6"},
]


@pytest.mark.parametrize("form", ["parquet", "saved_dataset", "dataset_dict", "data_files_dir"])
def test_parquet_and_hf_dataset_bad_rows_name_the_row(tmp_path, form):
    import datasets

    ds = datasets.Dataset.from_list(ROWS)
    if form == "parquet":
        src = tmp_path / "train.parquet"
        ds.to_parquet(str(src))
    elif form == "data_files_dir":
        src = tmp_path / "files"
        src.mkdir()
        ds.to_parquet(str(src / "train.parquet"))
    else:
        src = tmp_path / "saved"
        (datasets.DatasetDict(train=ds) if form == "dataset_dict" else ds).save_to_disk(str(src))
    cfg = dict(source=str(src), problem_field="q", solution_field="a")
    with pytest.raises(DataError, match=r"row 3: field 'q' is missing or not non-empty text"):
        load_problems(DataConfig(**cfg))
    ps = load_problems(DataConfig(**cfg, skip_malformed=True))
    assert sorted(r["problem"] for r in ps.rows) == ["1+1", "2+3", "5+1"]
    assert ps.skipped_malformed == 2
    if form == "dataset_dict":
        with pytest.raises(DataError, match=r"no split 'test' \(it has \['train'\]\)"):
            load_problems(DataConfig(**cfg, split="test"))
    # the same source as a benchmark: rows 1-2 load, the empty problem is named
    from opsd_megatron.config import EvalConfig
    from opsd_megatron.data.benchmarks import load_benchmark

    bench = EvalConfig(problem_field="q", answer_field="ans", split="train")
    with pytest.raises(DataError, match=r"row 3: field 'q'"):
        load_benchmark(str(src), bench)
    good = datasets.Dataset.from_list(ROWS[:2])
    good.save_to_disk(str(tmp_path / "bench"))
    name, rows = load_benchmark(str(tmp_path / "bench"), bench)
    assert [(r["problem"], r["answer"]) for r in rows] == [("1+1", "2"), ("2+3", "5")]
    nulls = datasets.Dataset.from_list([ROWS[0], ROWS[3]])
    nulls.save_to_disk(str(tmp_path / "nulls"))
    with pytest.raises(DataError, match=r"row 2: field 'ans' is missing, null or empty"):
        load_benchmark(str(tmp_path / "nulls"), bench)


def test_length_filter_and_missing_file(tmp_path):
    f = _write(
        tmp_path / "d.jsonl",
        [{"problem": "short", "solution": "s"}, {"problem": "x" * 50, "solution": "s"}],
    )
    ps = load_problems(DataConfig(source=str(f), max_problem_tokens=10), count_tokens=len)
    assert len(ps.rows) == 1 and ps.dropped_too_long == 1
    with pytest.raises(UserError, match="nope.jsonl'?: no such file or directory"):
        load_problems(DataConfig(source=str(tmp_path / "nope.jsonl")))


def test_synthetic_addition_is_deterministic_and_correct():
    a, b = addition_problems(50, seed=3), addition_problems(50, seed=3)
    assert a == b and len({p["problem"] for p in a}) == 50
    for p in a:
        x, y = map(int, p["problem"].split("+"))
        assert p["solution"].endswith(f"\\boxed{{{x + y}}}") and p["answer"] == str(x + y)


def test_reference_free_rows_need_an_answer_not_a_solution(tmp_path):
    f = tmp_path / "answers.jsonl"
    f.write_text(
        json.dumps({"problem": "1+1", "answer": "2"}) + "\n" + json.dumps({"problem": "2+2"}) + "\n"
    )
    with pytest.raises(DataError, match="field 'solution' is missing"):
        load_problems(DataConfig(source=str(f)))  # with a reference teacher it is needed
    with pytest.raises(DataError, match=r"answers.jsonl:2: teacher.context=peer_success grades"):
        load_problems(DataConfig(source=str(f)), solution_required=False)
    f.write_text(json.dumps({"problem": "1+1", "answer": "2"}) + "\n")
    (row,) = load_problems(DataConfig(source=str(f)), solution_required=False).rows
    assert row["solution"] is None and row["answer"] == "2"


def test_synthetic_benchmark_sizes_and_an_out_of_distribution_split():
    from opsd_megatron.config import EvalConfig
    from opsd_megatron.data.benchmarks import load_benchmark

    name, rows = load_benchmark("synthetic:arith:5", EvalConfig())
    assert name == "synthetic_arith" and len(rows) == 5
    assert all(len(r["problem"].split("+")[0]) == 3 for r in rows)
    name, rows = load_benchmark("synthetic:arith:7:4", EvalConfig())
    assert name == "synthetic_arith_4digit" and len(rows) == 7
    for r in rows:  # four-digit operands, one more worked line, the right answer
        a, b = r["problem"].split("+")
        assert len(a) == len(b) == 4 and int(r["answer"]) == int(a) + int(b)
        assert r["solution"].count("\n") == 4  # four column lines, then the boxed answer
    for bad in ("synthetic:arith:x", "synthetic:arith:5:0", "synthetic:arith:1:2:3"):
        with pytest.raises(DataError, match="synthetic:arith\\[:N\\[:DIGITS\\]\\]"):
            load_benchmark(bad, EvalConfig())


def test_prepare_dataset_tool_writes_answers_only_rows(tmp_path, capsys):
    """tools/prepare_dataset.py: the rows a run reads, here without their solutions (the data of
    reference-free OPSD); an existing file is kept, a bad source is named."""
    import importlib.util

    from opsd_megatron.config import DataConfig
    from opsd_megatron.data.dataset import load_problems

    spec = importlib.util.spec_from_file_location(
        "prepare_dataset", Path(__file__).resolve().parents[2] / "tools" / "prepare_dataset.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / "answers.jsonl"
    argv = ["synthetic:arith", "--out", str(out), "--drop-solutions", "data.num_synthetic=50"]
    assert tool.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 50 and all(set(r) == {"id", "problem", "answer"} for r in rows)
    full = load_problems(DataConfig(source="synthetic:arith", num_synthetic=50)).rows
    assert {r["problem"]: r["answer"] for r in rows} == {r["problem"]: r["answer"] for r in full}
    back = load_problems(DataConfig(source=str(out)), solution_required=False).rows
    assert len(back) == 50 and all(r["solution"] is None for r in back)
    assert tool.main(argv) == 2 and "exists" in capsys.readouterr().err
    assert tool.main([str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err
