"""What the responses look like, for training rollouts and evaluation outputs alike: the symptoms
self-distillation is known to cause (shorter answers, fewer expressions of uncertainty — Kim et al.,
arXiv 2603.24472 — or, in on-policy distillation, longer answers collapsing into repetition —
StableOPD, arXiv 2604.08527), so a user sees them in the metrics before the accuracy moves.

Definitions (the metric names dashboards can rely on):

- ``response_length`` / ``response_length_p90``: tokens per response (the stop token included),
  mean and 90th percentile (nearest rank: the ⌈0.9·n⌉-th smallest);
- ``truncation_rate``: fraction of responses that ended at the new-token limit without a stop token;
- ``repetition_rate``: per response, the fraction of its word 4-grams (whitespace-split words of the
  decoded text, so any tokenizer reads alike) that already occurred earlier in the same response;
  the mean over responses (one with fewer than 4 words counts 0);
- ``marker_rate``: uncertainty markers per 1,000 response tokens — case-insensitive whole-word
  matches of ``logging.uncertainty_markers`` in the decoded text.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from opsd_megatron.config.run_sections import DEFAULT_MARKERS

NGRAM = 4
RESPONSE_FIGURES = (
    "response_length",
    "response_length_p90",
    "truncation_rate",
    "repetition_rate",
    "marker_rate",
)


def repetition_rate(text: str, n: int = NGRAM) -> float:
    """Fraction of the text's word n-grams already seen earlier in it."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    seen, repeated = set(), 0
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / len(grams)


@lru_cache(maxsize=8)
def _marker_pattern(markers: tuple[str, ...]) -> re.Pattern:
    words = sorted((m.strip() for m in markers if m.strip()), key=len, reverse=True)
    if not words:
        return re.compile(r"(?!x)x")  # matches nothing
    alternatives = "|".join(r"\s+".join(map(re.escape, w.split())) for w in words)
    return re.compile(rf"\b(?:{alternatives})\b", re.IGNORECASE)


def marker_count(text: str, markers=DEFAULT_MARKERS) -> int:
    """Whole-word, case-insensitive occurrences of any marker (``let me check`` across spaces)."""
    return len(_marker_pattern(tuple(markers)).findall(text))


def percentile_nearest_rank(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[max(0, math.ceil(q * len(ordered)) - 1)])


def response_stats(
    texts: list[str], lengths: list[int], truncated: list[bool], markers=DEFAULT_MARKERS
) -> dict[str, float]:
    """The module's five figures over a set of responses (texts decoded without special tokens,
    their token counts, and whether each hit the new-token limit without stopping)."""
    if not (len(texts) == len(lengths) == len(truncated)):
        raise ValueError(
            f"texts, lengths and truncated differ in length: {len(texts)}, {len(lengths)}, "
            f"{len(truncated)}"
        )
    n = max(len(texts), 1)
    tokens = sum(lengths)
    return {
        "response_length": tokens / n,
        "response_length_p90": percentile_nearest_rank(lengths, 0.9),
        "truncation_rate": sum(truncated) / n,
        "repetition_rate": sum(repetition_rate(t) for t in texts) / n,
        "marker_rate": 1000.0 * sum(marker_count(t, markers) for t in texts) / max(tokens, 1),
    }
