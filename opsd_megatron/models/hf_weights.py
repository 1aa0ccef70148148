"""Move weights between an HF safetensors checkpoint and a (TP-sharded, PP-staged) megatron model.

Loading streams: each parameter reads only this rank's slice of its HF tensors. Export streams
too: one parameter at a time is gathered over its TP group (weights, never logits) and written by
TP rank 0 of each pipeline stage into size-bounded safetensors parts; rank 0 writes the index.
LoRA adapters are merged into the exported weights on the fly (see ``opsd_megatron.models.lora``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from opsd_megatron.models import weight_map as wm
from opsd_megatron.models.build import groups_of, stage_layer_offset
from opsd_megatron.models.hf_config import ArchSpec
from opsd_megatron.models.hf_io import HFCheckpointReader, HFCheckpointWriter
from opsd_megatron.platform.parallel import ParallelGroups
from opsd_megatron.platform.progress import Progress


def _base_parameters(model) -> dict[str, torch.Tensor]:
    """Parameters that exist in the HF checkpoint (no LoRA adapters, no megatron extra state)."""
    from opsd_megatron.models.lora import base_weight_items

    return dict(base_weight_items(model))


@torch.no_grad()
def load_hf_weights(model, reader: HFCheckpointReader, arch: ArchSpec) -> int:
    """Copy this rank's shard of every parameter from the HF checkpoint; returns how many were
    set."""
    groups = groups_of(model)
    tp, tp_rank = groups.tp_size, groups.tp_rank
    offset = stage_layer_offset(arch, groups)
    count = 0
    for local_name, param in _base_parameters(model).items():
        rule = wm.rule_for(wm.with_global_layer(local_name, offset), arch)
        shapes = [reader.shape(n) for n in rule.hf_names]
        slices = wm.source_slices(rule, arch, tp_rank, tp, shapes)
        parts = [reader.get(n, sl) for n, sl in zip(rule.hf_names, slices)]
        value = wm.combine(rule, parts, arch, tp)
        if value.shape != param.shape:
            raise ValueError(
                f"{reader.dir}: {rule.hf_names} give shape {tuple(value.shape)} for megatron "
                f"'{local_name}' which needs {tuple(param.shape)} (config.json does not match the "
                "weights?)"
            )
        param.copy_(value)
        count += 1
    return count


def _gather_tp(tensor: torch.Tensor, groups: ParallelGroups) -> list[torch.Tensor]:
    tp = groups.tp_size
    if tp == 1:
        return [tensor]
    shards = [torch.empty_like(tensor) for _ in range(tp)]
    dist.all_gather(shards, tensor.contiguous(), group=groups.tp)
    return shards


@torch.no_grad()
def iter_stage_hf_tensors(model, arch: ArchSpec, merge_lora: bool = True):
    """Yield (megatron global name, {hf_name: full tensor}) for this pipeline stage's parameters.

    Collective over the TP group (each tensor is gathered there); every TP rank gets the full
    tensors. With ``merge_lora`` adapters are merged into their base weights on the fly.
    """
    from opsd_megatron.models.lora import merged_weight

    groups = groups_of(model)
    offset = stage_layer_offset(arch, groups)
    for local_name, value in _base_parameters(model).items():
        global_name = wm.with_global_layer(local_name, offset)
        if global_name == "output_layer.weight" and arch.tie_word_embeddings:
            continue  # tied: model.embed_tokens comes from the first stage
        shard = merged_weight(model, local_name, value) if merge_lora else value.detach()
        yield (
            global_name,
            wm.merge_tp_shards(wm.rule_for(global_name, arch), _gather_tp(shard, groups), arch),
        )


@torch.no_grad()
def export_hf_weights(
    model,
    arch: ArchSpec,
    out_dir: Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 << 30,
) -> None:
    """Write the model's full weights as HF safetensors shards + index into ``out_dir``
    (collective)."""
    groups = groups_of(model)

    writes = groups.tp_rank == 0
    writer = HFCheckpointWriter(Path(out_dir), max_shard_bytes, prefix=f"stage{groups.pp_rank}-")
    shown = dist.get_rank() == 0  # the first stage's progress stands for all
    progress = Progress(len(_base_parameters(model)), label="export") if shown else None
    for i, (_, full) in enumerate(iter_stage_hf_tensors(model, arch), 1):
        if writes:
            for hf_name, tensor in full.items():
                writer.add(hf_name, tensor.to(dtype) if dtype is not None else tensor)
        if progress is not None:
            progress.update(i, "tensors")
    if progress is not None:
        progress.close()
    parts = writer.close_parts() if writes else []
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, parts)
    if dist.get_rank() == 0:
        HFCheckpointWriter.write_index(
            Path(out_dir), [p for rank_parts in everyone for p in rank_parts]
        )
    dist.barrier()
