"""``loss.compile`` (losses/compiled.py): the JSD's per-chunk work through ``torch.compile``
(Inductor's C++ backend here) equals the eager path — the reference, itself tested against fp64 in
test_jsd.py / test_linear_jsd.py — for values, both entropies and gradients, in the materialized
and the fused form, with padded vocab, a temperature, a term clip and several token chunks
(measured: ≤ 6e-8 on values, ≤ 2e-9 on gradients; asserted ≤ 1e-6 · max(|x|, 1)). One β only:
each compile costs ~20–45 s of CPU, and the β cases share the eager math the other tests cover.
The mode switch, the refusal of a bad value, the fallback and the algorithm's wiring are tested
without compiling."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from opsd_megatron.algorithms.opsd import OPSD
from opsd_megatron.algorithms.step_data import MicroBatch
from opsd_megatron.config.algorithm_sections import LossConfig
from opsd_megatron.config.run_sections import DataConfig
from opsd_megatron.data.prompts import pack
from opsd_megatron.errors import ConfigError
from opsd_megatron.losses import compiled, jsd, vocab_parallel_jsd_with_entropy
from opsd_megatron.losses.distributions import Logits
from opsd_megatron.losses.linear_jsd import vocab_parallel_linear_jsd

N, H, V, REAL = 37, 16, 56, 50
KW = dict(beta=0.5, temperature=1.3, term_clip=0.05, vocab_size=REAL)


def _close(a, b, what):
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1.0)
    assert err <= 1e-6, f"{what}: compiled vs eager {err:.2e}"


def _run(mode):
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(N, H, generator=g, requires_grad=True)
    h_t = h_s.detach() + 0.5 * torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g)
    w[REAL:] = 5.0  # padding rows: large garbage logits that must be ignored
    s = (h_s.detach() @ w.T).requires_grad_(True)
    out = vocab_parallel_jsd_with_entropy(s, h_t @ w.T, chunk_elements=10 * V, compile=mode, **KW)
    out.loss.sum().backward()
    fused = vocab_parallel_linear_jsd(h_s, h_t, w, chunk_tokens=9, compile=mode, **KW)
    fused.loss.sum().backward()
    return [*out, s.grad, *fused, h_s.grad]


def test_compiled_jsd_equals_eager_in_both_forms():
    torch._dynamo.reset()
    jsd.jsd_partials.reset(), jsd.jsd_student_grad.reset()
    eager = _run("false")
    got = _run("true")  # strict: a compiler failure raises instead of running eager
    cpu = torch.device("cpu")
    partials, grad = (k.under("true", cpu) for k in (jsd.jsd_partials, jsd.jsd_student_grad))
    assert isinstance(partials, compiled._Kernel) and not (partials.failed or grad.failed)
    names = "loss H_S H_T grad_logits fused_loss fused_H_S fused_H_T grad_hidden".split()
    for name, a, b in zip(names, got, eager):
        _close(a.detach(), b.detach(), name)


def test_modes_resolve_per_device_and_a_bad_value_names_the_key():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [compiled.resolve(m, cpu) for m in ("auto", "true", "false")] == [False, True, False]
    assert [compiled.resolve(m, cuda) for m in ("auto", True, False)] == [True, True, False]
    assert LossConfig(compile=True).compile == "true"  # YAML's boolean
    with pytest.raises(ConfigError, match="loss.compile must be auto|true|false"):
        LossConfig(compile="yes")


def _graph_break(x):
    if x.sum() > 0:  # data-dependent control flow: no full graph
        return x + 1
    return x - 1


def test_a_failed_compile_raises_under_true_and_runs_eager_under_auto():
    x = torch.ones(3)
    with pytest.raises(RuntimeError, match="loss.compile=true: torch.compile failed"):
        compiled._Kernel(_graph_break, strict=True)(x)
    kernel = compiled._Kernel(_graph_break, strict=False)
    with pytest.warns(UserWarning, match="loss.compile=auto"):
        assert torch.equal(kernel(x), x + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once; eager from then on
        assert torch.equal(kernel(-x), -x - 1)


def test_opsd_hands_loss_compile_to_every_jsd(monkeypatch):
    """Both the loss and the ref-KL term run under the configured mode (recorded, eager math)."""
    seen = []
    for kernel in (jsd.jsd_partials, jsd.jsd_student_grad):

        def recording(mode, device, kernel=kernel):
            seen.append(mode)
            return kernel.eager

        monkeypatch.setattr(kernel, "under", recording)
    b, r, v = 2, 3, 7
    g = torch.Generator().manual_seed(1)
    loss_cfg = LossConfig(compile="auto", ref_kl_coef=0.1)
    algo = OPSD(None, loss_cfg, DataConfig(), teacher=None, vocab_size=v)
    student = torch.randn(b, r, v, generator=g, requires_grad=True)
    teacher, ref = (Logits(torch.randn(b, r, v, generator=g)) for _ in range(2))
    tokens = torch.randint(0, v, (b, r), generator=g)
    mb = MicroBatch(
        pack([[1]] * b, [[0] * r] * b, 0, device="cpu"),
        torch.ones(b, r, dtype=torch.bool),
        tokens,
        torch.zeros(b, r),
        True,
        teacher=teacher,
        reference=ref,
    )
    loss, _ = algo.per_token_loss(Logits(student), mb, SimpleNamespace(tp=None))
    loss.sum().backward()
    assert seen and set(seen) == {"auto"} and len(seen) >= 4, seen  # 2 forwards + 2 backwards
