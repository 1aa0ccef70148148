"""A deterministic synthetic task shipped as code, so the project runs with no external data:
multi-digit addition with a worked, digit-by-digit solution ending in a boxed answer."""

from __future__ import annotations

import random


def worked_addition(a: int, b: int) -> str:
    """Column addition from the right, one short line per digit (``x+y+carry=sum``), then the
    boxed answer: every step is checkable, and short enough that CPU rollouts stay cheap."""
    da, db = str(a)[::-1], str(b)[::-1]
    lines, carry, digits = [], 0, []
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        lines.append(f"{x}+{y}+{carry}={s}")
        digits.append(str(s % 10))
        carry = s // 10
    if carry:
        digits.append(str(carry))
    answer = int("".join(reversed(digits)))
    assert answer == a + b
    return "\n".join(lines) + f"\n\\boxed{{{answer}}}"


def addition_problems(n: int, seed: int = 0, digits: int = 3) -> list[dict]:
    """``n`` distinct problems {id, problem, solution, answer}, the same for a given seed."""
    rng = random.Random(seed)
    seen, out = set(), []
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    if n > (hi - lo + 1) ** 2:
        raise ValueError(
            f"only {(hi - lo + 1) ** 2} distinct {digits}-digit problems exist, asked for {n}"
        )
    while len(out) < n:
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        if (a, b) in seen:
            continue
        seen.add((a, b))
        out.append(
            {
                "id": f"add-{a}-{b}",
                "problem": f"{a}+{b}",
                "solution": worked_addition(a, b),
                "answer": str(a + b),
            }
        )
    return out
