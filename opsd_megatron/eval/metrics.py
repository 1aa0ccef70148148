"""Sample-based accuracy metrics for n samples per problem (paper Table 5 style)."""

from __future__ import annotations

from collections import Counter
from math import comb, sqrt

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), for c correct of n samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95 % by default): unlike p ± z·se it
    stays inside [0, 1] and is not degenerate at 0 or n successes, where small models live."""
    if not 0 <= successes <= n or n < 1:
        raise ValueError(f"need 0 <= successes <= n and n >= 1, got {successes}/{n}")
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def avg_at_n(correct: list[bool]) -> float:
    return sum(correct) / len(correct)


def maj_at_n(extracted: list[str | None], correct: list[bool]) -> bool:
    """Whether the most frequent extracted answer (first seen wins ties) is a correct one."""
    votes = Counter(e for e in extracted if e is not None)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(e for e in extracted if e is not None and votes[e] == top)
    return any(ok for e, ok in zip(extracted, correct) if e == winner)


def summarize(per_problem: list[dict], ks: list[int]) -> dict:
    """``per_problem``: {"correct": [bool|None]*n, "extracted": [...]}. Ungraded problems are
    counted apart."""
    graded = [p for p in per_problem if all(c is not None for c in p["correct"])]
    out = {
        "problems": len(per_problem),
        "graded": len(graded),
        "ungraded": len(per_problem) - len(graded),
    }
    if not graded:
        return out
    n = len(graded[0]["correct"])
    out[f"avg@{n}"] = sum(avg_at_n(p["correct"]) for p in graded) / len(graded)
    if n == 1:  # one sample per problem (greedy): a binomial proportion over the problems
        out["avg@1_ci95"] = list(wilson_interval(sum(p["correct"][0] for p in graded), len(graded)))
    for k in ks:
        if k <= n:
            out[f"pass@{k}"] = sum(pass_at_k(n, sum(p["correct"]), k) for p in graded) / len(graded)
    out[f"maj@{n}"] = sum(maj_at_n(p["extracted"], p["correct"]) for p in graded) / len(graded)
    return out
