"""What a user sees: ``opsd-train`` prints no third-party warning from the known list
(platform/known_warnings.py, each with why) and names its lines after the run; the full config
goes to OUT/config.yaml and is printed only with ``--verbose``; the tests themselves still see
those warnings (the filter is installed by the command lines only)."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

from opsd_megatron.platform import known_warnings

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_cpu.yaml"
SHORT = ["trainer.max_steps=1", "logging.progress_bar=false", "logging.tensorboard=false"]


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opsd_megatron.train.cli", str(RECIPE), *SHORT,
         f"trainer.output_dir={out}", *extra],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip


def test_a_run_prints_no_known_warning_and_names_its_lines(tmp_path):
    res = _train(tmp_path / "run", "algorithm=sft", "logging.name=base")
    assert res.returncode == 0, res.stderr[-3000:]
    text = res.stdout + res.stderr
    shown = [m for _, m, _ in known_warnings.KNOWN if m in text]
    assert not shown, shown
    assert "[base] layout:" in text and "[base] done:" in text and "[opsd]" not in text
    assert "loss:\n" not in res.stdout  # the config is not printed without --verbose
    assert (tmp_path / "run" / "config.yaml").read_text().startswith("algorithm: sft")


def test_verbose_prints_the_config_and_dry_run_stops(tmp_path):
    res = _train(tmp_path / "run", "--dry-run", "--verbose")
    assert res.returncode == 0 and "loss:\n" in res.stdout and "[opsd] layout:" in res.stdout


def test_the_filter_is_scoped_and_tests_see_the_warnings():
    def fire():
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("default")
            warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
            return len(seen)

    assert fire() == 1
    with known_warnings.silenced():
        with warnings.catch_warnings(record=True) as seen:
            warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
            warnings.warn("something new", UserWarning)
        assert [str(w.message) for w in seen] == ["something new"]
    assert (
        "PYTHONWARNINGS" not in __import__("os").environ
        or "Apex" not in __import__("os").environ["PYTHONWARNINGS"]
    )
