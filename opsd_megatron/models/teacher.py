"""The teacher: by default the frozen initial policy, scoring the student's tokens in one pass.

Where its weights live (``teacher.weights``):

* ``lora_base`` (default, with LoRA): the student model itself with every adapter switched off
  (``adapters_disabled``) — no second copy of the weights; base weights are frozen by LoRA.
* ``frozen_copy`` (full-parameter training): a separate copy of the initial model that never
  receives gradients; with ``offload=True`` its weights wait in host memory between teacher
  passes and move to the GPU only for them.

What the teacher's weights track over training (``teacher.update``):
* ``fixed`` — the initial policy (the paper's choice).
* ``ema`` — an exponential moving average of the student's trainable weights (the adapters with
  LoRA, swapped in for the teacher pass; the frozen copy's weights in full-parameter mode).
* ``current`` — the live student weights (adapters on), seen through the teacher prompt.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from opsd_megatron.config import TeacherConfig
from opsd_megatron.data.prompts import PackedBatch
from opsd_megatron.losses.distributions import Hidden, Logits
from opsd_megatron.models.forward import forward_logits
from opsd_megatron.models.lora import adapters, adapters_disabled
from opsd_megatron.models.output_head import hidden_states_out, logits_of, output_weight


class Teacher:
    """The teacher's weights (``teacher.weights``) and how they follow the student
    (``teacher.update``)."""

    def __init__(
        self,
        student: torch.nn.Module,
        cfg: TeacherConfig,
        build_model: Callable[[], torch.nn.Module] | None = None,
    ):
        """``build_model`` makes an empty model of the student's architecture (frozen_copy only;
        megatron modules hold process groups, so they are rebuilt rather than deep-copied)."""
        self.cfg, self.update, self.ema_rate = cfg, cfg.update, cfg.ema_rate
        self.student = student
        self.shadow = None
        if cfg.weights == "lora_base":
            if not any(True for _ in adapters(student)):
                raise ValueError(
                    "teacher.weights='lora_base' needs LoRA adapters on the student "
                    "(use teacher.weights='frozen_copy' for full-parameter training)"
                )
            self.model = None
        else:
            if build_model is None:
                raise ValueError("teacher.weights='frozen_copy' needs build_model to make the copy")
            self.model = build_model().eval()
            self.model.load_state_dict(student.state_dict())
            for p in self.model.parameters():
                p.requires_grad_(False)
            self.device = next(self.model.parameters()).device
            if cfg.offload:
                self.model.to("cpu")
        # The EMA accumulates in fp32 whatever the parameter dtype: (1 - rate) * (w_S - w_T) is
        # far below bf16's resolution (2^-8 |w|) at rate 0.99, so a bf16 average would not move
        # (the problem fp32 master weights solve for the student). A frozen copy in fp32 is its
        # own accumulator; in bf16 it gets an fp32 twin where its weights live.
        self.ema32 = {}
        if self.update == "ema" and self.model is None:
            self.shadow = {
                n: p.detach().to(torch.float32, copy=True)
                for n, p in student.named_parameters()
                if p.requires_grad
            }
        elif self.update == "ema":
            self.ema32 = {
                n: p.data if p.dtype == torch.float32 else p.detach().to(torch.float32, copy=True)
                for n, p in self.model.named_parameters()
            }

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Move an EMA teacher toward the student: w_T <- rate * w_T + (1 - rate) * w_S."""
        if self.update != "ema":
            return
        if self.shadow is not None:
            for n, p in self.student.named_parameters():
                if n in self.shadow:
                    self.shadow[n].lerp_(p.detach().to(torch.float32), 1 - self.ema_rate)
            return
        teacher_params = dict(self.model.named_parameters())
        for n, p in self.student.named_parameters():
            acc = self.ema32[n]
            acc.lerp_(p.detach().to(acc.device, torch.float32), 1 - self.ema_rate)
            if acc is not teacher_params[n].data:
                teacher_params[n].copy_(acc)

    @contextlib.contextmanager
    def _swapped_in_shadow(self):
        params = dict(self.student.named_parameters())
        saved = {n: params[n].detach().clone() for n in self.shadow}
        with torch.no_grad():
            for n, v in self.shadow.items():
                params[n].copy_(v)
        try:
            yield self.student
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)

    @contextlib.contextmanager
    def active(self):
        """The module that acts as the teacher inside the block (weights on the compute device)."""
        if self.update == "current":
            yield self.student
            return
        if self.shadow is not None:
            with self._swapped_in_shadow() as model:
                yield model
            return
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
    def logits(
        self,
        tokens_BT: torch.Tensor,
        position_ids_BT: torch.Tensor | None = None,
        micro_batch_size: int | None = None,
    ) -> torch.Tensor | None:
        """Teacher logits ``[B, T, V/tp]`` (last pipeline stage; None elsewhere), forward-only."""
        return self._forward(tokens_BT, position_ids_BT, micro_batch_size, hidden=False)[0]

    @torch.no_grad()
    def hidden(
        self,
        tokens_BT: torch.Tensor,
        position_ids_BT: torch.Tensor | None = None,
        micro_batch_size: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``loss.fused``: the teacher's final-norm hidden states ``[B, T, H]`` and the output-layer
        shard that makes its logits (detached: the student's own where the teacher is the student
        with adapters off, EMA or live; a frozen copy's own); (None, None) off the last pipeline
        stage."""
        return self._forward(tokens_BT, position_ids_BT, micro_batch_size, hidden=True)

    def view(
        self, packed: PackedBatch, r_max: int, fused: bool, chunk_tokens: int | None = None
    ) -> Logits | Hidden | None:
        """The teacher's next-token distributions at the response positions of ``packed``: logits
        ``[B, R, V/tp]`` (the output layer on ŷ's rows only), or with ``loss.fused`` hidden
        states ``[B, R, H]`` and the output-layer shard; None off the last pipeline stage."""
        states, weight = self.hidden(packed.tokens_BT, packed.position_ids_BT)
        if states is None:
            return None
        rows = packed.response_rows(states, r_max)
        return Hidden(rows, weight, chunk_tokens) if fused else Logits(logits_of(rows, weight))

    def _forward(self, tokens_BT, position_ids_BT, micro_batch_size, hidden: bool):
        with self.active() as model:
            was_training = model.training
            model.eval()
            try:
                if not hidden:
                    return forward_logits(model, tokens_BT, position_ids_BT, micro_batch_size), None
                with hidden_states_out(model):
                    states = forward_logits(model, tokens_BT, position_ids_BT, micro_batch_size)
                # a frozen copy's own shard is kept on the device when the copy is offloaded
                return states, None if states is None else output_weight(model).detach()
            finally:
                model.train(was_training)
