r"""Turning per-token losses into the batch loss, correctly under micro-batching and data
parallelism.

Two normalisations:

* ``"sequence_mean"`` (paper eq. 6/8): mean over each sequence's response tokens, then mean over
  sequences — every rollout weighs the same whatever its length. Sequences with no response
  token are not counted.
* ``"token_mean"``: sum over all response tokens of the global batch / their number.

A global batch is split into micro-batches on each of several data-parallel ranks. Each
micro-batch contributes ``partial_loss(...) = Σ (its share) / global_normalizer``, where the
normaliser (response tokens, or sequences) is counted once over the whole global batch with
``global_normalizer``. Summing the contributions over micro-batches and DP ranks (gradient
accumulation plus a DP all-reduce with SUM) then gives exactly the global mean; a per-micro-batch
mean would overweight short micro-batches. If the DP gradient reduction averages instead of
summing (Megatron DDP's default), multiply the contribution by the DP size.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist

MODES = ("sequence_mean", "token_mean")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"loss reduction must be one of {MODES}, got {mode!r}")


def _check_mask(per_token_BT: torch.Tensor, mask_BT: torch.Tensor) -> None:
    if per_token_BT.shape != mask_BT.shape or per_token_BT.dim() != 2:
        raise ValueError(
            f"per-token loss {tuple(per_token_BT.shape)} and mask {tuple(mask_BT.shape)} "
            f"must both be [batch, tokens]"
        )


def local_count(mask_BT: torch.Tensor, mode: str) -> torch.Tensor:
    """What ``mode`` normalises by, counted on one micro-batch: response tokens or non-empty
    sequences."""
    _check_mode(mode)
    if mode == "token_mean":
        return mask_BT.sum().to(torch.float64)
    return (mask_BT.sum(dim=1) > 0).sum().to(torch.float64)


def global_normalizer(masks_BT: Iterable[torch.Tensor], mode: str, dp_group=None) -> torch.Tensor:
    """The global batch's count over all local micro-batches and all DP ranks (at least 1)."""
    masks_BT = list(masks_BT)
    device = masks_BT[0].device if masks_BT else None  # the collective runs where the masks are
    total = sum(
        (local_count(m, mode) for m in masks_BT),
        torch.zeros((), dtype=torch.float64, device=device),
    )
    if dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(total, group=dp_group)
    return total.clamp(min=1.0)


def partial_loss(
    per_token_BT: torch.Tensor, mask_BT: torch.Tensor, mode: str, normalizer: torch.Tensor | float
) -> torch.Tensor:
    """This micro-batch's contribution to the global-batch loss (see module doc)."""
    _check_mode(mode)
    _check_mask(per_token_BT, mask_BT)
    mask = mask_BT.to(per_token_BT.dtype)
    # where() rather than a product, so NaN/inf at masked positions never leak into the sum.
    masked = torch.where(mask_BT.bool(), per_token_BT, torch.zeros_like(per_token_BT))
    if mode == "token_mean":
        total = masked.sum()
    else:
        total = (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).sum()
    return total / torch.as_tensor(normalizer, dtype=total.dtype, device=total.device)


def masked_sum_count(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """[Σ values over the masked positions, their number] (float64, detached): what the trainer
    adds up over micro-batches and DP ranks to log token means, however rows are grouped."""
    _check_mask(values_BT, mask_BT)
    keep = mask_BT.bool()
    total = torch.where(keep, values_BT.detach(), torch.zeros_like(values_BT)).sum()
    return torch.stack([total.double(), keep.sum().double()])


def masked_mean(values_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Plain mean over masked positions of one tensor (for logging diagnostics such as entropy)."""
    _check_mask(values_BT, mask_BT)
    keep = mask_BT.bool()
    return torch.where(keep, values_BT, torch.zeros_like(values_BT)).sum() / keep.sum().clamp(min=1)
