"""Optimizer state (fp32 master weights, AdamW moments, step counts) as a megatron distributed
checkpoint, through megatron's own ``optimizer.sharded_state_dict``: every state tensor is stored
against its parameter's global shape, so it loads at another TP/PP and, with the distributed
optimizer (``fully_reshardable`` format), at another DP size.

``FORMAT`` is written into ``trainer_state.json``; checkpoints from the plain-AdamW trainer (no
marker) are refused with one line rather than loaded into the wrong structure.
"""

from __future__ import annotations

from pathlib import Path

import torch

from opsd_megatron.errors import UserError

FORMAT = "megatron-optimizer-v1"
SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}


class OldOptimizerFormat(UserError):
    pass


def _sharded(model, optimizer, is_loading: bool) -> dict:
    return {
        "optimizer": optimizer.sharded_state_dict(
            model.sharded_state_dict(), is_loading=is_loading, metadata=SHARDING
        )
    }


def _inner(optimizer) -> list:
    """The megatron optimizers inside a ``ChainedOptimizer`` (or the optimizer itself)."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def _init_adam_state(optimizer) -> None:
    """Give every parameter its optimizer state before a load fills it in place, the way megatron
    does (each optimizer's own ``init_state_fn``: exp_avg/exp_avg_sq, or TE's
    ``initialize_state``): megatron's distributed optimizer reads the existing state while
    building the sharded dict, and torch creates Adam state only at the first step. Only torch's
    own Adam keeps a per-parameter ``step`` (which megatron 0.16.1 reads for it); TE's FusedAdam
    keeps it in the param group and refuses any state name it does not know (TE 2.9
    ``get_unscaled_state``: ``KeyError: 'step'``), so nothing else is added."""
    for inner in _inner(optimizer):
        torch_opt = inner.optimizer
        inner.init_state_fn(torch_opt, inner.config)
        if isinstance(torch_opt, (torch.optim.Adam, torch.optim.AdamW)):
            for group in torch_opt.param_groups:
                for p in group["params"]:
                    torch_opt.state[p].setdefault("step", torch.tensor(0.0))


def _keep_step_on_load(optimizer) -> None:
    """megatron-core 0.16.1, torch-AdamW fallback (no apex/TE): ``load_parameter_state_from_
    fully_reshardable`` drops ``step`` from the loaded tensors, then copies every key of the live
    state (which has ``step``) -> KeyError. Hand it the live step, which megatron's
    ``load_state_dict`` has just set from the checkpoint's param groups."""
    for inner in _inner(optimizer):
        original = getattr(inner, "_set_main_param_and_optimizer_states", None)
        if original is None or getattr(original, "_keeps_step", False):
            continue

        def set_states(model_param, tensors, inner=inner, original=original):
            group, order = inner.model_param_group_index_map[model_param]
            live = inner.optimizer.state[inner.optimizer.param_groups[group]["params"][order]]
            if "step" in live and "step" not in tensors:
                tensors = {**tensors, "step": live["step"].clone()}
            original(model_param, tensors)

        set_states._keeps_step = True
        inner._set_main_param_and_optimizer_states = set_states


def save_optimizer(model, optimizer, directory: Path) -> None:
    """Collective; ``directory`` must exist."""
    from megatron.core import dist_checkpointing

    dist_checkpointing.save(_sharded(model, optimizer, False), str(directory))


def optimizer_kind(optimizer) -> str:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return "distributed" if isinstance(_inner(optimizer)[0], DistributedOptimizer) else "local"


def load_optimizer(model, optimizer, directory: Path, fmt: str | None, kind: str | None) -> None:
    """Collective. ``fmt``/``kind``: the checkpoint's ``optimizer_format``/``optimizer_kind``
    (absent in checkpoints of the plain-AdamW trainer)."""
    from megatron.core import dist_checkpointing

    if fmt != FORMAT:
        raise OldOptimizerFormat(
            f"{directory}: optimizer state is from an older format ({fmt or 'plain AdamW'}); "
            f"resume with checkpoint.resume=false or load only the weights"
        )
    if kind != optimizer_kind(optimizer):
        raise OldOptimizerFormat(
            f"{directory}: optimizer state was written by the {kind} optimizer, this run uses "
            f"the {optimizer_kind(optimizer)} one: set optimizer.distributed="
            f"{str(kind == 'distributed').lower()} to resume"
        )
    _init_adam_state(optimizer)
    _keep_step_on_load(optimizer)
    loaded = dist_checkpointing.load(_sharded(model, optimizer, True), str(directory))["optimizer"]
    optimizer.load_state_dict(loaded)
    # megatron (0.16.1, torch-AdamW fallback) gives every parameter the *same* step tensor, which
    # torch's AdamW then increments in place once per parameter: unshare it.
    for inner in _inner(optimizer):
        for state in inner.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
