"""LoRA on TP-sharded megatron linears, the frozen teacher, merged export and adapter
checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from opsd_megatron.testing import run_distributed
from tests.models.fixtures import VOCAB, hf_logits, make_hf_checkpoint, sample_tokens

STEPS = 3


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("hf") / "m", "qwen3_untied")


def _train(tp, hf_dir, export_dir=None, adapter_dir=None):
    """Load the HF base, add LoRA, take STEPS AdamW steps on a JSD loss against the base
    (teacher)."""
    from megatron.core import parallel_state as ps

    from opsd_megatron.config import LoRAConfig, TeacherConfig
    from opsd_megatron.losses import vocab_parallel_jsd
    from opsd_megatron.models import build_gpt_model, read_hf_config
    from opsd_megatron.models.checkpoint import save_model_checkpoint
    from opsd_megatron.models.forward import forward_logits
    from opsd_megatron.models.hf_io import HFCheckpointReader
    from opsd_megatron.models.hf_weights import export_hf_weights, load_hf_weights
    from opsd_megatron.models.lora import apply_lora
    from opsd_megatron.models.teacher import Teacher
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(tp, 1, seed=3)
    arch, raw = read_hf_config(hf_dir)
    model = build_gpt_model(arch, initialize=False, groups=groups)
    with HFCheckpointReader(hf_dir) as reader:
        load_hf_weights(model, reader, arch)
    tokens = sample_tokens()
    base = forward_logits(model, tokens)
    cfg = LoRAConfig(rank=8, alpha=16.0)
    adapted = apply_lora(model, cfg)
    at_init = forward_logits(model, tokens)
    teacher = Teacher(model, TeacherConfig())
    target = teacher.logits(torch.roll(tokens, 1, dims=1))

    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    group = ps.get_tensor_model_parallel_group()
    for _ in range(STEPS):
        optim.zero_grad()
        model.train()
        logits = model(tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None)
        loss = vocab_parallel_jsd(logits, target, beta=0.5, vocab_size=VOCAB, group=group).mean()
        loss.backward()
        optim.step()
    with_grad = sorted(n for n, p in model.named_parameters() if p.grad is not None)
    trained = forward_logits(model, tokens)
    off = teacher.logits(tokens)
    if export_dir:
        export_hf_weights(model, arch, export_dir)
        if torch.distributed.get_rank() == 0:
            (export_dir / "config.json").write_text(json.dumps(raw))
    if adapter_dir:
        save_model_checkpoint(
            model, adapter_dir, arch, raw, adapters_only=True, extra={"lora": vars(cfg)}
        )
    return dict(
        rank=ps.get_tensor_model_parallel_rank(),
        base=base,
        at_init=at_init,
        trained=trained,
        off=off,
        with_grad=with_grad,
        n_adapted=len(adapted),
        loss=loss.item(),
    )


def _full(results, key):
    return torch.cat([r[key] for r in sorted(results, key=lambda r: r["rank"])], dim=-1)[
        ..., :VOCAB
    ]


def test_lora_tp2_equals_tp1_and_teacher_is_the_untouched_base(hf_dir, tmp_path):
    (tmp_path / "export").mkdir()
    tp1 = run_distributed(_train, 1, 1, hf_dir, tmp_path / "export")
    tp2 = run_distributed(_train, 2, 2, hf_dir)
    for res in (tp1, tp2):
        assert res[0]["n_adapted"] == 2 * 4, (
            "q,k,v,o,gate,up,down on 2 layers: 4 fused linears each"
        )
        assert (
            all(".lora_" in n or "_lora." in n for n in res[0]["with_grad"]) and res[0]["with_grad"]
        )
        assert torch.equal(_full(res, "at_init"), _full(res, "base")), (
            "B=0: output equals base at init"
        )
        assert torch.equal(_full(res, "off"), _full(res, "base")), (
            "adapters off == untouched base, exactly"
        )
        assert (_full(res, "trained") - _full(res, "base")).abs().max() > 1e-3, (
            "training changed the student"
        )
    assert abs(tp1[0]["loss"] - tp2[0]["loss"]) <= 1e-5
    assert (_full(tp1, "trained") - _full(tp2, "trained")).abs().max() <= 1e-4

    # merged export loads in HF and reproduces the adapted megatron model
    merged = hf_logits(tmp_path / "export", sample_tokens())
    assert (merged - _full(tp1, "trained")).abs().max() <= 1e-4


def _load_adapters(tp, hf_dir, adapter_dir):
    from megatron.core import parallel_state as ps

    from opsd_megatron.config import LoRAConfig
    from opsd_megatron.models import build_gpt_model, read_hf_config
    from opsd_megatron.models.checkpoint import load_model_checkpoint, read_checkpoint_metadata
    from opsd_megatron.models.forward import forward_logits
    from opsd_megatron.models.hf_io import HFCheckpointReader
    from opsd_megatron.models.hf_weights import load_hf_weights
    from opsd_megatron.models.lora import apply_lora
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(
        tp, 1, seed=99
    )  # a different seed: A must come from the checkpoint
    arch, _ = read_hf_config(hf_dir)
    model = build_gpt_model(arch, initialize=False, groups=groups)
    with HFCheckpointReader(hf_dir) as reader:
        load_hf_weights(model, reader, arch)
    _, meta = read_checkpoint_metadata(adapter_dir)
    apply_lora(model, LoRAConfig(**meta["lora"]))
    load_model_checkpoint(model, adapter_dir, adapters_only=True)
    return dict(
        rank=ps.get_tensor_model_parallel_rank(), trained=forward_logits(model, sample_tokens())
    )


def test_adapters_saved_at_tp2_load_alone_at_tp1(hf_dir, tmp_path):
    (tmp_path / "adapters").mkdir()
    tp2 = run_distributed(_train, 2, 2, hf_dir, None, tmp_path / "adapters")
    files = {p.name for p in (tmp_path / "adapters").iterdir()}
    assert "opsd_model.json" in files
    size = sum(p.stat().st_size for p in (tmp_path / "adapters").iterdir())
    assert size < 200_000, "an adapter checkpoint holds the adapters, not the base model"
    tp1 = run_distributed(_load_adapters, 1, 1, hf_dir, tmp_path / "adapters")
    assert (_full(tp1, "trained") - _full(tp2, "trained")).abs().max() <= 1e-5


def _full_param_teacher():
    from opsd_megatron.config import TeacherConfig
    from opsd_megatron.models import arch_from_hf_config, build_gpt_model
    from opsd_megatron.models.teacher import Teacher
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(1, 1)
    arch = arch_from_hf_config(
        dict(
            model_type="qwen3",
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    model = build_gpt_model(arch, groups=groups)
    with pytest.raises(ValueError, match="needs LoRA adapters"):
        Teacher(model, TeacherConfig(weights="lora_base"))
    teacher = Teacher(
        model,
        TeacherConfig(weights="frozen_copy", offload=True),
        build_model=lambda: build_gpt_model(arch, initialize=False, groups=groups),
    )
    tokens = sample_tokens()
    before = teacher.logits(tokens)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(
        tokens, torch.arange(tokens.shape[1]).expand_as(tokens), attention_mask=None
    ).square().mean().backward()
    optim.step()
    assert all(p.grad is None for p in teacher.model.parameters())
    assert all(not p.requires_grad for p in teacher.model.parameters())
    return torch.equal(teacher.logits(tokens), before)


def test_full_parameter_teacher_is_a_frozen_copy():
    assert run_distributed(_full_param_teacher, 1)[0]
