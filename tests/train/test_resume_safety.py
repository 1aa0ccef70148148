"""Resume checks what it resumes: another run's checkpoint is refused before anything is built or
rewritten, a finished run rewrites nothing, a fresh start keeps the old files, and a damaged newest
checkpoint is reported and skipped for the previous one, landing on an uninterrupted run's
metrics."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
import subprocess
import sys

import pytest

from opsd_megatron.config import load_config
from opsd_megatron.train.checkpointing import latest_checkpoint, problems_with
from opsd_megatron.train.cli import main
from opsd_megatron.train.manifest import describe, read_manifest, write_manifest
from tests.train.tiny import RECIPE, ROOT, metrics, overrides

TIMING = {"tokens_per_s", "peak_memory_gib"}  # and every time/<phase>
STEPS = 3


def _ov(out, steps=STEPS, extra=()):
    return overrides(out, tp=2, steps=steps, extra=("checkpoint.keep_last=3", *extra))


def _strip(rows):
    return [{k: v for k, v in r.items() if not _timing(k)} for r in rows]


def _timing(key: str) -> bool:
    return key in TIMING or key.startswith("time/")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """An uninterrupted 3-step run, a checkpoint after every step."""
    out = tmp_path_factory.mktemp("straight") / "run"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "opsd_megatron.train.cli",
            RECIPE,
            *_ov(out),
            "logging.tensorboard=true",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return out


def test_tensorboard_holds_the_logged_scalars(straight):
    """Read the event files back with TensorBoard's own reader: every step's loss, grad norm and
    LR, equal to metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(straight / "tensorboard"))
    events.Reload()
    rows = metrics(straight)
    # lr is the rate each step used: 0.05 * cosine over 3 steps without warmup (tiny.overrides)
    assert [r["lr"] for r in rows] == pytest.approx(
        [0.05 * 0.5 * (1 + math.cos(math.pi * s / STEPS)) for s in range(STEPS)], rel=1e-12
    )
    for key in ("loss", "grad_norm", "lr"):
        got = [(e.step, e.value) for e in events.Scalars(f"train/{key}")]
        assert [s for s, _ in got] == [r["step"] for r in rows], key
        assert all(
            abs(v - r[key]) <= 1e-6 * max(1.0, abs(r[key])) for (_, v), r in zip(got, rows)
        ), (key, got)


def _snapshot(out):
    return {
        p.name: p.read_bytes()
        for p in (out / "config.yaml", out / "summary.json", out / "metrics.jsonl")
    }


