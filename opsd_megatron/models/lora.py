r"""LoRA on megatron-core's tensor-parallel linears, sharded so that TP=n computes exactly TP=1.

y = W x + (α/r) · B A dropout(x), with B initialised to zero (output equals the base at init).

Sharding (as NeMo's ParallelLinearAdapter), all communication inside megatron's own autograd
functions, so no gradient needs a manual all-reduce:

* ColumnParallel base (qkv, fc1; W shard [out/tp, in], x replicated):
  A = ColumnParallel(in→r, gather_output=True) — shard [r/tp, in], h gathered to [.., r];
  B = ColumnParallel(r→out) — shard [out/tp, r], same row layout as W's shard.
  Merged shard: W_k + s · B_k · A.
* RowParallel base (o_proj, down; W shard [out, in/tp], x sharded):
  A = RowParallel(in→r, input_is_parallel=True) — shard [r, in/tp], h all-reduced;
  B = ColumnParallel(r→out, gather_output=True) — shard [out/tp, r].
  Merged shard: W_k + s · B · A_k.

Which kind a base is, and its full sizes, come from its weight as megatron and
transformer-engine both mark it (``partition_dim`` 0 = column, 1 = row; the shard's shape), not
from its class or ``input_size``/``output_size``: megatron's TE wrappers (megatron-core 0.16.1
and 0.19 ``extensions/transformer_engine.py``) subclass ``te.pytorch.Linear``, whose
``in_features``/``out_features`` are per-partition (TE 2.9 ``module/linear.py``).
A base that fuses its input norm (``TELayerNormColumnParallelLinear``: TE 2.9
``module/layernorm_linear.py``, the layer spec's ``input_layernorm`` is then an identity) is
hooked on its *normalised* input, which the adapter recomputes from the layer's own norm weight,
so ``merged()``, the PEFT export and the vLLM refit (all W + s·B·A on the normalised input) hold
for both specs.

Adapters live beside the linear they adapt (``self_attention.linear_qkv_lora``), not inside it,
so megatron's distributed checkpointing sees them as their own TP-sharded tensors.
``adapters_disabled(model)`` switches every adapter off: that is the frozen teacher.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator

import torch

from opsd_megatron.config import LoRAConfig
from opsd_megatron.platform.parallel import ParallelGroups

# megatron submodule names of the paper's seven targets
SUFFIX = "_lora"


def _kaiming(weight: torch.Tensor) -> None:
    torch.nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class LoRAAdapter(torch.nn.Module):
    """The A/B pair for one megatron linear; added to its output by a forward hook."""

    def __init__(self, base, cfg: LoRAConfig, glu: bool, groups: ParallelGroups):
        super().__init__()
        from megatron.core import tensor_parallel as mtp

        config = base.config
        tp = groups.tp_size
        row_parallel, in_size, out_size = parallel_kind(base, tp)
        self.fused_norm = fused_norm(base)
        if cfg.rank % tp:
            raise ValueError(
                f"lora.rank={cfg.rank} must be divisible by tensor_model_parallel_size={tp}"
            )
        self.sequence_parallel = config.sequence_parallel
        if config.sequence_parallel:  # the adapter moves between sequence shards itself (delta)
            config = dataclasses.replace(config, sequence_parallel=False)
        common = dict(config=config, bias=False, skip_bias_add=True, is_expert=False)
        if row_parallel:
            self.lora_A = mtp.RowParallelLinear(
                in_size, cfg.rank, init_method=_kaiming, input_is_parallel=True, **common
            )
            self.lora_B = mtp.ColumnParallelLinear(
                cfg.rank, out_size, init_method=torch.nn.init.zeros_, gather_output=True, **common
            )
        else:
            self.lora_A = mtp.ColumnParallelLinear(
                in_size, cfg.rank, init_method=_kaiming, gather_output=True, **common
            )
            self.lora_B = mtp.ColumnParallelLinear(
                cfg.rank, out_size, init_method=torch.nn.init.zeros_, gather_output=False, **common
            )
        self._init_weights(in_size, cfg.rank, row_parallel, groups)
        self.row_parallel, self.glu = row_parallel, glu
        self.scale = cfg.scale
        self.dropout = torch.nn.Dropout(cfg.dropout) if cfg.dropout > 0 else torch.nn.Identity()
        self.enabled = True

    @torch.no_grad()
    def _init_weights(self, in_size: int, rank: int, row_parallel: bool, groups) -> None:
        """A: PEFT's kaiming-uniform on the full [r, in] matrix, then this rank's slice — the same
        default-generator draw on every TP rank, so TP=n starts exactly where TP=1 does. B: zeros.
        Done here, not through megatron's init, so it also happens when the base skips init."""
        full = torch.empty(rank, in_size, dtype=torch.float32)
        _kaiming(full)
        tp, tp_rank = groups.tp_size, groups.tp_rank
        shard = full.chunk(tp, dim=1 if row_parallel else 0)[tp_rank]
        self.lora_A.weight.copy_(shard.to(self.lora_A.weight.dtype))
        self.lora_B.weight.zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """s·B·A·x. Under sequence parallelism a column-parallel base sees a sequence shard (the
        adapter gathers it; A's own TP region already sums its input gradient, so the gather's
        backward only splits) and a row-parallel base returns one (the adapter scatters to it)."""
        from megatron.core import tensor_parallel as mtp

        if self.sequence_parallel and not self.row_parallel:
            x = mtp.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        h, _ = self.lora_A(self.dropout(x))
        y, _ = self.lora_B(h)
        y = y * self.scale
        if self.sequence_parallel and self.row_parallel:
            y = mtp.scatter_to_sequence_parallel_region(y)
        return y

    def hook(self, module, inputs, output):
        if not self.enabled:
            return output
        out, bias = output
        x = inputs[0] if self.fused_norm is None else self.fused_norm(inputs[0])
        return out + self.delta(x).to(out.dtype), bias

    @torch.no_grad()
    def merged(self, base_weight: torch.Tensor) -> torch.Tensor:
        """This rank's shard of W + s·B·A (a collective over the TP group)."""
        from megatron.core.tensor_parallel import (
            gather_from_tensor_model_parallel_region as gather_last,
        )

        a, b = self.lora_A.weight, self.lora_B.weight
        if self.row_parallel:  # B is row-sharded: gather its rows
            b_full = gather_last(b.t().contiguous()).t()
            delta = b_full @ a
        else:  # A is row-sharded: gather its rows
            a_full = gather_last(a.t().contiguous()).t()
            delta = b @ a_full
        return base_weight + (self.scale * delta).to(base_weight.dtype)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

        out = {}
        for name in ("lora_A", "lora_B"):
            sub = getattr(self, name).sharded_state_dict(
                f"{prefix}{name}.", sharded_offsets, metadata
            )
            if self.glu and name == "lora_B":  # B's rows follow fc1's [gate; up] split per rank
                key = f"{prefix}{name}.weight"
                sub[key] = apply_swiglu_sharded_factory(sub[key], sharded_offsets)
            out.update(sub)
        return out


