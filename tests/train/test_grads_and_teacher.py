"""A non-finite gradient never reaches the weights; clipping uses the global norm; EMA and current
teachers track the student as documented."""

from __future__ import annotations

import math

import torch

from opsd_megatron.testing import run_distributed


def _tiny_lora_model(tp):
    from opsd_megatron.models import arch_from_hf_config, build_gpt_model
    from opsd_megatron.models.hf_weights import load_hf_weights
    from opsd_megatron.models.lora import LoRAConfig, apply_lora
    from opsd_megatron.models.random_init import RandomHFWeights
    from opsd_megatron.platform import initialize_model_parallel

    initialize_model_parallel(tp, 1)
    arch = arch_from_hf_config(dict(model_type="qwen3", vocab_size=256, hidden_size=32, intermediate_size=64,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    model = build_gpt_model(arch, initialize=False)
    load_hf_weights(model, RandomHFWeights(arch, 0, std=0.3), arch)
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0))
    return model


def _grad_probe(tp):
    from opsd_megatron.train.grads import clip_and_check, reduce_gradients

    model = _tiny_lora_model(tp)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.ones_like(p)
    reduce_gradients(model)
    norm, finite = clip_and_check(model, max_norm=1.0)
    total = sum(p.numel() for p in params)  # local; the global count is total * tp (all sharded)
    clipped = math.sqrt(sum(float(p.grad.square().sum()) for p in params))
    params[0].grad[0] = float("nan")
    _, finite_after_nan = clip_and_check(model, max_norm=1.0)
    return norm, finite, total, clipped, finite_after_nan


def test_clip_uses_the_global_norm_and_flags_nan():
    for tp in (1, 2):
        for norm, finite, local_count, clipped, finite_after_nan in run_distributed(_grad_probe, tp, tp):
            assert finite and not finite_after_nan
            assert abs(norm - math.sqrt(local_count * tp)) < 1e-6, "every LoRA param is TP-sharded"
            assert abs(clipped * math.sqrt(tp) - 1.0) < 1e-5, "clipped to a global norm of 1"


def _teacher_probe():
    from opsd_megatron.models.forward import forward_logits
    from opsd_megatron.models.teacher import Teacher, TeacherConfig

    model = _tiny_lora_model(1)
    tokens = torch.randint(0, 256, (2, 6), generator=torch.Generator().manual_seed(0))
    fixed = Teacher(model, TeacherConfig(), update="fixed")
    ema = Teacher(model, TeacherConfig(), update="ema", ema_rate=0.5)
    current = Teacher(model, TeacherConfig(), update="current")
    base = fixed.logits(tokens)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.5)  # as if the optimizer had stepped
    ema.after_optimizer_step()
    student = forward_logits(model, tokens)
    b_names = [n for n, _ in model.named_parameters() if "lora_B" in n]
    shadow_ok = all(torch.allclose(ema.shadow[n], torch.full_like(ema.shadow[n], 0.25)) for n in b_names)
    return (torch.equal(fixed.logits(tokens), base), torch.equal(current.logits(tokens), student),
            not torch.equal(ema.logits(tokens), base) and not torch.equal(ema.logits(tokens), student),
            shadow_ok, torch.equal(forward_logits(model, tokens), student))


def test_teacher_updates():
    fixed_is_base, current_is_student, ema_between, shadow_is_average, student_restored = \
        run_distributed(_teacher_probe, 1)[0]
    assert fixed_is_base and current_is_student and ema_between and shadow_is_average
    assert student_restored, "the EMA teacher pass must put the student's weights back"
