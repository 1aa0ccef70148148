"""The teacher: the frozen initial policy, scoring the student's tokens in one forward pass.

* ``lora_base`` (default, with LoRA): the student model itself with every adapter switched off
  (``adapters_disabled``) — no second copy of the weights; base weights are frozen by LoRA.
* ``frozen_copy`` (full-parameter training): a separate copy of the initial model that never
  receives gradients; with ``offload=True`` its weights wait in host memory between teacher
  passes and move to the GPU only for them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from opsd_megatron.models.forward import forward_logits
from opsd_megatron.models.lora import adapters, adapters_disabled

KINDS = ("lora_base", "frozen_copy")


@dataclass
class TeacherConfig:
    kind: str = "lora_base"
    offload: bool = False  # frozen_copy only: keep the teacher in host memory between passes

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"teacher.kind must be one of {KINDS}, got {self.kind!r}")


class Teacher:
    def __init__(self, student: torch.nn.Module, cfg: TeacherConfig,
                 build_model: Callable[[], torch.nn.Module] | None = None):
        """``build_model`` makes an empty model of the student's architecture (frozen_copy only;
        megatron modules hold process groups, so they are rebuilt rather than deep-copied)."""
        self.cfg = cfg
        self.student = student
        if cfg.kind == "lora_base":
            if not any(True for _ in adapters(student)):
                raise ValueError("teacher.kind='lora_base' needs LoRA adapters on the student "
                                 "(use teacher.kind='frozen_copy' for full-parameter training)")
            self.model = None
        else:
            if build_model is None:
                raise ValueError("teacher.kind='frozen_copy' needs build_model to make the copy")
            self.model = build_model().eval()
            self.model.load_state_dict(student.state_dict())
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.device = next(self.model.parameters()).device
            if cfg.offload:
                self.model.to("cpu")

    @contextlib.contextmanager
    def active(self):
        """The module that acts as the teacher inside the block (weights on the compute device)."""
        if self.model is None:
            with adapters_disabled(self.student):
                yield self.student
            return
        if self.cfg.offload:
            self.model.to(self.device)
        try:
            yield self.model
        finally:
            if self.cfg.offload:
                self.model.to("cpu")

    @torch.no_grad()
    def logits(self, tokens_BT: torch.Tensor, position_ids_BT: torch.Tensor | None = None,
               micro_batch_size: int | None = None) -> torch.Tensor | None:
        """Teacher logits ``[B, T, V/tp]`` (last pipeline stage; None elsewhere), forward-only."""
        with self.active() as model:
            was_training = model.training
            model.eval()
            try:
                return forward_logits(model, tokens_BT, position_ids_BT, micro_batch_size)
            finally:
                model.train(was_training)