@pytest.mark.parametrize(
    "change", ["loss.beta=0.1", "lora.rank=4", "data.num_synthetic=64", "trainer.seed=7"]
)
def test_another_runs_checkpoint_is_refused_in_one_line_before_anything_is_written(
    straight, change, capsys
):
    before = _snapshot(straight)
    code = main([RECIPE, *_ov(straight, steps=STEPS + 2, extra=(change,))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    key = change.split("=")[0]
    assert (
        err.startswith("opsd-train: error: ")
        and f"{key}:" in err
        and "checkpoint.resume=force" in err
    ), err
    assert _snapshot(straight) == before and not (straight / "previous").exists()


def test_layout_changes_are_allowed_and_a_finished_run_rewrites_nothing(straight, capsys):
    before = _snapshot(straight)
    code = main(
        [RECIPE, *overrides(straight, tp=1, steps=STEPS, extra=("checkpoint.keep_last=3",))]
    )
    out = capsys.readouterr()
    assert code == 0 and f"finished at step {STEPS}" in out.out, out
    assert _snapshot(straight) == before


def test_dry_run_reports_the_resume_decision(straight, capsys):
    assert main([RECIPE, *_ov(straight, steps=STEPS + 1), "--dry-run"]) == 0
    assert (
        f"will resume from {straight / 'checkpoints' / 'step_000003'} (step 3)"
        in capsys.readouterr().out
    )


def _damage(ckpt, how):
    files = sorted(p for p in (ckpt / "model").iterdir() if p.suffix == ".distcp")
    if how == "flip":  # same size, different bytes: only the checksum sees it
        data = bytearray(files[0].read_bytes())
        data[len(data) // 2] ^= 0xFF
        files[0].write_bytes(bytes(data))
    elif how == "truncate":
        files[-1].write_bytes(files[-1].read_bytes()[:100])
    elif how == "delete":
        files[0].unlink()
    elif how == "empty_state":
        (ckpt / "trainer_state.json").write_text("")
    elif how == "no_manifest":
        (ckpt / "manifest.json").unlink()
    elif how == "optimizer_gone":
        shutil.rmtree(ckpt / "optimizer")


@pytest.mark.parametrize(
    "how", ["flip", "truncate", "delete", "empty_state", "no_manifest", "optimizer_gone"]
)
def test_every_kind_of_damage_is_detected(straight, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    newest = run / "checkpoints" / "step_000003"
    assert problems_with(newest) == []
    _damage(newest, how)
    problems = problems_with(newest)
    assert problems and str(newest) in problems[0], problems
    cfg = load_config(RECIPE, _ov(run))
    assert latest_checkpoint(cfg, checksums=True) == run / "checkpoints" / "step_000002"


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_resume_skips_a_damaged_newest_checkpoint_and_matches_the_uninterrupted_run(
    straight, tmp_path, how
):
    """Drop step 3 (as if the run stopped after step 2), damage step 2: resume must land on step 1
    (saying why), recompute steps 2-3 and produce the uninterrupted run's metrics exactly."""
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    shutil.rmtree(run / "checkpoints" / "step_000003")
    _damage(run / "checkpoints" / "step_000002", how)
    res = subprocess.run(
        [sys.executable, "-m", "opsd_megatron.train.cli", RECIPE, *_ov(run)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"skipping checkpoint {run / 'checkpoints' / 'step_000002'}" in res.stdout
    assert "resumed from" in res.stdout and "at step 1" in res.stdout
    assert json.loads((run / "summary.json").read_text())["start_step"] == 1
    assert _strip(metrics(run)) == _strip(metrics(straight))
    assert problems_with(run / "checkpoints" / "step_000002") == []  # rewritten by the rerun


def test_a_finished_run_whose_final_checkpoint_is_damaged_resumes_before_it(straight, tmp_path):
    """Rerunning a finished run hashes its final checkpoint before saying "nothing to do": a
    flipped byte (same size; only the checksum sees it) sends the run back to step 2."""
    from opsd_megatron.train.resume import plan_resume

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    assert plan_resume(load_config(RECIPE, _ov(run))).action == "finished"
    _damage(run / "checkpoints" / "step_000003", "flip")
    plan = plan_resume(load_config(RECIPE, _ov(run)))
    assert (plan.action, plan.checkpoint) == ("resume", run / "checkpoints" / "step_000002")
    assert any(
        f"skipping checkpoint {run / 'checkpoints' / 'step_000003'}" in n for n in plan.notes
    )


def test_resume_false_starts_fresh_and_keeps_the_old_files(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    before = _snapshot(run)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "opsd_megatron.train.cli",
            RECIPE,
            *_ov(run, steps=1, extra=("checkpoint.resume=false", "loss.beta=0.2")),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    (previous,) = (run / "previous").iterdir()
    assert {n: (previous / n).read_bytes() for n in before} == before
    assert sorted(p.name for p in (previous / "checkpoints").iterdir()) == [
        "step_000001",
        "step_000002",
        "step_000003",
    ]
    assert [r["step"] for r in metrics(run)] == [1]
    assert json.loads((run / "summary.json").read_text())["start_step"] == 0


class _Planted:
    """What a malicious checkpoint's .metadata can hold: unpickling it runs a command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_verify_checkpoint_passes_real_ones_and_refuses_a_planted_pickle(straight, tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "verify_checkpoint.py")]
    res = subprocess.run(
        [*tool, str(straight), "--safe"], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stdout.count("OK  ") == STEPS, res.stdout + res.stderr
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    ckpt, marker = run / "checkpoints" / "step_000003", tmp_path / "pwned"
    (ckpt / "model" / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    recorded = read_manifest(
        ckpt
    )  # the attacker rewrites the manifest too: it proves integrity, not trust
    recorded["model/.metadata"] = describe(ckpt, ["model/.metadata"])["model/.metadata"]
    write_manifest(ckpt, recorded)
    plain = subprocess.run([*tool, str(ckpt)], capture_output=True, text=True, timeout=120)
    assert plain.returncode == 0, plain.stdout
    safe = subprocess.run([*tool, str(ckpt), "--safe"], capture_output=True, text=True, timeout=120)
    assert safe.returncode == 1 and "refers to posix.system" in safe.stdout, (
        safe.stdout + safe.stderr
    )
    assert not marker.exists()
