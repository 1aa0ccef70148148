"""Megatron GPT models from HF configs, HF <-> megatron weights, LoRA, and the frozen teacher."""

from opsd_megatron.models.build import build_gpt_model, stage_layer_offset
from opsd_megatron.models.hf_config import (
    ArchSpec,
    UnsupportedConfigError,
    arch_from_hf_config,
    read_hf_config,
)

__all__ = [
    "ArchSpec",
    "UnsupportedConfigError",
    "arch_from_hf_config",
    "build_gpt_model",
    "read_hf_config",
    "stage_layer_offset",
]
