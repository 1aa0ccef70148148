"""How megatron scales our gradients: the per-token-loss contract, every piece of it in one place.

Our loss arrives already divided by the whole step's normaliser (response tokens or sequences,
counted over every micro-batch and DP rank: ``losses/reduction.py``), so the summed partial
losses are the global mean and megatron must neither average nor divide again. Each piece below
is needed for that; change one and the gradients are silently scaled wrong
(``tests/train/test_loss_contract.py`` fails if any one changes):

1. ``model.config.calculate_per_token_loss = True`` (``configure_model``): otherwise megatron's
   ``forward_step`` divides each micro-batch's loss by the count it returns and by the number of
   micro-batches (megatron-core 0.16.1 ``pipeline_parallel/schedules.py``, ``forward_step``).
2. The forward step returns ``(loss, 1, stats)`` (``loss_return``): a three-tuple is megatron's
   per-token form; the count it sums is never used for scaling (3.), and is a 0-d int tensor on
   the loss's device because the schedule adds it into a device tensor.
3. ``finalize_model_grads([ddp], num_tokens=None)`` (``finalize_gradients``): with a count it would
   all-reduce it over DP and scale every gradient by 1/count; with None it only reduces — a DP
   SUM, TP sums of duplicated parameters, the tied embedding's two copies.
4. With ``overlap_grad_reduce``, DDP's ``no_sync`` as the schedule's ``no_sync_func``
   (``configure_model``): the schedule then reduces once, after the last micro-batch, instead of
   after every one (which would add each bucket's partial sum several times).
5. The normaliser (``normalizer``): one count over the whole step, all DP ranks — a per-micro-
   batch mean would overweight short micro-batches.
"""

from __future__ import annotations

import torch

from opsd_megatron.losses.reduction import global_normalizer


def configure_model(model: torch.nn.Module, ddp=None) -> None:
    """Pieces 1 and 4 on the built model's config (``ddp``: its megatron DDP wrapper, once made)."""
    model.config.calculate_per_token_loss = True
    if ddp is not None and ddp.ddp_config.overlap_grad_reduce:
        model.config.no_sync_func = ddp.no_sync


def loss_return(loss: torch.Tensor, stats: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Piece 2: what the forward step's loss function hands megatron's schedule."""
    return loss, torch.ones((), dtype=torch.int, device=loss.device), stats


def finalize_gradients(ddp) -> None:
    """Piece 3, after the last micro-batch's backward: DP reduction (a sum), TP sums of
    duplicated parameters, the tied embedding's copies summed across pipeline stages."""
    from megatron.core.distributed import finalize_model_grads

    finalize_model_grads([ddp], num_tokens=None)


def normalizer(masks_BR, mode: str, dp_group) -> torch.Tensor:
    """Piece 5: the step's count of ``mode`` (``loss.reduction``) over every micro-batch's
    response mask and every DP rank."""
    return global_normalizer(masks_BR, mode, dp_group)
