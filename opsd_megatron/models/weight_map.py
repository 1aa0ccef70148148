"""HF <-> megatron-core weight maps for the Qwen3/Qwen2/Llama families, per tensor and per TP rank.

Each megatron parameter (named with its *global* layer index) has a :class:`Rule`: which HF
tensors make it and how it is split over tensor-parallel ranks:

* ``replicated`` — norms: every TP rank holds the whole tensor.
* ``column`` / ``row`` — split along dim 0 / dim 1 (ColumnParallel / RowParallel linears).
* ``vocab`` — embedding / output layer: rows padded with zeros to a multiple of 128·tp, then split.
* ``qkv`` — q, k, v projections (and biases) fused per query group: megatron's row layout is, for
  each KV group g, [the group's q heads; k_g; v_g]. A TP rank holds a contiguous run of groups, so
  its shard is built from the matching contiguous rows of q, k and v.
* ``glu`` — gate and up projections: each TP rank holds [gate chunk; up chunk].

Everything a rank needs is a contiguous slice of each HF tensor, so loading can read exactly
those bytes from safetensors (``source_slices``); ``combine`` and ``split`` are the local math.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from opsd_megatron.models.hf_config import ArchSpec

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# megatron suffix inside a layer -> (HF suffixes inside model.layers.{i}., kind)
_LAYER_RULES = {
    "input_layernorm.weight": (("input_layernorm.weight",), "replicated"),
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
        "qkv",
    ),
    "self_attention.linear_qkv.bias": (
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
        "qkv",
    ),
    "self_attention.q_layernorm.weight": (("self_attn.q_norm.weight",), "replicated"),
    "self_attention.k_layernorm.weight": (("self_attn.k_norm.weight",), "replicated"),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "row"),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "replicated"),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "glu"),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "row"),
}
# transformer-engine's spec fuses the pre-norms into the following linear.
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}


@dataclass(frozen=True)
class Rule:
    hf_names: tuple[str, ...]
    kind: str


def rule_for(megatron_name: str, arch: ArchSpec) -> Rule:
    """The HF sources and TP split of a megatron parameter named with its global layer index."""
    if megatron_name == "embedding.word_embeddings.weight":
        return Rule(("model.embed_tokens.weight",), "vocab")
    if megatron_name == "output_layer.weight":
        return Rule(
            ("model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight",),
            "vocab",
        )
    if megatron_name == "decoder.final_layernorm.weight":
        return Rule(("model.norm.weight",), "replicated")
    m = _LAYER.match(megatron_name)
    if m:
        layer, suffix = m.groups()
        suffix = TE_ALIASES.get(suffix, suffix)
        if suffix in _LAYER_RULES:
            names, kind = _LAYER_RULES[suffix]
            return Rule(tuple(f"model.layers.{layer}.{n}" for n in names), kind)
    raise KeyError(f"no HF mapping for megatron parameter '{megatron_name}'")


def with_global_layer(local_name: str, layer_offset: int) -> str:
    """``decoder.layers.{i}.x`` of a pipeline stage -> ``decoder.layers.{i+offset}.x``."""
    m = _LAYER.match(local_name)
    return f"decoder.layers.{int(m.group(1)) + layer_offset}.{m.group(2)}" if m else local_name


def _row_chunks(arch: ArchSpec, kind: str, hf_index: int, tp: int) -> int:
    """Rows of HF source ``hf_index`` that one TP rank takes (qkv: its groups' q, k or v rows)."""
    if kind == "qkv":
        heads = arch.num_attention_heads if hf_index == 0 else arch.num_query_groups
        return heads * arch.head_dim // tp
    raise AssertionError(kind)


def source_slices(rule: Rule, arch: ArchSpec, tp_rank: int, tp: int, shapes: list[tuple[int, ...]]):
    """For each HF source: (dim, start, stop) of the slice TP rank ``tp_rank`` needs (None: all)."""
    out = []
    for i, shape in enumerate(shapes):
        if rule.kind == "replicated":
            out.append(None)
        elif rule.kind in ("column", "glu"):
            rows = shape[0] // tp
            out.append((0, tp_rank * rows, (tp_rank + 1) * rows))
        elif rule.kind == "row":
            cols = shape[1] // tp
            out.append((1, tp_rank * cols, (tp_rank + 1) * cols))
        elif rule.kind == "qkv":
            rows = _row_chunks(arch, "qkv", i, tp)
            out.append((0, tp_rank * rows, (tp_rank + 1) * rows))
        elif rule.kind == "vocab":
            rows = arch.padded_vocab_size(tp) // tp
            start = tp_rank * rows
            out.append((0, min(start, shape[0]), min(start + rows, shape[0])))
        else:
            raise AssertionError(rule.kind)
    return out


def combine(rule: Rule, parts: list[torch.Tensor], arch: ArchSpec, tp: int) -> torch.Tensor:
    """Build one TP rank's megatron shard from the HF slices chosen by :func:`source_slices`."""
    if rule.kind in ("replicated", "column", "row"):
        return parts[0]
    if rule.kind == "glu":
        return torch.cat(parts, dim=0)
    if rule.kind == "vocab":
        rows = arch.padded_vocab_size(tp) // tp
        x = parts[0]
        if x.shape[0] < rows:  # Megatron's padded vocab rows: zeros, never real tokens
            x = torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])], dim=0)
        return x
    if rule.kind == "qkv":
        groups = arch.num_query_groups // tp
        q, k, v = (p.reshape(groups, -1, *p.shape[1:]) for p in parts)
        return torch.cat([q, k, v], dim=1).reshape(-1, *parts[0].shape[1:])
    raise AssertionError(rule.kind)


def split(
    rule: Rule, shard: torch.Tensor, arch: ArchSpec, tp: int
) -> list[tuple[torch.Tensor, int | None]]:
    """Inverse of :func:`combine`: one TP shard -> per HF source (its slice, concat dim or None)."""
    if rule.kind == "replicated":
        return [(shard, None)]
    if rule.kind == "column":
        return [(shard, 0)]
    if rule.kind == "row":
        return [(shard, 1)]
    if rule.kind == "glu":
        gate, up = shard.chunk(2, dim=0)
        return [(gate, 0), (up, 0)]
    if rule.kind == "vocab":
        return [(shard, 0)]  # the caller trims the padded rows after concatenation
    if rule.kind == "qkv":
        groups = arch.num_query_groups // tp
        per_group = arch.num_attention_heads // arch.num_query_groups * arch.head_dim
        x = shard.reshape(groups, per_group + 2 * arch.head_dim, *shard.shape[1:])
        q, k, v = x.split([per_group, arch.head_dim, arch.head_dim], dim=1)
        return [(t.reshape(-1, *shard.shape[1:]), 0) for t in (q, k, v)]
    raise AssertionError(rule.kind)


def merge_tp_shards(
    rule: Rule, shards: list[torch.Tensor], arch: ArchSpec
) -> dict[str, torch.Tensor]:
    """All TP shards of one megatron tensor -> the full HF tensors it came from."""
    tp = len(shards)
    per_rank = [split(rule, s, arch, tp) for s in shards]
    out = {}
    for i, name in enumerate(rule.hf_names):
        dim = per_rank[0][i][1]
        full = per_rank[0][i][0] if dim is None else torch.cat([r[i][0] for r in per_rank], dim=dim)
        if rule.kind == "vocab":
            full = full[: arch.vocab_size]
        out[name] = full.contiguous()
    return out
