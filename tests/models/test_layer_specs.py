"""Layer-spec choice (transformer-engine's only with a GPU *and* TE importable) and the weight-map
aliases for TE's fused-norm parameter names, which the TE spec's models carry (TE itself cannot be
installed without a GPU, so its spec is not built here)."""

from __future__ import annotations

import importlib.util

import torch

from opsd_megatron.models import weight_map as wm
from opsd_megatron.models.hf_config import arch_from_hf_config
from opsd_megatron.models.layer_specs import gpt_layer_spec, use_transformer_engine

ARCH = arch_from_hf_config(
    dict(
        model_type="qwen3",
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
)


def test_transformer_engine_needs_both_a_gpu_and_the_package(monkeypatch):
    real_find_spec = importlib.util.find_spec
    te_present = lambda name, *a: (
        object() if name == "transformer_engine" else real_find_spec(name, *a)
    )  # noqa: E731
    for gpu, te, want in (
        (False, False, False),
        (False, True, False),
        (True, False, False),
        (True, True, True),
    ):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        monkeypatch.setattr(
            importlib.util, "find_spec", te_present if te else lambda name, *a: None
        )
        assert use_transformer_engine() is want, (gpu, te)


def test_local_spec_has_rmsnorm_and_qk_norm():
    spec = gpt_layer_spec(ARCH, transformer_engine=False)
    attn = spec.submodules.self_attention.submodules
    assert attn.q_layernorm is not None and attn.k_layernorm is not None


def test_te_fused_norm_names_map_like_the_local_ones():
    for layer in (0, 1):
        for te, local in (
            ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
            ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
        ):
            assert wm.rule_for(f"decoder.layers.{layer}.{te}", ARCH) == wm.rule_for(
                f"decoder.layers.{layer}.{local}", ARCH
            )
