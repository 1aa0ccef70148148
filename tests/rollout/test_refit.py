"""Weight refit stream for a colocated vLLM: at TP2xPP2 the streamed HF tensors (LoRA merged or
not) loaded into an HF transformers model give the Megatron model's logits; buckets respect their
size bound (the engine itself: tests/rollout/test_vllm_engine.py)."""

from __future__ import annotations

import pytest
import torch

from opsd_megatron.testing import run_distributed
from tests.models.fixtures import VOCAB, adapted_model, make_hf_checkpoint, sample_tokens

BUCKET = 20_000  # bytes: forces many buckets on the tiny model


def _stream(tp, pp, hf_dir, merge):
    from megatron.core import parallel_state as ps

    from opsd_megatron.models.forward import forward_logits
    from opsd_megatron.rollout.refit import stream_hf_weights

    arch, model, _ = adapted_model(tp, pp, hf_dir)
    logits = forward_logits(model, sample_tokens())
    buckets = list(stream_hf_weights(model, arch, bucket_bytes=BUCKET, merge_lora=merge))
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in buckets]
    weights = {n: t for b in buckets for n, t in b}
    rank = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank())
    return rank, logits, weights, sizes, [len(b) for b in buckets]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf") / "m", "qwen3_untied")


@pytest.mark.parametrize("merge", [True, False], ids=["lora-merged", "base-only"])
def test_streamed_weights_reproduce_megatron_logits_in_hf(hf_dir, merge):
    from transformers import AutoConfig, AutoModelForCausalLM

    results = run_distributed(_stream, 4, 2, 2, hf_dir, merge)
    last_stage = sorted((r for r in results if r[1] is not None), key=lambda r: r[0][1])
    megatron = torch.cat([r[1] for r in last_stage], dim=-1)[..., :VOCAB]
    weights = results[0][2]
    for r in results[1:]:
        assert r[2].keys() == weights.keys() and all(
            torch.equal(r[2][k], weights[k]) for k in weights
        ), "every rank receives the same full weights"
    for sizes, counts in ((r[3], r[4]) for r in results):
        assert len(sizes) > 3
        assert all(s <= BUCKET or c == 1 for s, c in zip(sizes, counts)), (
            "a bucket exceeds its bound"
        )
    hf = AutoModelForCausalLM.from_config(
        AutoConfig.from_pretrained(hf_dir), torch_dtype=torch.float32
    ).eval()
    missing, unexpected = hf.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} - set(weights)
    with torch.no_grad():
        got = hf(sample_tokens()).logits
    diff = (got - megatron).abs().max().item()
    if merge:
        assert diff <= 1e-4, diff
    else:
        assert diff > 1e-3, "base-only weights must differ from the adapted model"
