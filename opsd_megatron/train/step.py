"""One OPSD training step, top to bottom:

    draw prompts -> student rollouts -> student and teacher sequences -> teacher forward (no grad,
    adapters off / frozen copy, forward-only schedule, vocab-sharded logits) -> student forward and
    backward through megatron's pipeline schedule with the vocab-parallel loss on response tokens
    -> gradient reduction (DP, and TP for duplicated params) -> clipping -> optimizer + LR step.

Legend: B micro-batch rows, T sequence length, R response length, V local vocab shard.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from opsd_megatron.data.prompts import pack, student_prompt_ids, teacher_prompt_ids
from opsd_megatron.losses import global_normalizer, partial_loss, vocab_parallel_jsd_with_entropy
from opsd_megatron.losses.reduction import masked_mean
from opsd_megatron.losses.sampled_token import vocab_parallel_sampled_token_loss
from opsd_megatron.train.grads import clip_and_check, reduce_gradients


@dataclass
class MicroBatch:
    student: object  # PackedBatch
    teacher: object  # PackedBatch
    response_mask_BR: torch.Tensor
    response_tokens_BR: torch.Tensor
    sampler_logprobs_BR: torch.Tensor
    teacher_logits_BRV: torch.Tensor | None = None


def problems_for_step(c, step: int) -> list[dict]:
    """This DP rank's problems for ``step``: a deterministic walk over the shuffled set."""
    from megatron.core import parallel_state as ps

    per_step = c.cfg.trainer.global_batch_size // c.cfg.rollout.num_rollouts
    n = len(c.problems)
    batch = [c.problems[(step * per_step + i) % n] for i in range(per_step)]
    batch = [p for p in batch for _ in range(c.cfg.rollout.num_rollouts)]
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = len(batch) // dp
    return batch[rank * share:(rank + 1) * share]


def _response_rows(logits_BTV: torch.Tensor, batch, r_max: int) -> torch.Tensor:
    """Logits at the positions that predict ŷ, aligned by response index: [B, R, V]."""
    b, _, v = logits_BTV.shape
    out = logits_BTV.new_zeros(b, r_max, v)
    for i in range(b):
        start, n = batch.prompt_lengths[i] - 1, batch.response_lengths[i]
        out[i, :n] = logits_BTV[i, start:start + n]
    return out