def parallel_kind(base, tp: int) -> tuple[bool, int, int]:
    """(row-parallel?, full input size, full output size) of a TP linear, read off its weight."""
    weight = getattr(base, "weight", None)
    if weight is None or not getattr(weight, "tensor_model_parallel", False):
        raise ValueError(
            f"LoRA needs a tensor-parallel linear (weight marked with megatron's partition_dim); "
            f"{type(base).__name__} has none"
        )
    out_local, in_local = weight.shape
    if weight.partition_dim == 1:
        return True, in_local * tp, out_local
    return False, in_local, out_local * tp


def fused_norm(base):
    """The input norm a TE ``LayerNormLinear`` applies inside itself, as a function of x; None
    for a plain linear (its input is already normalised by the layer's own norm module)."""
    weight = getattr(base, "layer_norm_weight", None)
    if weight is None:
        return None
    if getattr(base, "return_layernorm_output", False):
        raise ValueError(f"LoRA cannot adapt {type(base).__name__} with return_layernorm_output")
    kind = getattr(base, "normalization", "LayerNorm")
    eps, shifted = base.eps, bool(getattr(base, "zero_centered_gamma", False))

    def normalise(x: torch.Tensor) -> torch.Tensor:
        gamma = (base.layer_norm_weight + 1) if shifted else base.layer_norm_weight
        shape = (x.shape[-1],)
        if kind == "RMSNorm":
            y = torch.nn.functional.rms_norm(x.float(), shape, gamma.float(), eps)
        elif kind == "LayerNorm":
            bias = base.layer_norm_bias
            y = torch.nn.functional.layer_norm(
                x.float(), shape, gamma.float(), None if bias is None else bias.float(), eps
            )
        else:
            raise ValueError(f"LoRA: unknown fused normalization {kind!r}")
        return y.to(x.dtype)  # TE normalises in fp32 and returns the input dtype

    return normalise


