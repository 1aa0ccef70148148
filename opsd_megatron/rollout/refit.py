"""Weight refit for a colocated inference engine (vLLM): stream the student's weights from Megatron
as HF-named full tensors, in buckets of bounded size, to every rank.

Each parameter is gathered over its TP group and renamed with the models' weight maps (LoRA merged
on the fly); with PP>1 its owning stage broadcasts it to the other stages. Metadata (names, shapes,
owners) comes from the architecture, so every rank knows what to receive. Peak extra memory is one
bucket plus the parameter being assembled — never a second copy of the model.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.distributed as dist

from opsd_megatron.models import weight_map as wm
from opsd_megatron.models.build import groups_of
from opsd_megatron.models.hf_config import ArchSpec
from opsd_megatron.models.hf_weights import iter_stage_hf_tensors
from opsd_megatron.models.random_init import hf_shapes

Bucket = list[tuple[str, torch.Tensor]]


def _owner_stage(global_name: str, arch: ArchSpec, pp: int) -> int:
    if global_name.startswith("embedding."):
        return 0
    if global_name.startswith(("output_layer.", "decoder.final_layernorm.")):
        return pp - 1
    layer = int(global_name.split(".")[2])
    return layer // (arch.num_layers // pp)


def _global_param_names(model, arch: ArchSpec) -> list[str]:
    """Every megatron parameter with an HF counterpart, in the order the stages hold them. Every
    stage has the same layer structure, so this stage's first layer gives the order within a
    layer."""
    from opsd_megatron.models.lora import base_weight_items

    suffixes = []
    for local_name, _ in base_weight_items(model):
        if local_name.startswith("decoder.layers.0."):
            suffixes.append(local_name[len("decoder.layers.0.") :])
    names = ["embedding.word_embeddings.weight"]
    for i in range(arch.num_layers):
        names += [f"decoder.layers.{i}.{suffix}" for suffix in suffixes]
    names.append("decoder.final_layernorm.weight")
    if not arch.tie_word_embeddings:
        names.append("output_layer.weight")
    return names


def stream_hf_weights(
    model,
    arch: ArchSpec,
    bucket_bytes: int = 1 << 30,
    merge_lora: bool = True,
    dtype: torch.dtype | None = None,
) -> Iterator[Bucket]:
    """Collective: yield buckets of (hf_name, full tensor) covering the whole model, on every
    rank."""
    groups = groups_of(model)
    pp, my_stage = groups.pp_size, groups.pp_rank
    shapes = hf_shapes(arch)
    local = iter_stage_hf_tensors(model, arch, merge_lora)
    bucket: Bucket = []
    size = 0
    for name in _global_param_names(model, arch):
        owner = _owner_stage(name, arch, pp)
        if owner == my_stage:
            got_name, tensors = next(local)
            assert got_name == name, (got_name, name)
        else:
            ref = next(model.parameters())
            tensors = {
                n: torch.empty(shapes[n], dtype=ref.dtype, device=ref.device)
                for n in wm.rule_for(name, arch).hf_names
            }
        if pp > 1:
            group = groups.pp
            src = dist.get_global_rank(group, owner)
            for t in tensors.values():
                dist.broadcast(t, src, group=group)
        for hf_name, tensor in tensors.items():
            tensor = tensor.to(dtype) if dtype is not None else tensor
            nbytes = tensor.numel() * tensor.element_size()
            if bucket and size + nbytes > bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((hf_name, tensor))
            size += nbytes
    if bucket:
        yield bucket
