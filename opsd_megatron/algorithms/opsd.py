r"""On-Policy Self-Distillation: the student samples ŷ from the problem alone; the teacher (frozen
initial policy, or EMA/current) scores ŷ after reading the problem and the reference solution in
one forward pass; the loss on each of ŷ's tokens is the vocab-parallel generalized JSD_β between
the teacher's and the student's next-token distributions (``loss.kind=jsd``; with
``loss.teacher_top_k`` over the teacher's top-K plus a tail bucket, or renormalised; with
``loss.ref_kl_coef`` plus λ·KL(p_S ‖ p_ref) to the initial policy; ``loss.token_weight`` scales
tokens the teacher is unsure of), or the sampled-token
objective −sg[log p_T(ŷ_n) − log p_S(ŷ_n)]·log p_S(ŷ_n) (``loss.kind=sampled_token``)."""

from __future__ import annotations

import torch

from opsd_megatron.algorithms.base import Diagnostic, Rollouts, Scored
from opsd_megatron.algorithms.peer import peer_solutions
from opsd_megatron.algorithms.step_data import MicroBatch, StepData, response_rows
from opsd_megatron.config import DataConfig, LossConfig
from opsd_megatron.data.grading import Grader
from opsd_megatron.data.prompts import pack, teacher_prompt_ids
from opsd_megatron.losses.diagnostics import position_thirds
from opsd_megatron.losses.distributions import Hidden, Logits
from opsd_megatron.models.output_head import logits_of
from opsd_megatron.models.teacher import Teacher
from opsd_megatron.platform.parallel import ParallelGroups

DIAGNOSTICS = (
    "top1_agreement",
    "teacher_logprob",
    "divergence_first",
    "divergence_middle",
    "divergence_last",
)


