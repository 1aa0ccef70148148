"""AdamW state as a megatron distributed checkpoint: each moment tensor is stored as a sharded tensor
mirroring its parameter (megatron's ``optim_state_to_sharding_state``), so optimizer state, like the
weights, loads at any TP/PP. AdamW's per-parameter ``step`` counters are all equal to the number of
applied updates; they are kept in the trainer state instead of as tensors."""

from __future__ import annotations

from pathlib import Path

import torch


def _trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]  # the optimizer's parameter order


def _sharded(model, optimizer) -> dict:
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        optim_state_to_sharding_state,
    )

    id_map = get_param_id_to_sharded_param_map(model.sharded_state_dict(), _trainable(model))
    state = optimizer.state_dict()
    optim_state_to_sharding_state(state, id_map, exclude_keys=("step",))
    return {"optimizer": state}


def has_state(optimizer) -> bool:
    return bool(optimizer.state)


def save_optimizer(model, optimizer, directory: Path) -> None:
    """Collective; ``directory`` must exist."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(_sharded(model, optimizer), str(directory))


def load_optimizer(model, optimizer, directory: Path, applied_updates: int) -> None:
    """Collective: zero-initialise AdamW's moments, fill them from ``directory``, set ``step``."""
    from megatron.core import dist_checkpointing

    for p in _trainable(model):
        optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": torch.zeros_like(p)}
    loaded = dist_checkpointing.load(_sharded(model, optimizer), str(directory))["optimizer"]
    for param_state in loaded["state"].values():
        param_state["step"] = torch.tensor(float(applied_updates))
    optimizer.load_state_dict(loaded)
