"""LoRA adapters exported as a PEFT directory at TP2xPP2: HF transformers + peft loading the base
checkpoint and that adapter give the adapted Megatron model's logits (what vLLM serves in
``rollout.vllm.lora_mode=adapter``)."""

from __future__ import annotations

import json

import torch

from opsd_megatron.testing import run_distributed
from tests.models.fixtures import VOCAB, adapted_model, make_hf_checkpoint, sample_tokens


def _export(tp, pp, hf_dir, out_dir):
    from opsd_megatron.models.forward import forward_logits
    from opsd_megatron.models.peft_export import save_peft_adapter

    arch, model, lora = adapted_model(tp, pp, hf_dir, seed=7)
    save_peft_adapter(model, arch, lora, out_dir, base_model=str(hf_dir))
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank(), forward_logits(model, sample_tokens())


def test_peft_adapter_matches_the_adapted_megatron_model(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf_dir = make_hf_checkpoint(tmp_path / "hf", "qwen3_untied")
    out = tmp_path / "adapter"
    results = run_distributed(_export, 4, 2, 2, hf_dir, out)
    megatron = torch.cat(
        [lg for _, lg in sorted((r for r in results if r[1] is not None), key=lambda r: r[0])],
        dim=-1,
    )[..., :VOCAB]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8.0
    assert set(config["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    base = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    with torch.no_grad():
        plain = base(sample_tokens()).logits
        adapted = PeftModel.from_pretrained(base, out).eval()(sample_tokens()).logits
    assert (plain - megatron).abs().max() > 1e-3, "the adapters change the logits"
    assert (adapted - megatron).abs().max() <= 1e-4, (adapted - megatron).abs().max()
