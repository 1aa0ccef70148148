"""The model a run's config describes — architecture, dtype, weights — built the same way for
training, evaluation and conversion checks, so they cannot drift apart."""

from __future__ import annotations

import torch

from opsd_megatron.config import ModelConfig, OPSDConfig
from opsd_megatron.models.hf_config import ArchSpec
from opsd_megatron.platform.parallel import ParallelGroups


def arch_of(model: ModelConfig) -> ArchSpec:
    """The ArchSpec from ``model.architecture`` if given, else from the checkpoint's files."""
    from opsd_megatron.models.checkpoint import read_checkpoint_metadata
    from opsd_megatron.models.hf_config import arch_from_hf_config, read_hf_config

    if model.architecture:
        return arch_from_hf_config(dict(model.architecture), "model.architecture")
    if model.hf_dir:
        return read_hf_config(model.hf_dir)[0]
    return read_checkpoint_metadata(model.megatron_dir)[0]


def params_dtype(model: ModelConfig) -> torch.dtype:
    """``auto``: bf16 on a GPU (with fp32 master weights in the optimizer), fp32 on CPU."""
    if model.dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return getattr(torch, model.dtype)


def build_model(
    cfg: OPSDConfig, arch: ArchSpec, dtype: torch.dtype, groups: ParallelGroups
) -> torch.nn.Module:
    """This rank's stage of the megatron model with the run's weights: the HF checkpoint, the
    converted megatron checkpoint, or (``model.architecture`` alone) seeded random weights that are
    the same at any TP/PP layout."""
    from opsd_megatron.models.build import build_gpt_model
    from opsd_megatron.models.checkpoint import load_model_checkpoint
    from opsd_megatron.models.hf_io import HFCheckpointReader
    from opsd_megatron.models.hf_weights import load_hf_weights
    from opsd_megatron.models.loss_contract import configure_model
    from opsd_megatron.models.random_init import RandomHFWeights

    model = build_gpt_model(
        arch,
        dtype,
        groups=groups,
        initialize=False,
        recompute=cfg.model.recompute,
        sequence_parallel=cfg.parallel.sequence_parallel,
    )
    if not (cfg.model.hf_dir or cfg.model.megatron_dir):
        with RandomHFWeights(arch, cfg.model.init_seed, cfg.model.init_std) as reader:
            load_hf_weights(model, reader, arch)
    elif cfg.model.hf_dir:
        with HFCheckpointReader(cfg.model.hf_dir) as reader:
            load_hf_weights(model, reader, arch)
    else:
        load_model_checkpoint(model, cfg.model.megatron_dir)
    configure_model(model)  # how megatron scales our already normalised loss
    return model
