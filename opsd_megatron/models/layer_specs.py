"""Every layer-spec choice in one place: transformer-engine's fused spec on a GPU with TE, else
megatron-core's local (pure PyTorch) spec, which also runs on CPU — with its norms swapped for a
torch RMSNorm that allows sequence parallelism (megatron's wrapped torch norm refuses it)."""

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


def gpt_layer_spec(arch: ArchSpec, transformer_engine: bool | None = None):
    """The decoder layer spec for ``arch``; ``transformer_engine=None`` decides by the machine."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if transformer_engine is None:
        transformer_engine = use_transformer_engine()
    if transformer_engine:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    spec = specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
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
