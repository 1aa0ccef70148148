"""Gradient bookkeeping when training with a plain torch optimizer on megatron modules.

* Data parallel: every DP rank's loss is a partial sum of the global mean, so gradients are
  SUMMED over the DP group (not averaged).
* Tensor parallel: parameters duplicated on TP ranks whose gradients differ per rank (Qwen3's
  q/k layernorm acts on each rank's own heads; with sequence parallelism every norm sees only its
  rank's sequence shard: marked ``sequence_parallel``) are summed over the TP group; without
  sequence parallelism the pre-norms already receive identical gradients through megatron's TP regions.
* Tied embeddings split across pipeline stages: the two copies' gradients are summed over the
  embedding group so both copies take the same update.
* Clipping uses the global norm over all model-parallel ranks, each TP-duplicated parameter counted
  once (tied embeddings split over stages count twice: a slight over-estimate); a non-finite norm
  skips the update (counted by the caller).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

TP_SUMMED = ("q_layernorm", "k_layernorm")


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def reduce_gradients(model) -> None:
    from megatron.core import parallel_state as ps

    params = _trainable(model)
    for _, p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if ps.get_data_parallel_world_size() > 1:
        for _, p in params:
            dist.all_reduce(p.grad, group=ps.get_data_parallel_group())
    if ps.get_tensor_model_parallel_world_size() > 1:
        for n, p in params:
            if any(k in n for k in TP_SUMMED) or getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
    if ps.get_pipeline_model_parallel_world_size() > 1 and ps.is_rank_in_embedding_group():
        shared = getattr(model, "shared_embedding_or_output_weight", lambda: None)()
        if shared is not None and getattr(model, "share_embeddings_and_output_weights", False) and shared.requires_grad:
            dist.all_reduce(shared.grad, group=ps.get_embedding_group())


def _counted_once(p) -> bool:
    """TP-sharded params count on every rank; duplicated ones only on TP rank 0."""
    from megatron.core import parallel_state as ps

    return getattr(p, "tensor_model_parallel", False) or ps.get_tensor_model_parallel_rank() == 0


def clip_and_check(model, max_norm: float) -> tuple[float, bool]:
    """Clip to ``max_norm`` (global L2 over model-parallel ranks); returns (norm, finite)."""
    from megatron.core import parallel_state as ps

    params = [p for _, p in _trainable(model)]
    sq = torch.zeros((), dtype=torch.float64)
    for p in params:
        if _counted_once(p):
            sq += p.grad.double().square().sum()
    dist.all_reduce(sq, group=ps.get_model_parallel_group())
    norm = math.sqrt(sq.item()) if math.isfinite(sq.item()) else float("nan")
    finite = math.isfinite(norm)
    if finite and max_norm > 0 and norm > max_norm:
        scale = max_norm / (norm + 1e-6)
        for p in params:
            p.grad.mul_(scale)
    return norm, finite