def build_micro_batches(c, problems, rollout) -> list[MicroBatch]:
    cfg, tok = c.cfg, c.tokenizer
    micro = cfg.trainer.micro_batch_size
    out = []
    for s in range(0, len(problems), micro):
        rows = problems[s:s + micro]
        resp = rollout.responses[s:s + micro]
        sp = [student_prompt_ids(tok, cfg.data, p["problem"]) for p in rows]
        tp = [teacher_prompt_ids(tok, cfg.data, p["problem"], p["solution"]) for p in rows]
        r_max = max(1, max(len(r) for r in resp))
        mask = torch.zeros(len(rows), r_max, dtype=torch.bool)
        tokens = torch.full((len(rows), r_max), tok.pad_token_id, dtype=torch.long)
        lps = torch.zeros(len(rows), r_max)
        for i, r in enumerate(resp):
            mask[i, :len(r)] = True
            tokens[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            lps[i, :len(r)] = torch.tensor(rollout.logprobs[s + i])
        out.append(MicroBatch(pack(sp, resp, tok.pad_token_id), pack(tp, resp, tok.pad_token_id), mask, tokens, lps))
    return out


def teacher_pass(c, micro_batches: list[MicroBatch]) -> None:
    for mb in micro_batches:
        logits = c.teacher.logits(mb.teacher.tokens_BT, mb.teacher.position_ids_BT)
        if logits is not None:  # last pipeline stage
            mb.teacher_logits_BRV = _response_rows(logits, mb.teacher, mb.response_mask_BR.shape[1])


def per_token_loss(cfg, student_BRV, mb: MicroBatch, vocab_size: int, group) -> tuple[torch.Tensor, dict]:
    """The configured loss per response token [B, R] and diagnostics, vocab-parallel."""
    kw = dict(temperature=cfg.loss.temperature, vocab_size=vocab_size, group=group)
    if cfg.loss.kind == "jsd":
        out = vocab_parallel_jsd_with_entropy(student_BRV, mb.teacher_logits_BRV, beta=cfg.loss.beta,
                                              term_clip=cfg.loss.term_clip, **kw)
        return out.loss, {"student_entropy": out.student_entropy, "teacher_entropy": out.teacher_entropy}
    out = vocab_parallel_sampled_token_loss(student_BRV, mb.teacher_logits_BRV, mb.response_tokens_BR, **kw)
    return out.loss, {"advantage": out.advantage}


def student_pass(c, micro_batches: list[MicroBatch], normalizer) -> dict:
    """Forward + backward of every micro-batch through megatron's schedule; returns summed stats."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    group = ps.get_tensor_model_parallel_group()
    cfg = c.cfg
    it = iter(micro_batches)

    def step_fn(data_iterator, model):
        mb = next(data_iterator)
        logits = model(mb.student.tokens_BT, mb.student.position_ids_BT, attention_mask=None)

        def loss_fn(logits_BTV):
            student = _response_rows(logits_BTV, mb.student, mb.response_mask_BR.shape[1])
            per_token, diag = per_token_loss(cfg, student, mb, c.arch.vocab_size, group)
            loss = partial_loss(per_token, mb.response_mask_BR, cfg.loss.reduction, normalizer)
            stats = {"loss": loss.detach().clone(), "divergence": masked_mean(per_token.detach(), mb.response_mask_BR)}
            stats.update({k: masked_mean(v.detach(), mb.response_mask_BR) for k, v in diag.items()})
            return loss, torch.ones((), dtype=torch.int), stats

        return logits, loss_fn

    results = get_forward_backward_func()(
        forward_step_func=step_fn, data_iterator=it, model=[c.model], num_microbatches=len(micro_batches),
        seq_length=max(mb.student.tokens_BT.shape[1] for mb in micro_batches),
        micro_batch_size=cfg.trainer.micro_batch_size, forward_only=False)
    summed = {}
    for r in results or []:
        for k, v in r.items():
            summed[k] = summed.get(k, 0.0) + float(v) / (1 if k == "loss" else len(results))
    return summed


def _broadcast_stats(stats: dict, keys: list[str]) -> dict:
    """Loss statistics live on the last pipeline stage; share them with every rank, averaged over DP."""
    from megatron.core import parallel_state as ps

    t = torch.tensor([stats.get(k, 0.0) for k in keys], dtype=torch.float64)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(t, ps.get_pipeline_model_parallel_last_rank(), group=ps.get_pipeline_model_parallel_group())
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    t /= ps.get_data_parallel_world_size()
    t[0] *= ps.get_data_parallel_world_size()  # the loss is a DP sum of partial losses
    return dict(zip(keys, t.tolist()))


def save_rollouts(c, step: int, problems, rollout) -> None:
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_rank() or ps.get_pipeline_model_parallel_rank():
        return
    out = Path(c.cfg.trainer.output_dir) / "rollouts"
    out.mkdir(parents=True, exist_ok=True)
    with (out / f"step_{step + 1:06d}_dp{ps.get_data_parallel_rank()}.jsonl").open("w") as f:
        for p, r, lp, fin in zip(problems, rollout.responses, rollout.logprobs, rollout.finished):
            f.write(json.dumps({"id": p["id"], "problem": p["problem"], "response_ids": r, "logprobs": lp,
                                "finished": fin, "response": c.tokenizer.decode(r)}) + "\n")


def train_step(c, step: int) -> dict:
    from megatron.core import parallel_state as ps

    t0 = time.perf_counter()
    problems = problems_for_step(c, step)
    prompts = [student_prompt_ids(c.tokenizer, c.cfg.data, p["problem"]) for p in problems]
    rollout = c.sampler.generate(prompts, c.cfg.rollout.max_new_tokens)
    if c.cfg.trainer.save_rollouts:
        save_rollouts(c, step, problems, rollout)
    t1 = time.perf_counter()
    micro_batches = build_micro_batches(c, problems, rollout)
    teacher_pass(c, micro_batches)
    normalizer = global_normalizer([mb.response_mask_BR for mb in micro_batches], c.cfg.loss.reduction,
                                   ps.get_data_parallel_group())
    c.optimizer.zero_grad(set_to_none=True)
    c.model.train()
    stats = student_pass(c, micro_batches, normalizer)
    reduce_gradients(c.model)
    grad_norm, finite = clip_and_check(c.model, c.cfg.optimizer.grad_clip)
    if finite:  # a NaN/Inf gradient never reaches the weights
        c.optimizer.step()
        c.teacher.after_optimizer_step()
    c.scheduler.step()
    t2 = time.perf_counter()
    keys = ["loss", "divergence", "student_entropy", "teacher_entropy", "advantage"]
    out = _broadcast_stats(stats, keys)
    if c.cfg.loss.kind == "jsd":
        out.pop("advantage")
    else:
        out.pop("student_entropy"), out.pop("teacher_entropy")
    tokens = torch.tensor([float(rollout.num_tokens)], dtype=torch.float64)
    dist.all_reduce(tokens, group=ps.get_data_parallel_group())
    out.update(step=step + 1, grad_norm=grad_norm, skipped=0 if finite else 1, lr=c.scheduler.get_last_lr()[0],
               response_length=tokens.item() / c.cfg.trainer.global_batch_size, generated_tokens=tokens.item(),
               rollout_time=t1 - t0, train_time=t2 - t1, tokens_per_s=tokens.item() / max(t2 - t0, 1e-9))
    return out