class OPSD:
    """OPSD's phases, built from the loss and data sections, the teacher and the rollout source."""

    def __init__(
        self,
        source: StepData,
        loss: LossConfig,
        data: DataConfig,
        teacher: Teacher,
        vocab_size: int,
        num_rollouts: int = 1,
        peers: tuple[str, Grader] | None = None,
    ):
        """``peers``: (``teacher.context``, grader) for reference-free OPSD (algorithms/peer.py)."""
        self.source, self.loss, self.data, self.teacher = source, loss, data, teacher
        self.vocab_size, self.num_rollouts, self.peers = vocab_size, num_rollouts, peers
        if loss.kind == "sampled_token":
            own = ("advantage",)
        elif loss.teacher_top_k:
            own = ("teacher_topk_mass",)
        else:
            own = ("student_entropy", "teacher_entropy")
        extra = (
            (("ref_kl",) if loss.ref_kl_coef else ())
            + (("low_confidence_fraction",) if loss.token_weight == "teacher_entropy" else ())
            + (("token_clipped_fraction",) if loss.token_clip is not None else ())
        )
        self.stat_names = own + extra + DIAGNOSTICS

    def rollout(self, step: int) -> Rollouts:
        """``rollout.num_rollouts`` samples per problem, from the student prompt."""
        return self.source.sample(step, self.num_rollouts)

    def score(self, rollouts: Rollouts) -> Scored:
        """The teacher pass: each micro-batch's responses after the teacher prompt (problem +
        reference solution), forward-only; its view of the response positions goes to
        ``mb.teacher`` on the last pipeline stage (and the initial policy's to ``mb.reference``)."""
        tok = self.source.tokenizer
        mbs = self.source.micro_batches(rollouts.prompts, rollouts.responses, rollouts.logprobs)
        solutions, counts = self._contexts(rollouts)
        for mb in mbs:
            keep = torch.tensor([solutions[i] is not None for i in mb.rows], device=mb.device)
            mb.response_mask_BR &= keep[:, None]  # no correct peer: left out of the loss
            prompts = [
                teacher_prompt_ids(
                    tok,
                    self.data,
                    rollouts.problems[i]["problem"],
                    solutions[i] or "",
                    rollouts.problems[i].get("answer"),
                )
                for i in mb.rows
            ]
            responses = [rollouts.responses[i] for i in mb.rows]
            teacher = pack(prompts, responses, tok.pad_token_id, device=mb.device)
            mb.teacher = self._view(mb, teacher)
            if self.loss.ref_kl_coef:  # the initial policy on the student's own sequence
                mb.reference = self._view(mb, mb.student)
        return Scored(mbs, {"generated_tokens": float(rollouts.generated_tokens), **counts})

    def _view(self, mb: MicroBatch, packed) -> Logits | Hidden | None:
        """The teacher's view of ``packed`` at the response positions: logits ``[B, R, V/tp]``
        (the output layer on ŷ's rows only), or with ``loss.fused`` hidden states ``[B, R, H]``
        and the teacher's output-layer shard; None off the last pipeline stage."""
        states, weight = self.teacher.hidden(packed.tokens_BT, packed.position_ids_BT)
        if states is None:
            return None
        rows = response_rows(states, packed, mb.response_mask_BR.shape[1])
        if self.loss.fused:
            return Hidden(rows, weight, self.loss.chunk_tokens)
        return Logits(logits_of(rows, weight))

    def _contexts(self, rollouts: Rollouts) -> tuple[list[str | None], dict[str, float]]:
        """The solution text each rollout's teacher reads: the reference, or a correct peer."""
        if self.peers is None:
            return [p["solution"] for p in rollouts.problems], {}
        context, grader = self.peers
        tok = self.source.tokenizer
        texts = [tok.decode(r, skip_special_tokens=True) for r in rollouts.responses]
        correct = [
            bool(grader.grade(t, p["answer"]).correct) for t, p in zip(texts, rollouts.problems)
        ]
        chosen = peer_solutions(rollouts.problems, texts, correct, self.num_rollouts, context)
        return chosen, {
            "peer_correct": float(sum(correct)),
            "peer_skipped": float(sum(s is None for s in chosen)),
        }

    def per_token_loss(self, student: Logits | Hidden, mb: MicroBatch, groups: ParallelGroups):
        """JSD_β(p_T ‖ p_S) over the vocabulary per response token (vocab-parallel over
        ``groups.tp``), or the sampled-token objective; ``student`` and ``mb.teacher`` are both
        ``Logits`` or both ``Hidden`` (``loss.fused``). Diagnostics: the two entropies, or the
        advantage, and ``DIAGNOSTICS`` (``losses/diagnostics.py``)."""
        kw = dict(temperature=self.loss.temperature, vocab_size=self.vocab_size, group=groups.tp)
        loss_cfg, teacher, diag = self.loss, mb.teacher, {}
        if loss_cfg.kind == "jsd" and loss_cfg.teacher_top_k:
            out = student.topk_jsd(
                teacher, beta=loss_cfg.beta, k=loss_cfg.teacher_top_k, mode=loss_cfg.top_k_mode,
                term_clip=loss_cfg.term_clip, **kw,
            )  # fmt: skip
            diag["teacher_topk_mass"] = out.teacher_mass
        elif loss_cfg.kind == "jsd":
            out = student.jsd(
                teacher, beta=loss_cfg.beta, term_clip=loss_cfg.term_clip,
                compile=loss_cfg.compile, **kw,
            )  # fmt: skip
            diag.update(student_entropy=out.student_entropy, teacher_entropy=out.teacher_entropy)
        else:
            out = student.sampled_token(
                teacher, mb.response_tokens_BR, baseline=loss_cfg.baseline, **kw
            )
            diag["advantage"] = out.advantage
        loss = out.loss
        if loss_cfg.token_clip is not None:  # a token's whole divergence capped, no gradient
            clipped = loss > loss_cfg.token_clip
            loss = torch.where(clipped, torch.full_like(loss, loss_cfg.token_clip), loss)
            diag["token_clipped_fraction"] = clipped.to(torch.float32)
        if loss_cfg.token_weight == "teacher_entropy":  # unsure teacher: down-weighted tokens
            h_t = diag.get("teacher_entropy")  # the full JSD computed it already
            if h_t is None:
                h_t = teacher.entropy(**kw)
            low = h_t > loss_cfg.entropy_threshold
            loss = torch.where(low, loss_cfg.low_confidence_weight * loss, loss)
            diag["low_confidence_fraction"] = low.to(torch.float32)
        if loss_cfg.ref_kl_coef:  # λ·KL(p_S ‖ p_ref), differentiable w.r.t. the student
            ref_kl = student.jsd(mb.reference, beta=1.0, compile=loss_cfg.compile, **kw).loss
            loss = loss + loss_cfg.ref_kl_coef * ref_kl
            diag["ref_kl"] = ref_kl.detach()
        if loss_cfg.kind == "sampled_token":  # the objective computed it already
            teacher_lp = out.teacher_logprobs
        else:
            with torch.no_grad():
                teacher_lp = teacher.token_logprobs(mb.response_tokens_BR, **kw)
        diag.update(
            top1_agreement=student.top1_agreement(teacher, self.vocab_size, groups.tp),
            teacher_logprob=teacher_lp,
        )
        stats = {k: Diagnostic(v) for k, v in diag.items()}
        per_token = loss.detach()
        thirds = zip(("first", "middle", "last"), position_thirds(mb.response_mask_BR))
        stats.update({f"divergence_{where}": Diagnostic(per_token, m) for where, m in thirds})
        return loss, stats
