"""Tiny random HF checkpoints built locally from configs (no hub access), with a local tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 300  # not a multiple of 128: Megatron's padding is exercised at every TP

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

FAMILIES = {
    "qwen3_tied": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(head_dim=24, tie_word_embeddings=True, rope_theta=1e6),
    ),
    "qwen3_untied": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(head_dim=16, tie_word_embeddings=False),
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=False,
            rope_theta=500000.0,
            max_position_embeddings=131072,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
        ),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=False)),
}


def build_tokenizer(out_dir: Path):
    """A word-level tokenizer over digits, operators and a few words, saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = (
        ["<pad>", "<eos>", "<unk>"]
        + [str(i) for i in range(100)]
        + list("+-*/=()")
        + ["the", "answer", "is"]
    )
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.save_pretrained(out_dir)
    return fast


def make_hf_checkpoint(
    out_dir: Path, family: str, seed: int = 0, max_shard_size: str = "40KB"
) -> Path:
    """Random-weight HF model of ``family`` saved as several safetensors shards plus a tokenizer."""
    import transformers

    config_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).float().eval()
    with torch.no_grad():  # HF inits norms to 1: perturb so the norm mapping is actually checked
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    build_tokenizer(out_dir)
    return Path(out_dir)


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def sample_tokens(batch=2, seq=12, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def adapted_model(tp: int, pp: int, hf_dir, seed: int = 1):
    """(arch, model, lora config): this rank's stage of the HF model with LoRA whose B is random, as
    if trained (inside a rank: initialises model parallelism)."""
    from opsd_megatron.config import LoRAConfig
    from opsd_megatron.models import build_gpt_model, read_hf_config
    from opsd_megatron.models.hf_io import HFCheckpointReader
    from opsd_megatron.models.hf_weights import load_hf_weights
    from opsd_megatron.models.lora import apply_lora
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(tp, pp)
    arch, _ = read_hf_config(hf_dir)
    model = build_gpt_model(arch, initialize=False, groups=groups)
    with HFCheckpointReader(hf_dir) as reader:
        load_hf_weights(model, reader, arch)
    lora = LoRAConfig(rank=4, alpha=8.0)
    apply_lora(model, lora)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return arch, model, lora
