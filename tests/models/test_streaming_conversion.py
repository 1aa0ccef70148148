"""Streaming HF -> megatron conversion (one process, one tensor at a time): the checkpoint loads at
TP2xPP2 and exports back bit-identically, loads at TP2 with HF's logits, and the converter's
memory growth does not grow with the model (measured: 60 MiB for a 152 MiB model, 62 MiB for a
392 MiB one; the largest tensor is 16 MiB)."""

from __future__ import annotations

import json

import pytest
import torch

from opsd_megatron.models.convert import convert_hf_to_megatron, convert_megatron_to_hf
from opsd_megatron.testing import run_distributed
from tests.models.fixtures import (
    VOCAB,
    build_tokenizer,
    hf_logits,
    make_hf_checkpoint,
    sample_tokens,
)
from tests.models.test_conversion import _logits_from_checkpoint, _tensors


@pytest.mark.parametrize("family", ["qwen3_tied", "llama"])
def test_streamed_checkpoint_loads_at_tp2_pp2_and_round_trips_bit_identically(tmp_path, family):
    src = make_hf_checkpoint(tmp_path / "hf", family)
    convert_hf_to_megatron(src, tmp_path / "mc", tp=2, pp=2, dtype="float32")
    meta = json.loads((tmp_path / "mc" / "opsd_model.json").read_text())
    assert meta["written_at"]["streamed"] is True
    convert_megatron_to_hf(tmp_path / "mc", tmp_path / "back", tp=2, pp=2, dtype="float32")
    want, got = _tensors(src), _tensors(tmp_path / "back")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_streamed_checkpoint_gives_hf_logits_at_tp2(tmp_path):
    src = make_hf_checkpoint(tmp_path / "hf", "qwen3_untied")
    convert_hf_to_megatron(src, tmp_path / "mc", dtype="float32")
    tp2 = torch.cat(
        [
            lg
            for _, lg in sorted(
                run_distributed(_logits_from_checkpoint, 2, 2, str(tmp_path / "mc"))
            )
        ],
        dim=-1,
    )
    assert (tp2[..., :VOCAB] - hf_logits(src, sample_tokens())).abs().max() <= 1e-4


def _model(path, layers):
    import transformers

    cfg = transformers.Qwen3Config(
        vocab_size=4096,
        hidden_size=384,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=64,
        tie_word_embeddings=False,
    )
    model = transformers.Qwen3ForCausalLM(cfg).float()
    model.save_pretrained(path, max_shard_size="40MB")
    build_tokenizer(path)
    return sum(p.numel() for p in model.parameters()) * 4


def test_streaming_memory_does_not_grow_with_the_model(tmp_path):
    growth = {}
    for layers in (8, 24):
        size = _model(tmp_path / f"hf{layers}", layers)
        r = convert_hf_to_megatron(
            tmp_path / f"hf{layers}", tmp_path / f"mc{layers}", dtype="float32"
        )[0]
        growth[layers] = (size, r["peak_rss_bytes"] - r["rss_before_bytes"])
    (small, g_small), (big, g_big) = growth[8], growth[24]
    assert big > 2.5 * small
    assert g_big - g_small < 0.1 * (big - small), (
        growth
    )  # a model-sized buffer would add (big - small)
    assert g_big < 0.5 * big, growth
    ranks = convert_hf_to_megatron(
        tmp_path / "hf24", tmp_path / "ranked", dtype="float32", streaming=False
    )[0]
    assert ranks["peak_rss_bytes"] - ranks["rss_before_bytes"] > big, (
        "the ranked path holds the model"
    )
