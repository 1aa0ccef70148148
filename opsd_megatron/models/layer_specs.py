"""Every layer-spec choice in one place: transformer-engine's fused spec on a GPU with TE, else
megatron-core's local (pure PyTorch) spec, which also runs on CPU."""

from __future__ import annotations

import importlib.util

import torch

from opsd_megatron.models.hf_config import ArchSpec


def use_transformer_engine() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def gpt_layer_spec(arch: ArchSpec, transformer_engine: bool | None = None):
    """The decoder layer spec for ``arch``; ``transformer_engine=None`` decides by the machine."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if transformer_engine is None:
        transformer_engine = use_transformer_engine()
    if transformer_engine:
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
