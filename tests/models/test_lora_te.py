"""LoRA on transformer-engine layers, without transformer-engine (``te_standins.py``): adapters are
sized from the weight's shard, classified row/column by ``partition_dim`` (not by class), and hooked
on the normalised input where the layer fuses its norm. Checked at TP1 and TP2 on real gloo ranks:
for every adapted layer the hooked forward equals the base forward through ``merged()`` — W + s·B·A
on the normalised input, what the merged HF export and the vLLM refit write — Tolerance 1e-5 (fp32).
Reverting either piece fails (checked): classifying by class gives the row-parallel layer a column
adapter (the kinds assertion), and hooking x instead of norm(x) makes the LN-fused layer's forward
disagree with its merge (2.6 off, at TP1 already)."""

from __future__ import annotations

import pytest
import torch

from opsd_megatron.testing import run_distributed
from tests.models.te_standins import (
    TELayerNormColumnParallelLinearStandIn,
    TELinearStandIn,
)

H, OUT, RANK, TOL = 16, 24, 4, 1e-5


def _check(tp: int, zero_centered_gamma: bool):
    from opsd_megatron.config import Layout, LoRAConfig
    from opsd_megatron.models.build import transformer_config
    from opsd_megatron.models.lora import apply_lora
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(tp, 1, seed=5)
    config = _config(transformer_config, Layout(tp=tp))
    g = torch.Generator().manual_seed(0)
    w_qkv, w_proj = torch.randn(OUT, H, generator=g), torch.randn(H, OUT, generator=g)
    layer = torch.nn.Module()
    layer.linear_qkv = TELayerNormColumnParallelLinearStandIn(
        H, OUT, config, groups, w_qkv, zero_centered_gamma=zero_centered_gamma
    )
    layer.linear_proj = TELinearStandIn(OUT, H, "row", config, groups, w_proj)
    adapted = apply_lora(
        layer, LoRAConfig(rank=RANK, alpha=8.0, target_modules=["q", "o"]), groups=groups
    )
    assert sorted(adapted) == ["linear_proj", "linear_qkv"]
    kinds = {n: layer.get_submodule(n + "_lora").row_parallel for n in adapted}
    for name in adapted:  # B is zero at init: give it values so the merge is what is checked
        b = layer.get_submodule(name + "_lora").lora_B.weight
        with torch.no_grad():
            b.copy_(
                torch.randn(b.shape, generator=torch.Generator().manual_seed(7 + groups.tp_rank))
            )
    x = torch.randn(3, 2, H, generator=torch.Generator().manual_seed(1))
    errors = {}
    with torch.no_grad():
        qkv = layer.linear_qkv
        hooked = qkv(x)[0]
        merged = layer.linear_qkv_lora.merged(qkv.weight)
        errors["qkv"] = float((hooked - qkv._project(qkv.normalised(x), merged)).abs().max())
        h_full = torch.randn(3, 2, OUT, generator=torch.Generator().manual_seed(2))
        h = h_full.chunk(tp, dim=-1)[groups.tp_rank]
        proj = layer.linear_proj
        hooked = proj(h)[0]
        merged_proj = layer.linear_proj_lora.merged(proj.weight)
        errors["proj"] = float((hooked - proj._project(h, merged_proj)).abs().max())
    return kinds, errors


def _config(transformer_config, layout):
    from opsd_megatron.models.hf_config import ArchSpec

    arch = ArchSpec(
        family="qwen3", vocab_size=32, hidden_size=H, ffn_hidden_size=OUT, num_layers=1,
        num_attention_heads=2, num_query_groups=2, head_dim=8, norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=64, tie_word_embeddings=False, qkv_bias=False, qk_norm=False,
    )  # fmt: skip
    return transformer_config(arch, layout, torch.float32, False, True)


@pytest.mark.parametrize("zero_centered_gamma", [False, True])
def test_lora_on_te_layers_equals_its_merge(zero_centered_gamma):
    results = {
        tp: run_distributed(_check, tp, tp, zero_centered_gamma, timeout=120) for tp in (1, 2)
    }
    for tp, per_rank in results.items():
        for kinds, errors in per_rank:
            assert kinds == {"linear_qkv": False, "linear_proj": True}, kinds
            assert max(errors.values()) < TOL, (tp, errors)
