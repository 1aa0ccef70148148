"""Console lines under the name of what is running: ``[opsd]``, ``[sft]``, ``[grpo]`` for a
training run (``logging.name``, default the algorithm), ``[base]`` and the arms' names for the
stages of ``opsd-demo``, ``[eval]`` for evaluation — so interleaved output says whose it is."""

from __future__ import annotations

_NAME = ["opsd"]


def set_name(name: str) -> None:
    """The name this process's lines carry from now on."""
    _NAME[0] = name


def name() -> str:
    return _NAME[0]


def say(message: str, under: str | None = None) -> None:
    """Print ``[name] message`` (``under``: another name for this line) and flush."""
    print(f"[{under or _NAME[0]}] {message}", flush=True)
