"""Model weights as megatron-core distributed checkpoints (``dist_checkpointing``, torch_dist).

A checkpoint written at one TP/PP loads at any other: megatron stores each tensor globally with
per-shard offsets. Beside the tensors, ``opsd_model.json`` records the architecture (so a model can
be rebuilt without the HF directory), the original HF config (for export) and the layout it was
written at. Adapters can be saved and loaded alone (``adapters_only=True``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from opsd_megatron.errors import PathError
from opsd_megatron.models.build import groups_of
from opsd_megatron.models.hf_config import ArchSpec
from opsd_megatron.models.lora import SUFFIX

METADATA = "opsd_model.json"


def _sharded(model, adapters_only: bool, base_only: bool = False) -> dict:
    sharded = model.sharded_state_dict()
    if base_only:
        sharded = {k: v for k, v in sharded.items() if SUFFIX + "." not in k}
    if adapters_only:
        sharded = {k: v for k, v in sharded.items() if SUFFIX + "." in k}
        if not sharded:
            raise ValueError("adapters_only=True but the model has no LoRA adapters")
    return sharded


def save_model_checkpoint(
    model,
    ckpt_dir: str | Path,
    arch: ArchSpec,
    hf_config: dict | None = None,
    adapters_only: bool = False,
    extra: dict | None = None,
    base_only: bool = False,
) -> None:
    """Collective: every rank passes its model stage; ``ckpt_dir`` must exist and be empty.
    ``adapters_only``: just the LoRA adapters; ``base_only``: everything but them."""
    from megatron.core import dist_checkpointing

    groups = groups_of(model)
    ckpt_dir = Path(ckpt_dir)
    dist_checkpointing.save(_sharded(model, adapters_only, base_only), str(ckpt_dir))
    if dist.get_rank() == 0:
        layout = {
            "tensor_model_parallel_size": groups.tp_size,
            "pipeline_model_parallel_size": groups.pp_size,
        }
        write_metadata(ckpt_dir, arch, hf_config, layout, adapters_only, extra)
    dist.barrier()


def write_metadata(
    ckpt_dir: str | Path,
    arch: ArchSpec,
    hf_config: dict | None,
    written_at: dict,
    adapters_only: bool = False,
    extra: dict | None = None,
) -> None:
    """``opsd_model.json``: the architecture and original HF config, so a checkpoint rebuilds its
    model."""
    meta = {
        "arch": arch.to_dict(),
        "hf_config": hf_config,
        "adapters_only": adapters_only,
        "written_at": written_at,
        **(extra or {}),
    }
    (Path(ckpt_dir) / METADATA).write_text(json.dumps(meta, indent=2))


def read_checkpoint_metadata(ckpt_dir: str | Path) -> tuple[ArchSpec, dict]:
    path = Path(ckpt_dir) / METADATA
    if not path.is_file():
        raise PathError(f"{path}: not an opsd-megatron checkpoint (no {METADATA})")
    meta = json.loads(path.read_text())
    return ArchSpec(**meta["arch"]), meta


def load_model_checkpoint(model, ckpt_dir: str | Path, adapters_only: bool = False) -> None:
    """Collective: fill this rank's shards from a checkpoint written at any TP/PP."""
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(_sharded(model, adapters_only), str(ckpt_dir))
    missing, unexpected = model.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if "_extra_state" not in k]
    if unexpected:
        raise KeyError(f"{ckpt_dir}: checkpoint tensors the model does not have: {unexpected[:5]}")
