"""The EMA teacher accumulates in fp32 when the weights are bf16 (issue 27): at rate 0.99 each
step moves the teacher by 1 % of its distance to the student, below bf16's resolution (2^-8 |w|)
for a slowly moving student, so a bf16 average would stand still. A student drifting by 1e-3 per
step from weights near 1: after 200 steps the fp32 reference EMA has moved 0.12; the bf16 teacher
must follow it within bf16 rounding (4e-3, one ulp at 1.1); a bf16 ``lerp_`` moves 0 (checked
with the fp32 accumulator removed)."""

from __future__ import annotations

import torch

from opsd_megatron.config import TeacherConfig
from opsd_megatron.models.teacher import Teacher

RATE, STEPS, DRIFT = 0.99, 200, 1e-3


def test_bf16_ema_teacher_moves_like_the_fp32_one():
    student = torch.nn.Linear(8, 8, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        student.weight.fill_(1.0)
    teacher = Teacher(
        student,
        TeacherConfig(update="ema", ema_rate=RATE, weights="frozen_copy"),
        build_model=lambda: torch.nn.Linear(8, 8, bias=False).to(torch.bfloat16),
    )
    w_student, w_ref = torch.ones(8, 8, dtype=torch.float64), torch.ones(8, 8, dtype=torch.float64)
    for _ in range(STEPS):
        w_student += DRIFT
        with torch.no_grad():
            student.weight.copy_(w_student)
        w_ref = RATE * w_ref + (1 - RATE) * student.weight.double()
        teacher.after_optimizer_step()
    moved = float((w_ref - 1).abs().min())
    assert moved > 0.1, moved
    got = teacher.model.weight.double()
    assert teacher.model.weight.dtype == torch.bfloat16
    assert float((got - w_ref).abs().max()) < 4e-3, (float(got.mean()), float(w_ref.mean()))
