"""Property-based checks (hypothesis): arbitrary shapes, chunk sizes, betas and temperatures match
the fp64 reference; results do not depend on the chunking."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opsd_megatron.losses import vocab_parallel_jsd, vocab_parallel_token_logprobs
from tests.losses import reference as ref

shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3)


@settings(max_examples=60, deadline=None)
@given(
    lead=shapes,
    vocab=st.integers(1, 40),
    pad=st.integers(0, 7),
    beta=st.floats(0.0, 1.0),
    temperature=st.floats(0.3, 2.0),
    chunk=st.integers(1, 200),
    seed=st.integers(0, 2**31 - 1),
    clip=st.none() | st.floats(1e-3, 1.0),
)
def test_jsd_any_shape_matches_reference(lead, vocab, pad, beta, temperature, chunk, seed, clip):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*lead, vocab + pad, generator=g, dtype=torch.float64) * 4
    t = torch.randn(*lead, vocab + pad, generator=g, dtype=torch.float64) * 4
    x = s.clone().requires_grad_(True)
    loss = vocab_parallel_jsd(
        x,
        t,
        beta=beta,
        temperature=temperature,
        vocab_size=vocab,
        term_clip=clip,
        chunk_elements=chunk,
    )
    assert loss.shape == torch.Size(lead)
    weights = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    (loss * weights).sum().backward()
    want, want_grad, _ = ref.value_and_grad(
        ref.jsd, s, t, beta=beta, temperature=temperature, vocab_size=vocab, term_clip=clip
    )
    assert ref.rel_err(loss, want) <= 1e-10
    assert ref.rel_err(x.grad, want_grad) <= 1e-10


@settings(max_examples=40, deadline=None)
@given(
    lead=shapes,
    vocab=st.integers(1, 40),
    temperature=st.floats(0.3, 2.0),
    chunk=st.integers(1, 200),
    seed=st.integers(0, 2**31 - 1),
)
def test_token_logprobs_any_shape_matches_reference(lead, vocab, temperature, chunk, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*lead, vocab, generator=g, dtype=torch.float64) * 4
    tokens = torch.randint(0, vocab, tuple(lead), generator=g)
    x = logits.clone().requires_grad_(True)
    lp = vocab_parallel_token_logprobs(x, tokens, temperature=temperature, chunk_elements=chunk)
    weights = torch.linspace(0.5, 1.5, lp.numel(), dtype=torch.float64).reshape(lp.shape)
    (lp * weights).sum().backward()
    want, want_grad, _ = ref.value_and_grad(ref.token_logprobs, logits, tokens, temperature)
    assert ref.rel_err(lp, want) <= 1e-10
    assert ref.rel_err(x.grad, want_grad) <= 1e-10
