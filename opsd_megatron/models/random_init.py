"""Layout-independent random initialisation for models built from an inline architecture.

Megatron's own CPU initialisation draws layers in order from one generator, so a PP=2 stage gets
different weights than the same layers at PP=1. Here every HF-named tensor is drawn from its own
generator seeded by (seed, name), in HF layout, and loaded through the same weight maps as a real
checkpoint: the model is identical at any TP/PP, and the HF ``state_dict()`` of the same weights
is available for single-process references.
"""

from __future__ import annotations

import zlib

import torch

from opsd_megatron.models.hf_config import ArchSpec

INIT_STD = 0.02


def hf_shapes(arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    h, f, hd = arch.hidden_size, arch.ffn_hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_proj.weight": (f, h),
                p + "mlp.up_proj.weight": (f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
        if arch.qk_norm:
            shapes.update(
                {p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)}
            )
        if arch.qkv_bias:
            shapes.update(
                {
                    p + "self_attn.q_proj.bias": (q,),
                    p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,),
                }
            )
    return shapes


class RandomHFWeights:
    """A reader with HFCheckpointReader's interface whose tensors are seeded random draws."""

    def __init__(self, arch: ArchSpec, seed: int, std: float = INIT_STD):
        self.arch, self.seed, self.std, self.shapes = arch, seed, std, hf_shapes(arch)
        self.dir = f"<random init, seed {seed}>"

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def full(self, name: str) -> torch.Tensor:
        shape = self.shapes[name]
        if name.endswith("norm.weight"):
            return torch.ones(shape)
        if name.endswith(".bias"):
            return torch.zeros(shape)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return torch.randn(shape, generator=g) * self.std

    def get(self, name: str, sl=None) -> torch.Tensor:
        t = self.full(name)
        if sl is None:
            return t
        dim, start, stop = sl
        return t.narrow(dim, start, stop - start)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: self.full(name) for name in self.shapes}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass
