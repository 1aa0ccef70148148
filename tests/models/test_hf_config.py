"""HF config parsing: the supported families map to the right megatron facts; the rest fail naming
the field."""

from __future__ import annotations

import pytest

from opsd_megatron.models import UnsupportedConfigError, arch_from_hf_config

BASE = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=2560,
    intermediate_size=9728,
    num_hidden_layers=36,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    rope_theta=1000000,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
    hidden_act="silu",
)


def test_qwen3_4b_facts():
    arch = arch_from_hf_config(BASE)
    assert (arch.family, arch.head_dim, arch.qk_norm, arch.qkv_bias, arch.tie_word_embeddings) == (
        "qwen3",
        128,
        True,
        False,
        True,
    )
    assert arch.padded_vocab_size(1) == 151936 and arch.padded_vocab_size(8) == 152576
    arch.check_layout(8, 4)


def test_transformers5_rope_parameters_and_llama3_scaling():
    cfg = dict(BASE, model_type="llama", rope_theta=None, tie_word_embeddings=False)
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    arch = arch_from_hf_config(cfg)
    assert arch.rope_theta == 500000.0 and arch.rope_scaling_factor == 8.0 and not arch.qk_norm


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(model_type="gpt2"), "model_type='gpt2'"),
        (dict(hidden_act="gelu"), "hidden_act='gelu'"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling.rope_type='yarn'"),
        (
            dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 2.0}),
            "rope_scaling.high_freq_factor",
        ),
        (dict(use_sliding_window=True), "use_sliding_window"),
        (dict(mlp_bias=True), "mlp_bias"),
        (dict(num_key_value_heads=5), "num_key_value_heads=5"),
        (dict(num_experts=8), "mixture-of-experts"),
    ],
)
def test_unsupported_configs_name_the_field(change, field):
    with pytest.raises(
        UnsupportedConfigError, match="cfg.json: .*" + field.replace("(", r"\(").replace("[", r"\[")
    ):
        arch_from_hf_config(dict(BASE, **change), "cfg.json")


def test_missing_field_and_bad_layout():
    cfg = dict(BASE)
    cfg.pop("hidden_size")
    with pytest.raises(UnsupportedConfigError, match="missing required field 'hidden_size'"):
        arch_from_hf_config(cfg)
    with pytest.raises(UnsupportedConfigError, match="num_key_value_heads=8"):
        arch_from_hf_config(BASE).check_layout(16, 1)
    with pytest.raises(UnsupportedConfigError, match="num_hidden_layers=36"):
        arch_from_hf_config(BASE).check_layout(1, 5)
