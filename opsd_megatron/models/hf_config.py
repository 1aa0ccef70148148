"""Read a Hugging Face ``config.json`` into the architecture facts megatron-core needs.

Supported: the Qwen3, Qwen2/Qwen2.5 and Llama-3.x families (RMSNorm, SwiGLU, GQA, RoPE; Qwen3's
per-head q/k RMSNorm; Qwen2's q/k/v biases; Llama-3 RoPE scaling; tied or untied embeddings).
Anything else fails here, naming the file and the field, before a model is built.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from opsd_megatron.errors import PathError, UserError

FAMILIES = {"qwen3": "qwen3", "qwen2": "qwen2", "llama": "llama"}
VOCAB_PAD_MULTIPLE = 128  # Megatron pads the vocabulary to a multiple of 128 * tp


class UnsupportedConfigError(UserError):
    """The HF config describes an architecture or feature this project does not build."""


@dataclass(frozen=True)
class ArchSpec:
    family: str
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_scaling_factor: float | None = None  # Llama-3 style scaling; None: plain RoPE
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str = "bfloat16"

    def padded_vocab_size(self, tp: int) -> int:
        multiple = VOCAB_PAD_MULTIPLE * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def check_layout(self, tp: int, pp: int) -> None:
        """Raise if TP does not divide the heads/KV heads or PP does not divide the layers."""
        for field, value in (
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_query_groups),
        ):
            if value % tp:
                raise UnsupportedConfigError(
                    f"tensor_model_parallel_size={tp} does not divide {field}={value}"
                )
        if self.num_layers % pp:
            raise UnsupportedConfigError(
                f"pipeline_model_parallel_size={pp} does not divide "
                f"num_hidden_layers={self.num_layers}"
            )

    def kv_cache_bytes(self, tp: int, layers: int, batch: int, max_len: int, elem: int) -> int:
        """A KV cache on one TP rank: per layer a key and a value buffer of ``max_len x batch x
        kv_heads/tp x head_dim`` elements of ``elem`` bytes (the Megatron sampler's, and vLLM's
        paged one without its block rounding)."""
        kv_heads = max(1, self.num_query_groups // tp)
        return 2 * layers * max_len * batch * kv_heads * self.head_dim * elem

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _get(cfg: dict, key: str, where: str, default=...):
    if key in cfg:
        return cfg[key]
    if default is ...:
        raise UnsupportedConfigError(f"{where}: missing required field '{key}'")
    return default


def _rope(cfg: dict, where: str) -> tuple[float, float | None]:
    """(theta, llama3 factor). transformers 5 nests these in rope_parameters; older files do not."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or params
    theta = float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise UnsupportedConfigError(
            f"{where}: rope_scaling.rope_type='{rope_type}' is not supported "
            f"(supported: default, llama3)"
        )
    # megatron-core's llama3 scaling hard-codes these three values.
    for key, want in (
        ("low_freq_factor", 1.0),
        ("high_freq_factor", 4.0),
        ("original_max_position_embeddings", 8192),
    ):
        if float(scaling.get(key, want)) != float(want):
            raise UnsupportedConfigError(
                f"{where}: rope_scaling.{key}={scaling.get(key)} is not supported "
                f"(megatron-core's llama3 scaling uses {want})"
            )
    return theta, float(_get(scaling, "factor", f"{where}: rope_scaling"))


def arch_from_hf_config(cfg: dict, where: str = "config.json") -> ArchSpec:
    """Validate an HF config dict and return its :class:`ArchSpec`; errors name ``where`` and the
    field."""
    model_type = _get(cfg, "model_type", where)
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedConfigError(
            f"{where}: model_type='{model_type}' is not supported "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedConfigError(
            f"{where}: hidden_act='{act}' is not supported (SwiGLU needs 'silu')"
        )
    if cfg.get("mlp_bias"):
        raise UnsupportedConfigError(f"{where}: mlp_bias=true is not supported")
    if cfg.get("use_sliding_window"):
        raise UnsupportedConfigError(f"{where}: use_sliding_window=true is not supported")
    if family == "llama" and cfg.get("attention_bias"):
        raise UnsupportedConfigError(f"{where}: attention_bias=true is not supported for llama")
    if family == "qwen3" and cfg.get("attention_bias"):
        raise UnsupportedConfigError(f"{where}: attention_bias=true is not supported for qwen3")
    if cfg.get("num_experts") or cfg.get("num_local_experts"):
        raise UnsupportedConfigError(f"{where}: mixture-of-experts configs are not supported")
    hidden = int(_get(cfg, "hidden_size", where))
    heads = int(_get(cfg, "num_attention_heads", where))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    if heads % kv_heads:
        raise UnsupportedConfigError(
            f"{where}: num_key_value_heads={kv_heads} does not divide num_attention_heads={heads}"
        )
    theta, factor = _rope(cfg, where)
    return ArchSpec(
        family=family,
        vocab_size=int(_get(cfg, "vocab_size", where)),
        hidden_size=hidden,
        ffn_hidden_size=int(_get(cfg, "intermediate_size", where)),
        num_layers=int(_get(cfg, "num_hidden_layers", where)),
        num_attention_heads=heads,
        num_query_groups=kv_heads,
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        rope_scaling_factor=factor,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
    )


def read_hf_config(hf_dir: str | Path) -> tuple[ArchSpec, dict]:
    """Parse ``hf_dir/config.json``; returns the spec and the raw dict (kept for export)."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise PathError(f"{path}: no config.json in the Hugging Face directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UnsupportedConfigError(f"{path}: not valid JSON ({err})") from err
    return arch_from_hf_config(raw, str(path)), raw
