"""Vocab-parallel sampling: right distribution (temperature, top-k, top-p) at TP=1 and TP=2,
log-probs of the truncated, renormalised distribution (vLLM's processed_logprobs), and the Megatron
sampler's log-probs equal the trainer's truncated ones for the same tokens (TP=2, PP=2),
reproducibly."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from opsd_megatron.rollout.sampling import sample_next_tokens
from opsd_megatron.testing import run_distributed

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, 0.7, 1.2, -3.0, 0.3])
N = 40000
TEMP = 1.3


def _expected(top_k=0, top_p=1.0):
    p = torch.softmax(LOGITS.double() / TEMP, 0)
    keep = torch.ones_like(p, dtype=torch.bool)
    if top_k:
        keep &= p >= torch.topk(p, top_k).values[-1]
    if top_p < 1:  # applied to the top-k-renormalised distribution, as in vLLM and HF
        p = torch.where(keep, p, 0.0) / torch.where(keep, p, 0.0).sum()
        order = torch.argsort(p, descending=True)
        cum = torch.cumsum(p[order], 0)
        n = int((cum < top_p).sum()) + 1
        keep_p = torch.zeros_like(keep)
        keep_p[order[:n]] = True
        keep &= keep_p
    q = torch.where(keep, p, 0.0)
    return q / q.sum()


def _draw(group=None, **kw):
    rank = dist.get_rank() if group is not None else 0
    tp = dist.get_world_size() if group is not None else 1
    width = LOGITS.shape[0] // tp
    local = LOGITS[rank * width : (rank + 1) * width].expand(N, width)
    gen = torch.Generator().manual_seed(1000 + rank)
    tokens, logprobs = sample_next_tokens(local, temperature=TEMP, generator=gen, group=group, **kw)
    return torch.bincount(tokens, minlength=LOGITS.shape[0]).double() / N, tokens, logprobs


CASES = [dict(), dict(top_k=3), dict(top_p=0.7), dict(top_k=5, top_p=0.8)]


def _check(freq, tokens, logprobs, kw):
    want = _expected(**kw)
    assert (freq[want == 0] == 0).all(), "sampled outside the top-k/top-p support"
    assert (freq - want).abs().max() < 0.012, (freq, want)  # ~5 sigma at N=40000
    assert torch.allclose(logprobs.double(), want.log()[tokens], atol=1e-6), (
        "log-prob of the truncated, renormalised distribution"
    )


@pytest.mark.parametrize("kw", CASES, ids=["temperature", "top_k", "top_p", "top_k+top_p"])
def test_distribution_tp1(kw):
    _check(*_draw(**kw), kw)


def _tp_rank_fn():
    return [_draw(dist.group.WORLD, **kw) for kw in CASES]


def test_distribution_tp2():
    results = run_distributed(_tp_rank_fn, 2)
    for r0, r1, kw in zip(results[0], results[1], CASES):
        assert torch.equal(r0[1], r1[1]), "TP ranks agree on every sampled token"
        _check(*r0, kw)


def _greedy_tp():
    return _greedy(dist.group.WORLD)


def _greedy(group=None):
    """Random logits with a known argmax per row, sharded; top-k/top-p set (greedy ignores them)."""
    rank = dist.get_rank() if group is not None else 0
    tp = dist.get_world_size() if group is not None else 1
    full = torch.randn(64, 12, generator=torch.Generator().manual_seed(3))
    width = full.shape[1] // tp
    local = full[:, rank * width : (rank + 1) * width]
    gen = torch.Generator().manual_seed(rank)  # different noise per rank: greedy uses none
    tokens, logprobs = sample_next_tokens(
        local, temperature=0.0, top_k=2, top_p=0.5, generator=gen, group=group
    )
    return full, tokens, logprobs


def _check_greedy(full, tokens, logprobs):
    assert torch.equal(tokens, full.argmax(1)), "temperature 0 is the global argmax"
    want = torch.log_softmax(full.double(), 1).gather(1, tokens[:, None])[:, 0]
    assert torch.allclose(logprobs.double(), want, atol=1e-6), "its log-prob at T=1"


def test_temperature_zero_is_greedy_at_tp1_and_tp2():
    _check_greedy(*_greedy())
    r0, r1 = run_distributed(_greedy_tp, 2)
    assert torch.equal(r0[1], r1[1])
    _check_greedy(*r0)


def _sampler_vs_trainer(tp, pp, seed):
    from megatron.core import parallel_state as ps

    from opsd_megatron.data.prompts import pack
    from opsd_megatron.losses import vocab_parallel_token_logprobs
    from opsd_megatron.models import arch_from_hf_config, build_gpt_model
    from opsd_megatron.models.forward import forward_logits
    from opsd_megatron.models.hf_weights import load_hf_weights
    from opsd_megatron.models.random_init import RandomHFWeights
    from opsd_megatron.platform import initialize_model_parallel
    from opsd_megatron.rollout.megatron_sampler import MegatronSampler

    groups = initialize_model_parallel(tp, pp)
    arch = arch_from_hf_config(
        dict(
            model_type="qwen3",
            vocab_size=200,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    model = build_gpt_model(arch, initialize=False, groups=groups)
    load_hf_weights(model, RandomHFWeights(arch, 0, std=0.3), arch)
    sampler = MegatronSampler(
        model,
        temperature=0.9,
        top_k=20,
        top_p=0.8,
        stop_ids=[3],
        pad_id=0,
        vocab_size=arch.vocab_size,
        seed=seed,
    )
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14]]
    out = sampler.generate(prompts, max_new_tokens=6)
    batch = pack(prompts, out.responses, pad_id=0, device="cpu")
    logits = forward_logits(model, batch.tokens_BT)
    trainer_lp = None
    if logits is not None:
        lp = vocab_parallel_token_logprobs(
            logits,
            batch.targets_BT,
            temperature=0.9,
            top_k=20,
            top_p=0.8,
            vocab_size=arch.vocab_size,
            group=ps.get_tensor_model_parallel_group(),
        )
        trainer_lp = [lp[i][batch.response_mask_BT[i]] for i in range(len(prompts))]
    return out.responses, out.logprobs, trainer_lp


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_sampler_logprobs_equal_trainer_logprobs(tp, pp):
    results = run_distributed(_sampler_vs_trainer, tp * pp, tp, pp, 7)
    responses = results[0][0]
    assert all(r[0] == responses for r in results), "every rank holds the same rollouts"
    assert any(len(r) > 1 for r in responses)
    last = [r for r in results if r[2] is not None][0]
    for sampled, trained in zip(last[1], last[2]):
        assert torch.allclose(torch.tensor(sampled), trained.float(), atol=1e-5)
    again = run_distributed(_sampler_vs_trainer, tp * pp, tp, pp, 7)
    assert again[0][0] == responses, "same seed, same rollouts"


def _tiny_model(tp: int, pp: int):
    """(groups, arch, model): a two-layer random Qwen3 with a 200-token vocabulary."""
    from opsd_megatron.models import arch_from_hf_config, build_gpt_model
    from opsd_megatron.models.hf_weights import load_hf_weights
    from opsd_megatron.models.random_init import RandomHFWeights
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(tp, pp)
    arch = arch_from_hf_config(
        dict(model_type="qwen3", vocab_size=200, hidden_size=32, intermediate_size=64,
             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    )  # fmt: skip
    model = build_gpt_model(arch, initialize=False, groups=groups)
    load_hf_weights(model, RandomHFWeights(arch, 0, std=0.3), arch)
    return groups, arch, model


def _stops(tp: int, pp: int):
    """Greedy rollouts of prompts of very different lengths, without stops and then with row 0's
    first token as the stop: whole-prompt prefill and the stepwise path (kept for TE)."""
    from opsd_megatron.rollout import megatron_sampler

    groups, arch, model = _tiny_model(tp, pp)
    prompts = [[5, 6, 7], list(range(20, 45)), [14], [50, 51, 52, 53, 54, 55, 56, 57]]

    def run(stop_ids, stepwise=False):
        honoured = megatron_sampler.masks_honoured
        if stepwise:
            megatron_sampler.masks_honoured = lambda model: False
        try:
            sampler = megatron_sampler.MegatronSampler(
                model, temperature=0.0, top_k=0, top_p=1.0, stop_ids=stop_ids, pad_id=0,
                vocab_size=arch.vocab_size, groups=groups,
            )  # fmt: skip
            return sampler.generate(prompts, max_new_tokens=12)
        finally:
            megatron_sampler.masks_honoured = honoured

    free = run([199])
    stop = free.responses[0][0]
    return free, run([stop]), run([stop], stepwise=True), run([199], stepwise=True), stop


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["tp1", "tp2", "pp2"])
def test_whole_prompt_prefill_with_a_row_stopping_at_once(tp, pp):
    """Left-padded prefill of prompts of 1 to 25 tokens: greedy tokens equal the stepwise path's
    (no row ever sees padding either way), at TP1, TP2 and PP2; with row 0's first token as the
    stop, row 0 ends after one token (finished) while a row that never meets it runs to the limit,
    and every row is its free run cut at the stop."""
    free, stopped, stopped_stepwise, free_stepwise, stop = run_distributed(
        _stops, tp * pp, tp, pp, timeout=120
    )[0]
    assert free.responses == free_stepwise.responses
    assert stopped.responses == stopped_stepwise.responses
    assert stopped.responses[0] == [stop] and stopped.finished[0]
    for full, cut, done in zip(free.responses, stopped.responses, stopped.finished):
        want = full[: full.index(stop) + 1] if stop in full else full
        assert cut == want and done == (stop in full)
    assert any(len(r) == 12 and stop not in r for r in free.responses), "a row runs to the limit"


def _compacted(tp: int):
    """Sampled rollouts (T=0.9, top-k/top-p) whose rows stop at different steps, with finished
    rows leaving the decoder at every finish, at the default threshold and never; how many
    times the cache shrank in each."""
    from opsd_megatron.models import decoder as decoder_module
    from opsd_megatron.rollout.megatron_sampler import MegatronSampler

    groups, arch, model = _tiny_model(tp, 1)
    prompts = [[5, 6, 7], list(range(20, 45)), [14], [50, 51, 52], [60, 61], [70, 71, 72, 73]]
    shrinks, keep = [], decoder_module.KVDecoder.keep

    def counted(self, index):
        shrinks[-1] += 1
        return keep(self, index)

    decoder_module.KVDecoder.keep = counted
    out = []
    try:
        for below in (1.0, 0.75, 0.0):
            shrinks.append(0)
            sampler = MegatronSampler(
                model, temperature=0.9, top_k=50, top_p=0.95, stop_ids=list(range(100, 110)),
                pad_id=0, vocab_size=arch.vocab_size, seed=3, groups=groups, compact_below=below,
            )  # fmt: skip
            out.append(sampler.generate(prompts, max_new_tokens=24))
    finally:
        decoder_module.KVDecoder.keep = keep
    return out, shrinks


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_finished_rows_leave_the_decoder_without_changing_any_token(tp):
    """The rows still decoding are all the decoder computes once enough rows have finished; the
    tokens, their log-probs and the finished flags are those of the batch that kept every row
    (the same random stream: each row takes its own row of the full batch's noise)."""
    (every, default, never), shrinks = run_distributed(_compacted, tp, tp, timeout=120)[0]
    lengths = sorted(len(r) for r in never.responses)
    assert len(set(lengths)) >= 4 and lengths[0] < 12 < lengths[-1], lengths  # rows end apart
    assert shrinks[0] >= 3 and shrinks[1] >= 1 and shrinks[2] == 0, shrinks
    for run in (every, default):
        assert run.responses == never.responses and run.finished == never.finished
        for a, b in zip(run.logprobs, never.logprobs):
            assert torch.allclose(torch.tensor(a), torch.tensor(b), atol=1e-5)
