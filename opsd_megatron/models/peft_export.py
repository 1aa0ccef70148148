"""LoRA adapters as a PEFT adapter directory (``adapter_config.json`` +
``adapter_model.safetensors``): what HF ``peft`` and vLLM's ``LoRARequest`` load, so vLLM can serve
the student as base + adapter.

Megatron's fused linears split exactly: q/k/v (and gate/up) share one A, and B splits along the
fused rows the way the base weight does (``weight_map.merge_tp_shards``). Scaling is α/r in both.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from opsd_megatron.config import LoRAConfig
from opsd_megatron.models import weight_map as wm
from opsd_megatron.models.build import groups_of, stage_layer_offset
from opsd_megatron.models.hf_config import ArchSpec
from opsd_megatron.models.hf_io import atomic_output_dir
from opsd_megatron.models.hf_weights import _gather_tp
from opsd_megatron.models.lora import SUFFIX, LoRAAdapter


@torch.no_grad()
def stage_peft_tensors(model, arch: ArchSpec) -> dict[str, torch.Tensor]:
    """This pipeline stage's adapters as full PEFT-named tensors (collective over the TP group)."""
    groups = groups_of(model)
    offset = stage_layer_offset(arch, groups)
    out = {}
    for parent_name, parent in model.named_modules():
        for child_name, adapter in parent.named_children():
            if not isinstance(adapter, LoRAAdapter):
                continue
            base = wm.with_global_layer(
                f"{parent_name}.{child_name[: -len(SUFFIX)]}.weight", offset
            )
            rule = wm.rule_for(base, arch)
            a, b = adapter.lora_A.weight.detach(), adapter.lora_B.weight.detach()
            if adapter.row_parallel:  # A holds the input shard, B is row-split plainly
                a_full = torch.cat(_gather_tp(a, groups), dim=1)
                parts = {rule.hf_names[0]: torch.cat(_gather_tp(b, groups), dim=0)}
            # A is split along r; B's rows follow the base weight's (fused, interleaved) split
            else:
                a_full = torch.cat(_gather_tp(a, groups), dim=0)
                parts = wm.merge_tp_shards(rule, _gather_tp(b, groups), arch)
            for hf_name, b_part in parts.items():
                module = hf_name[: -len(".weight")]
                out[f"base_model.model.{module}.lora_A.weight"] = (
                    a_full.clone()
                )  # shared A: one copy per module
                out[f"base_model.model.{module}.lora_B.weight"] = b_part.contiguous()
    return out


def save_peft_adapter(
    model,
    arch: ArchSpec,
    lora: LoRAConfig,
    out_dir: str | Path,
    base_model: str = "",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the model's adapters as a PEFT directory (collective; global rank 0 writes,
    atomically)."""
    from safetensors.torch import save_file

    groups = groups_of(model)
    tensors = stage_peft_tensors(model, arch)
    sends = groups.tp_rank == 0 and groups.dp_rank == 0
    mine = {k: v.cpu() for k, v in tensors.items()} if sends else {}
    everyone = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, everyone, dst=0)
    out_dir = Path(out_dir)
    if dist.get_rank() == 0:
        merged = {
            k: (v.to(dtype) if dtype is not None else v)
            for part in everyone
            for k, v in part.items()
        }
        modules = sorted({k.split(".")[-3] for k in merged})
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": lora.rank,
            "lora_alpha": lora.alpha,
            "lora_dropout": lora.dropout,
            "bias": "none",
            "target_modules": modules,
            "base_model_name_or_path": base_model,
            "fan_in_fan_out": False,
            "use_rslora": False,
        }
        with atomic_output_dir(out_dir) as tmp:
            save_file(merged, str(tmp / "adapter_model.safetensors"))
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    dist.barrier()
    return out_dir
