"""Every layer-spec choice in one place: transformer-engine's fused spec on a GPU with TE, else
megatron-core's local (pure PyTorch) spec, which also runs on CPU — with its norms swapped for a
torch RMSNorm that allows sequence parallelism (megatron's wrapped torch norm refuses it), and its
core attention for ``scaled_dot_product_attention`` (``SDPACoreAttention``)."""

from __future__ import annotations

import importlib.util

import torch

from opsd_megatron.models.hf_config import ArchSpec


def use_transformer_engine() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


class SequenceParallelRMSNorm:
    """torch's RMSNorm for the local spec. Normalising is per token, so under sequence parallelism
    a rank's sequence shard needs nothing more than its weight gradient summed over the TP group;
    the weight is marked ``sequence_parallel`` for that (train/grads.py)."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_):
        norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        norm.weight.sequence_parallel = config.sequence_parallel
        return norm


def sdpa_core_attention():
    """megatron's local ``DotProductAttention`` computing with torch's fused attention.

    The local one materialises the ``[b, heads, s, s]`` scores with baddbmm, masks, softmaxes in
    fp32 and multiplies with bmm, after repeating K/V for grouped queries: a quarter of a teacher
    pass's time on CPU (SmolLM2, 400-token sequences, measured) and more in backward. torch's
    ``scaled_dot_product_attention`` (flash attention on CPU and GPU, ``enable_gqa``) computes the
    same softmax(QKᵀ·scale + mask)V. Everything megatron's class sets up (heads per partition,
    the scale with query-key layer scaling) is inherited; what SDPA cannot do — attention dropout
    in training (megatron forks its RNG for it), a softmax offset, windows, a bias — goes to
    megatron's own forward."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    class SDPACoreAttention(DotProductAttention):
        def forward(self, query, key, value, attention_mask, attn_mask_type=None, *args, **kw):
            dropout = self.training and self.attention_dropout.p > 0
            plain = (
                not args
                and kw.get("attention_bias") is None
                and kw.get("packed_seq_params") is None
                and getattr(self, "softmax_offset", None) is None
                and self.scale_mask_softmax.window_size is None
            )
            if dropout or not plain:
                return super().forward(
                    query, key, value, attention_mask, attn_mask_type, *args, **kw
                )
            sq, b = query.shape[0], query.shape[1]
            sk = key.shape[0]
            mask_type = attn_mask_type or self.attn_mask_type
            causal, mask = False, None
            if attention_mask is not None:
                mask = ~attention_mask.bool()  # megatron: True = masked; SDPA: True = attend
            elif mask_type == AttnMaskType.causal and sq > 1:
                if sq == sk:
                    causal = True
                else:  # new positions after cached ones: bottom-right aligned
                    mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
            out = torch.nn.functional.scaled_dot_product_attention(
                query.permute(1, 2, 0, 3),
                key.permute(1, 2, 0, 3),
                value.permute(1, 2, 0, 3),
                attn_mask=mask,
                is_causal=causal,
                scale=self.softmax_scale * (self.layer_number if self._coeff() else 1),
                enable_gqa=key.shape[2] != query.shape[2],
            )  # [b, heads, sq, d]
            return out.permute(2, 0, 1, 3).reshape(sq, b, -1)

        def _coeff(self) -> bool:
            """Query-key layer scaling divides the scale by the layer number and the fused
            softmax multiplies it back: the product is the plain scale."""
            return bool(self.config.apply_query_key_layer_scaling)

    return SDPACoreAttention


def gpt_layer_spec(arch: ArchSpec, transformer_engine: bool | None = None):
    """The decoder layer spec for ``arch``; ``transformer_engine=None`` decides by the machine."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if transformer_engine is None:
        transformer_engine = use_transformer_engine()
    if transformer_engine:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    spec = specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    spec.submodules.self_attention.submodules.core_attention = sdpa_core_attention()
    if arch.qk_norm:
        attention = spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = SequenceParallelRMSNorm
    return spec


def gpt_block_spec(arch: ArchSpec, config, transformer_engine: bool | None = None):
    """This pipeline stage's decoder block: its layers' spec and the final norm."""
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer = gpt_layer_spec(arch, transformer_engine)
    if transformer_engine is None:
        transformer_engine = use_transformer_engine()
    if transformer_engine:
        return layer  # megatron adds TE's final norm
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config), layer_norm=SequenceParallelRMSNorm
    )
