"""The step's phase timers (``train/metrics.py::phase_times``) and their progress line
(``logging.phase_times``); a real run's timers are checked in test_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from opsd_megatron.train.metrics import phase_line, phase_times

ROOT = Path(__file__).resolve().parents[2]


class _Sampler:
    last_phase_s = {"prefill": 0.5, "decode": 2.0}


class _VLLM:
    last_refit_s = 0.25


def test_phase_times_from_the_phases_end_times():
    got = phase_times([10.0, 13.0, 14.5, 19.0, 19.25], _Sampler())
    assert got == {
        "time/rollout": 3.0,
        "time/score": 1.5,
        "time/student": 4.5,
        "time/optimizer": 0.25,
        "time/step": 9.25,
        "time/prefill": 0.5,
        "time/decode": 2.0,
    }
    assert phase_times([0.0, 1.0, 2.0, 3.0, 4.0], _VLLM())["time/refit"] == 0.25
    assert "time/prefill" not in phase_times([0.0, 1.0, 2.0, 3.0, 4.0], object())


def test_the_progress_line_names_each_phase_and_the_time_per_token():
    times = phase_times([10.0, 13.0, 14.5, 19.0, 19.25], _Sampler())
    metrics = {"generated_tokens": 1850.0, **times}
    line = phase_line(metrics)
    assert line == (
        "rollout 3.0s (prefill 0.5 decode 2.0) score 1.5s student 4.5s optimizer 0.2s = 9.2s, "
        "5.0 ms/token"
    )
    assert phase_line({"reference_tokens": 500.0, "time/step": 1.0}).endswith("2.0 ms/token")


@pytest.mark.parametrize("on", [True, False])
def test_the_progress_line_carries_the_phases_on_request(tmp_path, on, capsys):
    from opsd_megatron.config import load_config
    from opsd_megatron.train.metrics import MetricsLogger

    cfg = load_config(
        str(ROOT / "recipes" / "tiny_cpu.yaml"),
        [f"trainer.output_dir={tmp_path}", f"logging.phase_times={str(on).lower()}",
         "logging.tensorboard=false"],
    )  # fmt: skip
    log = MetricsLogger(cfg, True, 1, 0)
    times = phase_times([0.0, 1.0, 1.5, 2.5, 2.6], _Sampler())
    log.log({"step": 1, "loss": 0.5, "lr": 1e-3, "generated_tokens": 100.0,
             "response_length": 25.0, **times})  # fmt: skip
    log.close()
    out = capsys.readouterr().out
    assert ("rollout 1.0s (prefill 0.5 decode 2.0)" in out) == on, out
    assert "= 2.6s, 26.0 ms/token" in out or not on
