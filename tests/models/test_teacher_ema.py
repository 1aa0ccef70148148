"""The EMA teacher accumulates in fp32 when the weights are bf16 (issue 27): at rate 0.99 each
step moves the teacher by 1 % of its distance to the student, below bf16's resolution (2^-8 |w|)
for a slowly moving student, so a bf16 average would stand still. A student drifting by 1e-3 per
step from weights near 1: after 200 steps the fp32 reference EMA has moved 0.12; the bf16 teacher
must follow it within bf16 rounding (4e-3, one ulp at 1.1); a bf16 ``lerp_`` moves 0 (checked
with the fp32 accumulator removed). The same for the LoRA path (``lora_base``: the adapters'
fp32 shadow)."""

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


def _lora_student():
    """A bf16 base weight (frozen) and one adapter's A/B (trained): what ``teacher.weights=
    lora_base`` with ``update=ema`` averages — the adapters only, in an fp32 shadow."""
    from opsd_megatron.models.lora import LoRAAdapter

    adapter = LoRAAdapter.__new__(LoRAAdapter)  # the type the teacher looks for, no megatron
    torch.nn.Module.__init__(adapter)
    adapter.lora_A = torch.nn.Parameter(torch.ones(4, 8, dtype=torch.bfloat16))
    adapter.lora_B = torch.nn.Parameter(torch.ones(8, 4, dtype=torch.bfloat16))
    student = torch.nn.Module()
    student.base = torch.nn.Parameter(torch.ones(8, 8, dtype=torch.bfloat16), requires_grad=False)
    student.adapter = adapter
    return student


def test_bf16_lora_ema_teacher_moves_like_the_fp64_one():
    """The LoRA path (issue 45): the same drift on the adapters; inside ``active()`` the student's
    adapters hold the EMA (within one bf16 ulp of the fp64 reference) and the base is untouched;
    afterwards the student's own adapters are back."""
    student = _lora_student()
    teacher = Teacher(student, TeacherConfig(update="ema", ema_rate=RATE, weights="lora_base"))
    names = ("adapter.lora_A", "adapter.lora_B")
    w_student = {n: torch.ones_like(p, dtype=torch.float64) for n, p in student.named_parameters()}
    w_ref = {n: w_student[n].clone() for n in names}
    params = dict(student.named_parameters())
    for _ in range(STEPS):
        for n in names:
            w_student[n] += DRIFT
            with torch.no_grad():
                params[n].copy_(w_student[n])
            w_ref[n] = RATE * w_ref[n] + (1 - RATE) * params[n].double()
        teacher.after_optimizer_step()
    assert min(float((w_ref[n] - 1).abs().min()) for n in names) > 0.1
    before = {n: p.detach().clone() for n, p in params.items()}
    with teacher.active() as model:
        inside = dict(model.named_parameters())
        for n in names:
            got = inside[n].double()
            assert float((got - w_ref[n]).abs().max()) < 4e-3, (n, float(got.mean()))
        assert torch.equal(inside["base"], before["base"])
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n]), f"{n}: the student's own weights are back"
