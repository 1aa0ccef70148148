"""Deterministic loss test cases shared by the single-process and the TP-sharded tests."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

PADDED_VOCAB = 40  # divisible by tp = 1, 2, 4
REAL_VOCAB = 37  # the last 3 columns are Megatron-style padding filled with large garbage
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (0.6, 1.0, 1.2)
KINDS = ("random", "extreme", "neg_inf_shared", "neg_inf_one_sided", "identical", "clipped")


@dataclass(frozen=True)
class Case:
    beta: float
    temperature: float
    kind: str
    dtype: torch.dtype
    chunk_elements: int

    @property
    def term_clip(self):
        return 0.02 if self.kind == "clipped" else None


def all_cases(dtypes=(torch.float64, torch.float32)):
    out = []
    for i, (beta, temp, kind, dtype) in enumerate(
        itertools.product(BETAS, TEMPERATURES, KINDS, dtypes)
    ):
        if kind == "neg_inf_one_sided" and beta in (0.0, 1.0):
            continue  # one-sided -inf makes KL infinite at the ends: nothing finite to compare
        out.append(Case(beta, temp, kind, dtype, chunk_elements=48 if i % 2 else 1 << 20))
    return out


def make_inputs(case: Case, seed: int = 0, shape=(2, 5)):
    """Full padded-vocab student/teacher logits [*shape, PADDED_VOCAB] in the case's dtype."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, PADDED_VOCAB, generator=g, dtype=torch.float64) * 3
    t = torch.randn(*shape, PADDED_VOCAB, generator=g, dtype=torch.float64) * 3
    if case.kind == "extreme":
        s[..., ::5] = 1e4
        s[..., 1::7] = -1e4
        t[..., 2::5] = 1e4
        t[..., 3::4] = -1e4
    elif case.kind == "neg_inf_shared":
        s[..., 4:9] = -torch.inf
        t[..., 4:9] = -torch.inf
    elif case.kind == "neg_inf_one_sided":
        s[..., 4:9] = -torch.inf
        t[..., 20:26] = -torch.inf
    elif case.kind == "identical":
        t = s.clone()
    s[..., REAL_VOCAB:] = 50.0  # padding garbage: would dominate if it were counted
    t[..., REAL_VOCAB:] = -30.0
    return s.to(case.dtype), t.to(case.dtype)


def shard(x: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    width = x.shape[-1] // tp
    return x[..., rank * width : (rank + 1) * width].contiguous()