def apply_lora(
    model: torch.nn.Module, cfg: LoRAConfig, groups: ParallelGroups | None = None
) -> list[str]:
    """Attach adapters to the target linears and freeze everything else. Returns the adapted
    names. ``groups``: where the model sits (default: the groups it was built with)."""
    from opsd_megatron.models.build import groups_of, mark_tensor_parallel_params

    groups = groups or groups_of(model)
    wanted = cfg.linear_names()
    adapted = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name not in wanted or child_name + SUFFIX in parent._modules:
                continue
            adapter = LoRAAdapter(child, cfg, glu=child_name == "linear_fc1", groups=groups)
            mark_tensor_parallel_params(adapter)
            parent.add_module(child_name + SUFFIX, adapter)
            child.register_forward_hook(adapter.hook)
            adapted.append(f"{parent_name}.{child_name}".lstrip("."))
    if not adapted:
        raise ValueError(f"lora.target_modules {cfg.target_modules} matched no linear in the model")
    for name, p in model.named_parameters():
        p.requires_grad_(SUFFIX + "." in name)
    return adapted


def enable_input_grads(model: torch.nn.Module) -> None:
    """Make the (frozen) embedding's output require grad. Megatron's activation recompute is a
    reentrant autograd Function: with no input requiring grad it is skipped in backward, and
    the adapters inside the recomputed layers would get no gradient."""
    embedding = getattr(model, "embedding", None)
    if embedding is not None:
        embedding.register_forward_hook(
            lambda module, inputs, output: (
                output.requires_grad_(True)
                if torch.is_grad_enabled() and not output.requires_grad
                else output
            )
        )


def adapters(model: torch.nn.Module) -> Iterator[LoRAAdapter]:
    return (m for m in model.modules() if isinstance(m, LoRAAdapter))


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run the base model: every adapter off inside the block (the frozen teacher, no weight
    copy)."""
    found = list(adapters(model))
    previous = [a.enabled for a in found]
    for a in found:
        a.enabled = False
    try:
        yield
    finally:
        for a, state in zip(found, previous):
            a.enabled = state


def base_weight_items(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the base model's weights: what an HF checkpoint holds."""
    for name, value in model.state_dict(keep_vars=True).items():
        if value is None or "_extra_state" in name or SUFFIX + "." in name:
            continue
        yield name, value


def merged_weight(model: torch.nn.Module, name: str, value: torch.Tensor) -> torch.Tensor:
    """Base weight ``name`` (``value``) with its adapter, if any, merged in; collective when
    adapted."""
    module_path, _, leaf = name.rpartition(".")
    parent_path, _, linear = module_path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    adapter = parent._modules.get(linear + SUFFIX)
    if leaf != "weight" or adapter is None:
        return value.detach()
    return adapter.merged(value.detach())
