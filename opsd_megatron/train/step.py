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
import torch.distributed as dist

from opsd_megatron.algorithms.base import Algorithm
from opsd_megatron.algorithms.step_data import MicroBatch, response_rows, step_response_stats
from opsd_megatron.losses.distributions import Hidden, Logits
from opsd_megatron.losses.reduction import masked_sum_count, partial_loss
from opsd_megatron.models import loss_contract
from opsd_megatron.models.forward import pad_for_sequence_parallel
from opsd_megatron.models.output_head import hidden_states_out, logits_of, output_weight
from opsd_megatron.platform.clock import wall_clock
from opsd_megatron.platform.parallel import ParallelGroups
from opsd_megatron.train.components import Components
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
    sampled = ["sampler_logprob_error"] if any(mb.sampled for mb in mbs) else []
    out = share_stats(
        stats, ["loss", "divergence", *algorithm.stat_names, *sampled], {"loss"}, c.groups
    )
    counts = share_stats(
        scored.counts, list(scored.counts), set(scored.counts), c.groups
    )  # summed over DP
    if "reward_sum" in counts:
        out["reward"] = counts.pop("reward_sum") / max(counts.pop("rollouts"), 1.0)
    tokens = counts.pop("generated_tokens")
    out.update(counts)
    out.update(
        step=step + 1,
        grad_norm=grad_norm,
        skipped=0 if finite else 1,
        lr=lr,
        response_length=tokens / c.cfg.trainer.global_batch_size,
        generated_tokens=tokens,
        tokens_per_s=tokens / max(clock[-1] - clock[0], 1e-9),
    )
    out.update(phase_times(clock, c.sampler))
    if rollouts.finished is not None:  # sampled: length, truncation, repetition, markers
        figures = step_response_stats(
            rollouts, c.tokenizer, c.groups, c.cfg.logging.uncertainty_markers
        )
        figures.pop("response_length")  # logged above, from the engine's token count
        out.update(figures)
    return out


PHASES = ("rollout", "score", "student", "optimizer")


def phase_times(clock: list[float], sampler) -> dict[str, float]:
    """``time/<phase>`` seconds from the phases' end times, the whole ``time/step``, and the
    sampler's own split where it keeps one: ``time/prefill`` and ``time/decode`` (Megatron
    sampler), ``time/refit`` (vLLM's weight push); all inside ``time/rollout``."""
    out = {f"time/{name}": b - a for name, a, b in zip(PHASES, clock, clock[1:])}
    out["time/step"] = clock[-1] - clock[0]
    for name, seconds in getattr(sampler, "last_phase_s", {}).items():
        out[f"time/{name}"] = seconds
    if hasattr(sampler, "last_refit_s"):
        out["time/refit"] = sampler.last_refit_s
    return out


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
            hidden = response_rows(output_BTH, mb.student, mb.response_mask_BR.shape[1])
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

    # Micro-batches by token budget differ in rows and width: the pipeline then sends each
    # activation's shape ahead of it (megatron-core 0.16.1 p2p_communication._communicate_shapes)
    shapes = {tuple(mb.student.tokens_BT.shape) for mb in micro_batches}
    c.model.config.variable_seq_lengths = groups.pp_size > 1 and len(shapes) > 1
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
    counts = {k: float(v[1]) for k, v in totals.items() if k != "loss"}
    return TokenMeans(means, counts)


class TokenMeans(dict):
    """{statistic: this rank's value} — the summed loss, and each diagnostic's mean over this
    rank's response tokens — with ``counts`` (tokens per diagnostic), so that DP ranks combine
    into the mean over all the step's tokens however the rows were grouped into micro-batches."""

    def __init__(self, means: dict, counts: dict):
        super().__init__(means)
        self.counts = counts


def share_stats(stats: dict, keys: list[str], summed: set[str], groups: ParallelGroups) -> dict:
    """Loss statistics live on the last pipeline stage: give them to every rank; over DP, keys in
    ``summed`` add up (the loss is a sum of partial losses), token means (``TokenMeans``) are
    weighted by their token counts, and other values are averaged."""
    counts = getattr(stats, "counts", {})
    flat = []
    for k in keys:
        value, n = float(stats.get(k, 0.0)), 0.0 if k in summed else counts.get(k, 1.0)
        flat += [value if k in summed else value * n, n]
    t = torch.tensor(flat, dtype=torch.float64).to(groups.device)  # NCCL: accelerator tensors
    if groups.pp_size > 1:
        dist.broadcast(t, groups.pp_last_rank, group=groups.pp)
    dist.all_reduce(t, group=groups.dp)
    v = t.tolist()
    return {
        k: v[2 * j] if k in summed else v[2 * j] / max(v[2 * j + 1], 1e-30)
        for j, k in enumerate(keys)
    }


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
