"""The fused path's model side (``loss.fused=true``): megatron's GPT model stopped at the final
norm, so the last pipeline stage hands the loss hidden states ``[B, T, H]`` and the loss projects
them through the output layer's vocab shard one token chunk at a time (``losses/linear_jsd.py``).

Inside ``hidden_states_out(model)`` the output layer's forward is replaced by the TP-region mapping
its own ColumnParallelLinear applies to its input (megatron-core 0.16–0.19,
``tensor_parallel/layers.py``): ``gather_from_sequence_parallel_region`` with sequence parallelism
(the full sequence on every TP rank; backward reduce-scatters), else
``copy_to_tensor_model_parallel_region`` (identity; backward all-reduces). Either way the
hidden-state gradient of each vocab shard is summed over TP by megatron, as for its own logits,
and the GPT model's ``[s, b, h] -> [b, s, h]`` transpose still applies.
"""

from __future__ import annotations

import contextlib

import torch


def gpt_of(model: torch.nn.Module) -> torch.nn.Module:
    """The GPT module under megatron's wrappers (DDP, Float16Module: ``.module``)."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def output_weight(model: torch.nn.Module) -> torch.Tensor | None:
    """This rank's ``[V/tp, H]`` output-layer shard (the word embeddings when tied); None off the
    last pipeline stage."""
    gpt = gpt_of(model)
    if not getattr(gpt, "post_process", False):
        return None
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    layer = gpt.output_layer
    if not isinstance(getattr(layer, "weight", None), torch.Tensor):
        raise ValueError(
            f"loss.fused needs a plain output layer (found {type(layer).__name__} without a "
            "weight): use loss.fused=false"
        )
    return layer.weight


def logits_of(hidden_BRH: torch.Tensor, weight_VH: torch.Tensor) -> torch.Tensor:
    """The output layer on the rows that need logits: ``[B, R, V/tp]`` from final-norm hidden
    states inside ``hidden_states_out`` (its TP mapping already applied) — the matmul megatron's
    ``ColumnParallelLinear`` does, on the response positions only: the prompt's positions cost
    the output layer's GEMMs forward and backward and are never read."""
    return torch.matmul(hidden_BRH, weight_VH.t())


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous. The GPT model's final transpose hands
    back a strided gradient, and megatron's ``_reduce`` (0.16) all-reduces ``grad.contiguous()``
    — a copy — and returns the unreduced original: without this the TP sum is silently lost."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def contiguous_logit_grads(model: torch.nn.Module) -> None:
    """The logits' gradient reaches the output layer strided (the model's final [s, b] -> [b, s]
    transpose), and megatron's linear backward computes ``grad.matmul(W)`` on it, which torch
    runs as a batched matmul over a broadcast weight: 1.3 s per SmolLM2 micro-batch of 4 x 256
    tokens on 2 CPU threads, against ~0.1 s once the gradient is contiguous (measured). Made
    contiguous here, once, on the last stage."""
    layer = getattr(model, "output_layer", None)
    if layer is None:
        return

    def hook(module, inputs, output):
        if not torch.is_grad_enabled():
            return output
        out, bias = output
        return _ContiguousGrad.apply(out), bias

    layer.register_forward_hook(hook)


@contextlib.contextmanager
def hidden_states_out(model: torch.nn.Module):
    """Inside the block, ``model(tokens, positions)`` returns final-norm hidden states on the last
    stage instead of logits (module doc)."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    gpt = gpt_of(model)
    layer = getattr(gpt, "output_layer", None) if getattr(gpt, "post_process", False) else None
    if layer is None:
        yield
        return
    group = getattr(layer, "tp_group", None)

    def forward(hidden_states, weight=None, runtime_gather_output=None):
        if layer.sequence_parallel:
            out = gather_from_sequence_parallel_region(
                hidden_states, tensor_parallel_output_grad=True, group=group
            )
        else:
            out = copy_to_tensor_model_parallel_region(hidden_states, group=group)
        return _ContiguousGrad.apply(out), None

    layer.forward = forward
    try:
        yield
    finally:
        del layer.forward
