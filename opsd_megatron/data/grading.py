"""Grade a model output against a reference answer.

The prediction is extracted by ``eval.answer_format``: ``boxed`` (default) the content of the
*last* ``\\boxed{...}`` (balanced braces; ``\\fbox`` too); ``last_number`` the last number in the
text (``1,234``, ``-3.5``, ``3/4``; for models that write "So, the answer is 3."); ``gsm8k`` the
number after the last ``####``; ``regex:<pattern>`` the last match (its first group if it has one).
It is checked with math-verify (symbolic equivalence) under a hard per-item timeout, with
normalised string equality as the fallback. Free-text answers (AMO-Bench's
``answer_type: description``) are reported as ungraded (``correct=None``), never counted.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import re
from dataclasses import dataclass

from opsd_megatron.config.algorithm_sections import check_answer_format

MAX_BOX_CHARS = 2000  # longer "answers" are not answers; keeps sympy away from pathological input
UNGRADED_TYPES = {"description"}


@dataclass(frozen=True)
class Grade:
    correct: bool | None  # None: ungraded (free-text answer)
    extracted: str | None
    method: str  # math_verify | string | no_answer | ungraded | timeout | too_long


_NUMBER = re.compile(r"(?<![\w.])-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|(?<![\w.])-?\d+(?:\.\d+)?(?:/\d+)?")
_GSM8K = re.compile(r"####\s*(-?[\d,]*\.?\d+)")


def extract_answer(text: str, answer_format: str = "boxed") -> str | None:
    """The prediction in ``text`` under ``answer_format`` (see the module docstring), or None."""
    if answer_format == "boxed":
        return last_boxed(text)
    if answer_format == "gsm8k":
        found = _GSM8K.findall(text)
        return found[-1].replace(",", "") if found else None
    if answer_format == "last_number":
        found = _NUMBER.findall(text)
        return found[-1].replace(",", "") if found else None
    if answer_format.startswith("regex:"):
        matches = list(re.finditer(answer_format[len("regex:") :], text))
        if not matches:
            return None
        m = matches[-1]
        return (m.group(1) if m.re.groups else m.group(0)).strip()
    check_answer_format(answer_format)  # raises: an unknown format
    raise AssertionError(answer_format)


def reference_answer(solution: str) -> str | None:
    """The final answer written in a reference solution: its last ``\\boxed{}`` (MATH) or its
    ``#### N`` line (GSM8K)."""
    return last_boxed(solution) or extract_answer(solution, "gsm8k")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} with balanced braces, or None."""
    for m in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*", text))):
        i = m.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
                j += 1
            continue  # unbalanced: try an earlier box
        token = re.match(r"[^\s$]+", text[i:])  # "\boxed 5"
        if token:
            return token.group(0)
    return None


def _normalise(s: str) -> str:
    s = s.strip().strip("$").replace("\\!", "").replace("\\left", "").replace("\\right", "")
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = s.replace("dfrac", "frac").replace("tfrac", "frac").replace(" ", "").rstrip(".")
    return s


def _math_verify(answer: str, extracted: str) -> bool:
    import logging

    from math_verify import parse, verify

    # Its own signal-based timeouts only work on a main thread; the Grader's process timeout rules.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    gold = parse(f"${answer}$", parsing_timeout=None)
    pred = parse(f"\\boxed{{{extracted}}}", parsing_timeout=None)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=None))


def _grade_one(answer: str, extracted: str) -> tuple[bool, str]:
    if _normalise(answer) == _normalise(extracted):
        return True, "string"
    try:
        return _math_verify(answer, extracted), "math_verify"
    except Exception:  # noqa: BLE001 - unparsable input is simply not equivalent
        return False, "math_verify"


class Grader:
    """Grades in a worker process so that a hanging sympy call is killed after ``timeout`` s."""

    def __init__(self, timeout: float = 10.0, answer_format: str = "boxed"):
        check_answer_format(answer_format)
        self.timeout, self.answer_format = timeout, answer_format
        self._pool = None

    def _executor(self):
        if self._pool is None:
            self._pool = cf.ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn"))
        return self._pool

    def _restart(self):
        if self._pool is not None:
            for p in list(getattr(self._pool, "_processes", {}).values()):
                p.kill()
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = None

    def grade(self, output: str, answer: str, answer_type: str | None = None) -> Grade:
        extracted = extract_answer(output, self.answer_format)
        if answer_type in UNGRADED_TYPES:
            return Grade(None, extracted, "ungraded")
        if extracted is None:
            return Grade(False, None, "no_answer")
        if len(extracted) > MAX_BOX_CHARS:
            return Grade(False, extracted[:100], "too_long")
        if _normalise(answer) == _normalise(extracted):
            return Grade(True, extracted, "string")
        future = self._executor().submit(_grade_one, answer, extracted)
        try:
            ok, method = future.result(timeout=self.timeout)
        except cf.TimeoutError:
            self._restart()
            return Grade(False, extracted, "timeout")
        return Grade(ok, extracted, method)

    def close(self):
        self._restart()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
