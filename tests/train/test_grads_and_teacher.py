"""Through megatron's DDP and optimizer: a non-finite gradient never reaches the weights (the step
is skipped), clipping uses the global norm over TP ranks; EMA and current teachers track the student
as documented."""

from __future__ import annotations

import math

import torch

from opsd_megatron.testing import run_distributed


def _tiny_lora_model(tp):
    from opsd_megatron.config import LoRAConfig
    from opsd_megatron.models import arch_from_hf_config, build_gpt_model
    from opsd_megatron.models.hf_weights import load_hf_weights
    from opsd_megatron.models.lora import apply_lora
    from opsd_megatron.models.random_init import RandomHFWeights
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(tp, 1)
    arch = arch_from_hf_config(
        dict(
            model_type="qwen3",
            vocab_size=256,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    model = build_gpt_model(arch, initialize=False, groups=groups)
    load_hf_weights(model, RandomHFWeights(arch, 0, std=0.3), arch)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    return model


def _grad_probe(tp):
    from opsd_megatron.config import load_config
    from opsd_megatron.train.optimizer import optimizer_step, wrap_and_build, zero_grads
    from tests.train.tiny import RECIPE

    model = _tiny_lora_model(tp)
    cfg = load_config(RECIPE, ["optimizer.lr=0.1", "optimizer.grad_clip=1.0"])
    ddp, opt = wrap_and_build(cfg, model, torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)  # local; the global count is total * tp (all sharded)

    def step(fill):
        zero_grads(ddp, opt)
        for p in params:
            p.main_grad.fill_(fill)
        before = [p.detach().clone() for p in params]
        norm, applied = optimizer_step(opt, 1.0)
        moved = max(float((p - b).abs().max()) for p, b in zip(params, before))
        return norm, applied, moved

    ones = step(1.0)
    nan = step(float("nan"))
    return ones, nan, total


def test_clip_uses_the_global_norm_and_a_nan_step_is_skipped():
    for tp in (1, 2):
        for (norm, applied, moved), (_, nan_applied, nan_moved), local_count in run_distributed(
            _grad_probe, tp, tp
        ):
            assert applied and moved > 0
            assert abs(norm - math.sqrt(local_count * tp)) < 1e-4 * norm, (
                "every LoRA param is TP-sharded"
            )
            assert not nan_applied and nan_moved == 0.0, (
                "a NaN gradient leaves the weights untouched"
            )


def _teacher_probe():
    from opsd_megatron.config import TeacherConfig
    from opsd_megatron.models.forward import forward_logits
    from opsd_megatron.models.teacher import Teacher

    model = _tiny_lora_model(1)
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    fixed = Teacher(model, TeacherConfig(update="fixed"))
    ema = Teacher(model, TeacherConfig(update="ema", ema_rate=0.8))  # rate != 1 - rate
    current = Teacher(model, TeacherConfig(update="current"))
    base = fixed.logits(tokens)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)  # as if the optimizer had stepped
    ema.after_optimizer_step()
    student = forward_logits(model, tokens)
    b_names = [n for n, _ in model.named_parameters() if "lora_B" in n]
    shadow_ok = all(
        torch.allclose(ema.shadow[n], torch.full_like(ema.shadow[n], 0.2 * 0.5)) for n in b_names
    )
    return (
        torch.equal(fixed.logits(tokens), base),
        torch.equal(current.logits(tokens), student),
        not torch.equal(ema.logits(tokens), base) and not torch.equal(ema.logits(tokens), student),
        shadow_ok,
        torch.equal(forward_logits(model, tokens), student),
    )


def test_teacher_updates():
    fixed_is_base, current_is_student, ema_between, shadow_is_average, student_restored = (
        run_distributed(_teacher_probe, 1)[0]
    )
    assert fixed_is_base and current_is_student and ema_between and shadow_is_average
    assert student_restored, "the EMA teacher pass must put the student's weights back"
