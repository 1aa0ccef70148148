"""One training step, top to bottom (OPSD shown; SFT and GRPO differ only in their phases):

    rollout  the student samples ŷ for this DP rank's problems from the problem alone
             (``algorithm.rollout``: ``algorithms/step_data.py`` -> the rollout engine)
    score    the teacher reads problem + reference solution + ŷ in one forward-only pass; its
             view of ŷ's positions rides along in each micro-batch (``mb.teacher``)
             (``algorithm.score``: ``models/teacher.py``)
    student  forward and backward of every micro-batch through megatron's pipeline schedule,
             the vocab-parallel loss on ŷ's tokens (``algorithm.per_token_loss`` ->
             ``student.jsd(mb.teacher)``: ``losses/distributions.py`` -> ``losses/jsd.py``)
    reduce   megatron DDP + ``finalize_model_grads``: DP sum, TP-duplicated params, tied
             embeddings (how megatron scales our loss: ``models/loss_contract.py``)
    update   global-norm clipping, a non-finite norm skips the update, megatron's optimizer (fp32
             master weights), the LR schedule (``train/optimizer.py``), the teacher's EMA.

Legend: B micro-batch rows, T sequence length, R response length, V local vocab shard.
"""

from __future__ import annotations

import torch

from opsd_megatron.algorithms.base import Algorithm
from opsd_megatron.algorithms.step_data import MicroBatch
from opsd_megatron.losses.distributions import Hidden, Logits
from opsd_megatron.losses.reduction import masked_sum_count, partial_loss
from opsd_megatron.models import loss_contract
from opsd_megatron.models.forward import pad_for_sequence_parallel
from opsd_megatron.models.output_head import hidden_states_out, logits_of, output_weight
from opsd_megatron.platform.clock import wall_clock
from opsd_megatron.train.components import Components
from opsd_megatron.train.metrics import StepStats, step_metrics
from opsd_megatron.train.optimizer import optimizer_step, zero_grads


def train_step(c: Components, algorithm: Algorithm, step: int) -> dict:
    """Run step ``step`` (0-based) on every rank; returns its metrics (the same on every rank).
    Collective over the whole world."""
    clock = [wall_clock(c.groups.device)]  # each phase's end (device work included)
    rollouts = algorithm.rollout(step)
    clock.append(wall_clock(c.groups.device))
    scored = algorithm.score(rollouts)
    clock.append(wall_clock(c.groups.device))
    mbs = scored.micro_batches
    normalizer = loss_contract.normalizer(
        [mb.response_mask_BR for mb in mbs], c.cfg.loss.reduction, c.groups.dp
    )
    lr = c.scheduler.get_last_lr()[0]  # the rate this step's update uses (logged as such)
    zero_grads(c.ddp, c.optimizer)
    c.model.train()
    stats = student_pass(c, algorithm, mbs, normalizer)
    clock.append(wall_clock(c.groups.device))
    loss_contract.finalize_gradients(c.ddp)
    grad_norm, finite = optimizer_step(c.optimizer, c.cfg.optimizer.grad_clip)  # NaN/Inf: skipped
    if finite:
        c.teacher.after_optimizer_step()
    c.scheduler.step()
    clock.append(wall_clock(c.groups.device))
    return step_metrics(c, algorithm, step, rollouts, scored, stats, clock, grad_norm, finite, lr)


def student_pass(
    c: Components, algorithm: Algorithm, micro_batches: list[MicroBatch], normalizer
) -> dict:
    """Forward + backward of every micro-batch through megatron's schedule; returns summed stats
    (on the last pipeline stage; empty elsewhere)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    groups, reduction, fused = c.groups, c.cfg.loss.reduction, c.cfg.loss.fused
    weight = output_weight(c.model)  # the output layer's vocab shard (None off the last stage)

    def step_fn(data_iterator, model):
        mb = next(data_iterator)
        tokens, positions = pad_for_sequence_parallel(
            model, mb.student.tokens_BT, mb.student.position_ids_BT
        )
        # the last stage returns final-norm hidden states [B, T, H]: the output layer runs on
        # the response rows only (logits_of), or chunk by chunk inside the fused loss
        with hidden_states_out(c.model):
            output = model(tokens, positions, attention_mask=None)

        def loss_fn(output_BTH):
            hidden = mb.student.response_rows(output_BTH, mb.response_mask_BR.shape[1])
            if fused:
                student = Hidden(hidden, weight, c.cfg.loss.chunk_tokens)
            else:
                student = Logits(logits_of(hidden, weight))
            per_token, diag = algorithm.per_token_loss(student, mb, groups)
            loss = partial_loss(per_token, mb.response_mask_BR, reduction, normalizer)
            stats = {  # the loss, and (sum, count) over response tokens of each diagnostic
                "loss": loss.detach().clone(),
                "divergence": masked_sum_count(per_token, mb.response_mask_BR),
            }
            for k, d in diag.items():
                mask = mb.response_mask_BR if d.mask_BR is None else d.mask_BR
                stats[k] = masked_sum_count(d.values_BR, mask)
            if mb.sampled:
                stats["sampler_logprob_error"] = _sampler_logprob_error(c, student, mb)
            return loss_contract.loss_return(loss, stats)

        return output, loss_fn

    results = get_forward_backward_func()(
        forward_step_func=step_fn,
        data_iterator=iter(micro_batches),
        model=[c.ddp],
        num_microbatches=len(micro_batches),
        seq_length=_schedule_seq_length(c.model, micro_batches),
        micro_batch_size=max(mb.student.tokens_BT.shape[0] for mb in micro_batches),
        forward_only=False,
    )
    totals = {}
    for r in results or []:
        for k, v in r.items():
            v = v.detach().double().reshape(-1)
            totals[k] = totals[k] + v if k in totals else v
    means = {
        k: float(v[0]) if k == "loss" else float(v[0] / v[1].clamp(min=1))
        for k, v in totals.items()
    }
    return StepStats(means, {k: float(v[1]) for k, v in totals.items() if k != "loss"})


@torch.no_grad()
def _sampler_logprob_error(c: Components, student: Logits | Hidden, mb: MicroBatch):
    """Mean |log π_train(ŷ) − log π_sampler(ŷ)| over response tokens, both of the sampling
    distribution (temperature, top-k, top-p): ~0 when the rollout engine samples from the weights
    being trained (catches a stale or wrong vLLM refit)."""
    lp = student.token_logprobs(  # under no_grad: no graph, whichever form ``student`` has
        mb.response_tokens_BR,
        **c.cfg.rollout.logprob_distribution,
        vocab_size=c.arch.vocab_size,
        group=c.groups.tp,
    )
    return masked_sum_count((lp - mb.sampler_logprobs_BR.to(lp.dtype)).abs(), mb.response_mask_BR)


def _schedule_seq_length(model, micro_batches: list[MicroBatch]) -> int:
    """The widest micro-batch, padded as the forward pads it (all alike without a token budget)."""
    width = max(mb.student.tokens_BT.shape[1] for mb in micro_batches)
    tp = model.config.tensor_model_parallel_size if model.config.sequence_parallel else 1
    return width + (-width) % tp
