"""``@compilable``: a chunk kernel that ``loss.compile`` runs eager or through ``torch.compile``
(Inductor — C++/OpenMP on CPU, Triton on GPU). The JSD's two kernels (``jsd.py``) carry it.

Eager, one chunk's forward makes ~15 ``[n, V]`` fp32 temporaries (upcast, shift, two
log-softmaxes, two exps, the mixture's logaddexp, the terms, the clip) and reads each back;
Inductor fuses them into a few loops over the logits that keep only the per-token partial sums.
The kernels start from the chunk's raw logits and the global per-token softmax statistics, so the
communication (``vocab_parallel.py``) stays outside the compiled region: the graph has no
collectives, and the materialized (``jsd.py``) and fused (``linear_jsd.py``) paths share one
compiled kernel pair.

``mode``: ``"false"`` eager (the reference); ``"true"`` compiled (a compiler failure is an error
naming the key); ``"auto"`` compiled on CUDA, eager elsewhere — on CPU compiling costs tens of
seconds per run for the speed ``bench/loss.py`` measures (README), and a failed
compile falls back to eager with one warning.
"""

from __future__ import annotations

import functools
import warnings

import torch

MODES = ("auto", "true", "false")


def resolve(mode, device: torch.device) -> bool:
    """Whether the loss runs compiled on ``device`` under ``loss.compile=mode``."""
    mode = normalize(mode)
    return mode == "true" or (mode == "auto" and device.type == "cuda")


def normalize(mode) -> str:
    """``loss.compile`` as one of MODES (YAML gives booleans for true/false)."""
    text = str(mode).lower()
    if text not in MODES:
        raise ValueError(f"loss.compile must be auto|true|false, got {mode!r}")
    return text


class _Kernel:
    """``torch.compile(fn)``; on a compiler error: raise (``strict``) or warn once and run eager."""

    def __init__(self, fn, strict: bool):
        self.eager, self.strict, self.failed = fn, strict, False
        # dynamic: the token count varies by chunk and micro-batch; one graph serves them all.
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True)

    def __call__(self, *args):
        if self.failed:
            return self.eager(*args)
        try:
            return self.compiled(*args)
        except Exception as err:  # torch._dynamo / Inductor errors have no common public base
            if self.strict:
                raise RuntimeError(f"loss.compile=true: torch.compile failed: {err}") from err
            warnings.warn(f"loss.compile=auto: torch.compile failed, running eager: {err}")
            self.failed = True
            return self.eager(*args)


class Compilable:
    """A kernel called eager as itself, or through ``torch.compile`` via ``.under(mode, device)``
    (one compiled graph per strictness, made on first use)."""

    def __init__(self, fn):
        functools.update_wrapper(self, fn)
        self.eager, self._compiled = fn, {}

    def __call__(self, *args):
        return self.eager(*args)

    def under(self, mode, device: torch.device):
        """The callable to use under ``loss.compile=mode`` on ``device``."""
        if not resolve(mode, device):
            return self.eager
        strict = normalize(mode) == "true"
        if strict not in self._compiled:
            self._compiled[strict] = _Kernel(self.eager, strict)
        return self._compiled[strict]

    def reset(self) -> None:
        """Forget the compiled graphs (tests that compare a fresh compile with eager)."""
        self._compiled.clear()


def compilable(fn) -> Compilable:
    """Decorator: ``fn`` may run compiled under ``loss.compile`` (see module doc)."""
    return Compilable(fn)
