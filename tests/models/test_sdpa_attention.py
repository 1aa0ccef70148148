"""``layer_specs.sdpa_core_attention``: megatron's local ``DotProductAttention`` computing with
torch's ``scaled_dot_product_attention`` gives megatron's own outputs and input gradients, in
every way the trainer, the teacher and the samplers call it: causal without a mask (training,
prefill), an explicit boolean mask (the sampler's left padding), one new query against a cache
(decode, no mask), several new queries after cached keys (bottom-right causal, against megatron
with that mask given), grouped-query
attention, and query-key layer scaling. fp32, tolerance 1e-5 (measured ≤ 1e-6)."""

from __future__ import annotations

import pytest
import torch

from opsd_megatron.testing import run_distributed

TOL = 1e-5


def _compare(layer_scaling: bool):
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from opsd_megatron.config import Layout
    from opsd_megatron.models.build import transformer_config
    from opsd_megatron.models.hf_config import ArchSpec
    from opsd_megatron.models.layer_specs import sdpa_core_attention
    from opsd_megatron.platform import initialize_model_parallel

    initialize_model_parallel(1, 1)
    arch = ArchSpec(
        family="qwen3", vocab_size=32, hidden_size=64, ffn_hidden_size=64, num_layers=4,
        num_attention_heads=4, num_query_groups=2, head_dim=16, norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=64, tie_word_embeddings=False, qkv_bias=False, qk_norm=False,
    )  # fmt: skip
    config = transformer_config(arch, Layout(), torch.float32, False, True)
    config.apply_query_key_layer_scaling = layer_scaling
    args = dict(config=config, layer_number=3, attn_mask_type=AttnMaskType.causal,
                attention_type="self")  # fmt: skip
    ours, theirs = sdpa_core_attention()(**args), DotProductAttention(**args)
    g = torch.Generator().manual_seed(0)
    b, heads, groups, d = 2, 4, 2, 16
    errors = {}

    def run(name, sq, sk, mask=None, mask_type=None, their_mask=None):
        q = torch.randn(sq, b, heads, d, generator=g, requires_grad=True)
        k = torch.randn(sk, b, groups, d, generator=g, requires_grad=True)
        v = torch.randn(sk, b, groups, d, generator=g, requires_grad=True)
        outs, grads = [], []
        for module, m in ((ours, mask), (theirs, mask if their_mask is None else their_mask)):
            out = module(q, k, v, m, mask_type)
            (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
            outs.append(out.detach())
            grads.append([t.grad.clone() for t in (q, k, v)])
            for t in (q, k, v):
                t.grad = None
        errors[name] = max(
            float((outs[0] - outs[1]).abs().max()),
            *(float((a - c).abs().max()) for a, c in zip(*grads)),
        )

    run("causal", 7, 7)
    pad = torch.zeros(b, 1, 7, 7, dtype=torch.bool)
    pad[0, ..., :3] = True  # row 0 left-padded by 3 keys
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)
    eye = torch.eye(7, dtype=torch.bool)
    run("padding mask", 7, 7, (pad | causal) & ~eye)
    run("decode", 1, 9, None, AttnMaskType.no_mask)
    run("decode, causal type", 1, 9)
    # megatron's own cannot (it asserts sq == sk): its explicit bottom-right mask is the reference
    later = ~torch.ones(3, 9, dtype=torch.bool).tril(6)
    run("new after cached", 3, 9, their_mask=later[None, None].expand(b, 1, 3, 9))
    return errors


@pytest.mark.parametrize("layer_scaling", [False, True])
def test_sdpa_core_attention_equals_megatrons(layer_scaling):
    errors = run_distributed(_compare, 1, layer_scaling, timeout=120)[0]
    assert max(errors.values()) < TOL, errors
