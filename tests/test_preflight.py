"""Fail fast: every input error the issue's probes found is one line, ``opsd-train: error: <where>:
<what>`` (exit 2), raised in the launching process before any rank starts (so the output directory
is never created); Hub names fail in seconds without a network; ``--debug`` adds the traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opsd_megatron.eval.cli import main as eval_main
from opsd_megatron.train.cli import main as train_main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "recipes" / "tiny_cpu.yaml")


def _one_line(capsys, prog="opsd-train"):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: "), err
    return err[0]


def _data(tmp_path, name, content: bytes):
    path = tmp_path / name
    path.write_bytes(content)
    return path


GOOD = b'{"problem": "1+1", "solution": "2"}\n'
DATA_PROBES = {  # file name, bytes, what the one line must say
    "malformed": ("d.jsonl", GOOD + b"\n" + b'{"problem": "2+2", \n', ":3: not valid JSON"),
    "no_solution": ("d.jsonl", GOOD + b'{"problem": "2+2"}\n', ":2: field 'solution' is missing"),
    "empty_solution": (
        "d.jsonl",
        GOOD + b'{"problem": "2+2", "solution": "  "}\n',
        ":2: field 'solution'",
    ),
    "empty_file": ("d.jsonl", b"", "no rows (the file is empty)"),
    "not_utf8": (
        "d.jsonl",
        GOOD + b'{"problem": "caf\xe9", "solution": "x"}\n',
        ":2: not UTF-8 text",
    ),
    "json_not_jsonl": ("d.json", b"[]", "unsupported data file type '.json'"),
    "not_object": ("d.jsonl", GOOD + b"[1, 2]\n", ":2: not a JSON object"),
}


@pytest.mark.parametrize("probe", sorted(DATA_PROBES))
def test_bad_data_is_one_line_naming_file_and_line(probe, tmp_path, capsys):
    name, content, message = DATA_PROBES[probe]
    path = _data(tmp_path, name, content)
    out = tmp_path / "out"
    assert train_main([TINY, f"data.source={path}", f"trainer.output_dir={out}"]) == 2
    line = _one_line(capsys)
    assert str(path) in line and message in line, line
    assert not out.exists(), "nothing may start (or write) before the input is validated"


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "data.source=data/missing.jsonl",
            "data.source='data/missing.jsonl': no such file or directory",
        ),
        (
            "model.tokenizer=/no/such/tokenizer",
            "model.tokenizer='/no/such/tokenizer': no such file or directory",
        ),
        (
            "model.tokenizer=no_such_org/no_such_tokenizer",
            "not in the local Hugging Face cache and HF_HUB_OFFLINE",
        ),
        (
            "data.source=no_such_org/no_such_dataset",
            "not in the local Hugging Face cache and HF_HUB_OFFLINE",
        ),
        (
            "model.megatron_dir=/no/such/ckpt",
            "model.megatron_dir='/no/such/ckpt': no such directory",
        ),
    ],
)
def test_bad_paths_fail_at_once_even_with_dry_run(override, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    extra = ["model.architecture=null"] if "megatron_dir" in override else []
    assert (
        train_main([TINY, override, *extra, f"trainer.output_dir={tmp_path / 'out'}", "--dry-run"])
        == 2
    )
    assert message in _one_line(capsys)


def test_a_hub_name_without_a_network_fails_naming_it(capsys, monkeypatch, tmp_path):
    """Online mode with no route to the Hub (as on these machines and many clusters): one line
    that names the key and suggests a local directory (the lookup is bounded by HUB_TIMEOUT_S)."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert train_main([TINY, "model.tokenizer=no_such_org/tok", "--dry-run"]) == 2
    line = _one_line(capsys)
    assert "model.tokenizer='no_such_org/tok'" in line and "local directory" in line, line


def test_config_errors_name_the_recipe_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"defaults_from: {TINY}\ntrainer:\n  max_steps: 0\n")
    assert train_main([str(recipe), "--dry-run"]) == 2
    assert f"{recipe}:3: trainer.max_steps must be >= 1, got 0" in _one_line(capsys)


def test_debug_shows_the_traceback(tmp_path, capsys):
    path = _data(tmp_path, "d.jsonl", b"{bad\n")
    assert train_main([TINY, f"data.source={path}", "--debug", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("opsd-train: error: ")


def test_a_user_error_found_on_the_ranks_is_one_line_too(tmp_path, capsys):
    """Length filters need the tokenizer, so they run on the ranks: the rank's DataError still
    reaches the user as one line, not as per-rank tracebacks."""
    assert (
        train_main(
            [
                TINY,
                "data.max_problem_tokens=1",
                "parallel.tensor_model_parallel_size=1",
                f"trainer.output_dir={tmp_path / 'out'}",
                "logging.progress_bar=false",
            ]
        )
        == 2
    )
    assert "no usable rows" in _one_line(capsys)


def _bench(tmp_path, name, rows: list):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "no such file or directory"),
        ("null_answer", ":2: field 'answer' is missing, null or empty (got None)"),
        ("no_problem", ":1: field 'problem' is missing"),
    ],
)
def test_opsd_eval_checks_benchmarks_first(case, message, tmp_path, capsys):
    path = {
        "missing": tmp_path / "nope.jsonl",
        "null_answer": _bench(
            tmp_path,
            "null.jsonl",
            [{"problem": "1+1", "answer": 2}, {"problem": "2+2", "answer": None}],
        ),
        "no_problem": _bench(tmp_path, "noproblem.jsonl", [{"question": "1+1", "answer": "2"}]),
    }[case]
    assert (
        eval_main([TINY, f"eval.benchmarks=[{path}]", f"trainer.output_dir={tmp_path / 'out'}"])
        == 2
    )
    line = _one_line(capsys, "opsd-eval")
    assert str(path) in line and message in line, line


def test_opsd_eval_refuses_a_checkpoint_that_is_not_one(tmp_path, capsys):
    assert (
        eval_main([TINY, "eval.benchmarks=[synthetic:arith:10]", "--checkpoint", str(tmp_path)])
        == 2
    )
    assert "not a training checkpoint" in _one_line(capsys, "opsd-eval")
