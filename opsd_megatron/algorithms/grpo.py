r"""GRPO (the paper's RL baseline): G rollouts per problem, binary reward from the grader, group-
normalised advantage A = (r − mean_g) / (std_g + ε), clipped surrogate

    loss_n = −min(ρ_n A, clip(ρ_n, 1−ε_c, 1+ε_c) A) + β_KL · k3(log π_ref − log π),   ρ_n = π(ŷ_n)/π_old(ŷ_n)

with π_old the sampler's log-probs (one update per batch) and the optional KL to the initial
policy (adapters off) by the k3 estimator. Groups whose rewards are all equal carry no signal: they
are counted and left out of the loss.
"""

from __future__ import annotations

import torch

from opsd_megatron.algorithms.rollouts import student_rollouts
from opsd_megatron.eval.grading import Grader, last_boxed
from opsd_megatron.losses import vocab_parallel_token_logprobs
from opsd_megatron.models.forward import forward_logits
from opsd_megatron.train.batches import micro_batches, problems_for_step, response_rows


def group_advantages(rewards_G: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """[groups, G] rewards -> (advantages [groups, G], informative [groups])."""
    mean, std = rewards_G.mean(dim=1, keepdim=True), rewards_G.std(dim=1, unbiased=False, keepdim=True)
    informative = std[:, 0] > 0
    return torch.where(informative[:, None], (rewards_G - mean) / (std + eps), 0.0), informative


class GRPO:
    @staticmethod
    def stat_names(cfg) -> list[str]:
        return ["kl"] if cfg.grpo.kl_coef > 0 else []

    def __init__(self):
        self.grader = None

    def prepare(self, c, step: int):
        cfg, tok = c.cfg, c.tokenizer
        g = cfg.grpo.group_size
        problems = problems_for_step(c, step, g)
        prompts, rollout = student_rollouts(c, problems, step)
        self.grader = self.grader or Grader(cfg.eval.grade_timeout)
        rewards = torch.tensor([
            float(bool(self.grader.grade(tok.decode(r, skip_special_tokens=True),
                                         p.get("answer") or last_boxed(p["solution"]) or "").correct))
            for p, r in zip(problems, rollout.responses)])
        adv, informative = group_advantages(rewards.view(-1, g))
        adv, keep = adv.reshape(-1), informative.repeat_interleave(g)
        mbs = micro_batches(prompts, rollout.responses, rollout.logprobs, cfg.trainer.micro_batch_size,
                            tok.pad_token_id)
        micro = cfg.trainer.micro_batch_size
        for k, mb in enumerate(mbs):
            rows = slice(k * micro, (k + 1) * micro)
            mb.response_mask_BR &= keep[rows, None]
            mb.extras["advantage_B"] = adv[rows]
            if cfg.grpo.kl_coef > 0:
                self._reference_logprobs(c, mb)
        info = {"generated_tokens": float(rollout.num_tokens), "reward_sum": float(rewards.sum()),
                "rollouts": float(len(rewards)), "skipped_groups": float((~informative).sum())}
        return mbs, info

    def _reference_logprobs(self, c, mb) -> None:
        from megatron.core import parallel_state as ps

        with c.teacher.active() as ref:  # the initial policy: adapters off / frozen copy
            logits = forward_logits(ref, mb.student.tokens_BT, mb.student.position_ids_BT)
        if logits is not None:
            rows = response_rows(logits, mb.student, mb.response_mask_BR.shape[1])
            mb.extras["ref_logprobs_BR"] = vocab_parallel_token_logprobs(
                rows, mb.response_tokens_BR, temperature=c.cfg.rollout.temperature, vocab_size=c.arch.vocab_size,
                group=ps.get_tensor_model_parallel_group())

    def per_token_loss(self, c, student_BRV, mb, group):
        cfg = c.cfg
        logprobs = vocab_parallel_token_logprobs(student_BRV, mb.response_tokens_BR,
                                                 temperature=cfg.rollout.temperature, vocab_size=c.arch.vocab_size,
                                                 group=group)
        ratio = torch.exp(logprobs - mb.sampler_logprobs_BR.to(logprobs.dtype))
        adv = mb.extras["advantage_B"][:, None].to(logprobs.dtype)
        eps = cfg.grpo.clip_eps
        loss = -torch.minimum(ratio * adv, ratio.clamp(1 - eps, 1 + eps) * adv)
        diag = {}
        if cfg.grpo.kl_coef > 0:
            delta = mb.extras["ref_logprobs_BR"].to(logprobs.dtype) - logprobs
            kl = torch.exp(delta) - delta - 1
            loss = loss + cfg.grpo.kl_coef * kl
            diag["kl"] = kl
        return loss, diag
