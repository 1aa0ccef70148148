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

from opsd_megatron.algorithms.base import Rollouts, Scored
from opsd_megatron.algorithms.batches import MicroBatch, response_rows
from opsd_megatron.algorithms.peer import peer_solutions
from opsd_megatron.algorithms.rollouts import RolloutSource
from opsd_megatron.config import DataConfig, LossConfig
from opsd_megatron.data.grading import Grader
from opsd_megatron.data.prompts import pack, teacher_prompt_ids
from opsd_megatron.losses import heads
from opsd_megatron.losses.diagnostics import position_thirds
from opsd_megatron.losses.heads import Hidden
from opsd_megatron.losses.topk_jsd import vocab_parallel_topk_jsd
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
        source: RolloutSource,
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
        extra = (("ref_kl",) if loss.ref_kl_coef else ()) + (
            ("low_confidence_fraction",) if loss.token_weight == "teacher_entropy" else ()
        )
        self.stat_names = own + extra + DIAGNOSTICS

    def rollout(self, step: int) -> Rollouts:
        """``rollout.num_rollouts`` samples per problem, from the student prompt."""
        return self.source.sample(step, self.num_rollouts)

    def score(self, rollouts: Rollouts) -> Scored:
        """The teacher pass: each micro-batch's responses after the teacher prompt (problem +
        reference solution), forward-only; its vocab-sharded logits at the response positions go
        to ``extras["teacher_logits_BRV"]`` on the last pipeline stage."""
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
            self._keep(mb, "teacher", teacher)
            if self.loss.ref_kl_coef:  # the initial policy on the student's own sequence
                self._keep(mb, "ref", mb.student)
        return Scored(mbs, {"generated_tokens": float(rollouts.generated_tokens), **counts})

    def _keep(self, mb: MicroBatch, name: str, packed) -> None:
        """The teacher's view of ``packed`` at the response positions, kept in ``mb.extras``:
        logits ``[B, R, V/tp]``, or with ``loss.fused`` hidden states ``[B, R, H]`` and the
        teacher's output-layer shard (last pipeline stage only)."""
        r_max = mb.response_mask_BR.shape[1]
        states, weight = self.teacher.hidden(packed.tokens_BT, packed.position_ids_BT)
        if states is None:  # not the last pipeline stage
            return
        rows = response_rows(states, packed, r_max)
        if self.loss.fused:
            mb.extras[f"{name}_hidden_BRH"], mb.extras[f"{name}_weight_VH"] = rows, weight
        else:  # the output layer on ŷ's rows only
            mb.extras[f"{name}_logits_BRV"] = logits_of(rows, weight)

    def _view(self, mb: MicroBatch, name: str, student):
        """What ``_keep`` kept, in the student's form (``losses/heads.py``)."""
        if not isinstance(student, Hidden):
            return mb.extras[f"{name}_logits_BRV"]
        return Hidden(
            mb.extras[f"{name}_hidden_BRH"], mb.extras[f"{name}_weight_VH"], student.chunk_tokens
        )

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

    def per_token_loss(self, student, mb: MicroBatch, groups: ParallelGroups):
        """JSD_β(p_T ‖ p_S) over the vocabulary per response token (vocab-parallel over ``groups.tp``),
        or the sampled-token objective; ``student`` is its logits ``[B, R, V/tp]`` or, with
        ``loss.fused``, its hidden states (``heads.Hidden``). Diagnostics: the two entropies, or
        the advantage, and ``DIAGNOSTICS`` (``losses/diagnostics.py``; a ``(values, mask)`` pair is
        averaged over its own mask)."""
        kw = dict(temperature=self.loss.temperature, vocab_size=self.vocab_size, group=groups.tp)
        teacher = self._view(mb, "teacher", student)
        if self.loss.kind == "jsd" and self.loss.teacher_top_k:
            out = vocab_parallel_topk_jsd(
                student,
                teacher,
                beta=self.loss.beta,
                k=self.loss.teacher_top_k,
                mode=self.loss.top_k_mode,
                term_clip=self.loss.term_clip,
                **kw,
            )
            diag = {"teacher_topk_mass": out.teacher_mass}
        elif self.loss.kind == "jsd":
            out = heads.jsd(
                student,
                teacher,
                beta=self.loss.beta,
                term_clip=self.loss.term_clip,
                compile=self.loss.compile,
                **kw,
            )
            diag = {"student_entropy": out.student_entropy, "teacher_entropy": out.teacher_entropy}
        else:
            out = heads.sampled_token(
                student, teacher, mb.response_tokens_BR, baseline=self.loss.baseline, **kw
            )
            diag = {"advantage": out.advantage}
        loss = out.loss
        if self.loss.token_weight == "teacher_entropy":  # unsure teacher: down-weighted tokens
            h_t = diag.get("teacher_entropy")  # the full JSD computed it already
            if h_t is None:
                h_t = heads.entropy(teacher, **kw)
            low = h_t > self.loss.entropy_threshold
            loss = torch.where(low, self.loss.low_confidence_weight * loss, loss)
            diag["low_confidence_fraction"] = low.to(torch.float32)
        if self.loss.ref_kl_coef:  # λ·KL(p_S ‖ p_ref), differentiable w.r.t. the student
            ref = self._view(mb, "ref", student)
            ref_kl = heads.jsd(student, ref, beta=1.0, compile=self.loss.compile, **kw).loss
            loss = loss + self.loss.ref_kl_coef * ref_kl
            diag["ref_kl"] = ref_kl.detach()
        first, middle, last = position_thirds(mb.response_mask_BR)
        per_token = loss.detach()
        if self.loss.kind == "sampled_token":  # the objective computed it already
            teacher_lp = out.teacher_logprobs
        else:
            with torch.no_grad():
                teacher_lp = heads.token_logprobs(teacher, mb.response_tokens_BR, **kw)
        diag.update(
            top1_agreement=heads.top1_agreement(student, teacher, self.vocab_size, groups.tp),
            teacher_logprob=teacher_lp,
            divergence_first=(per_token, first),
            divergence_middle=(per_token, middle),
            divergence_last=(per_token, last),
        )
        return loss, diag
