"""Input checks shared by the losses: fail early with a message that names the argument."""

from __future__ import annotations

import torch


def check_floating(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point (logits), got dtype {t.dtype}")
    if t.dim() < 1 or t.shape[-1] == 0:
        raise ValueError(
            f"{name} must have a non-empty last (vocab) dimension, got shape {tuple(t.shape)}"
        )


def check_logits_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    check_floating("student_logits", student_logits)
    check_floating("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must have the same shape (same tokens, same vocab "
            "shard)"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            f"student_logits on {student_logits.device} but teacher_logits on "
            f"{teacher_logits.device}"
        )


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def check_tokens(tokens: torch.Tensor, logits: torch.Tensor) -> None:
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be int64/int32 token ids, got dtype {tokens.dtype}")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} must match the logits' leading shape "
            f"{tuple(logits.shape[:-1])}"
        )
