"""On-Policy Self-Distillation's phases: the student samples ŷ from the problem alone; the teacher
reads problem + reference solution + ŷ in one forward pass; the per-token loss is a divergence
between the two next-token distributions (``_DIVERGENCES``: JSD_β, its top-K form, or the
sampled-token objective) changed by the enabled token modifiers (``_MODIFIERS``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from opsd_megatron.algorithms.base import Diagnostic, Rollouts, Scored
from opsd_megatron.algorithms.peer import peer_solutions
from opsd_megatron.algorithms.step_data import MicroBatch, StepData
from opsd_megatron.config import DataConfig, LossConfig
from opsd_megatron.data.grading import Grader
from opsd_megatron.data.prompts import teacher_prompt_ids
from opsd_megatron.losses.diagnostics import position_thirds
from opsd_megatron.losses.distributions import Hidden, Logits
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
        self.divergence = _DIVERGENCES[_divergence_kind(loss)]
        self.modifiers = [m for m in _MODIFIERS if m.on(loss)]
        self.stat_names = (
            self.divergence.stats + tuple(m.stat for m in self.modifiers) + DIAGNOSTICS
        )

    def rollout(self, step: int) -> Rollouts:
        """``rollout.num_rollouts`` samples per problem, from the student prompt."""
        return self.source.sample(step, self.num_rollouts)

    def score(self, rollouts: Rollouts) -> Scored:
        """The teacher pass: each rollout's teacher prompt (problem + reference solution, or a
        correct peer's), packed with its response into the micro-batches, then forward-only
        through the teacher; its view of the response positions goes to ``mb.teacher`` on the
        last pipeline stage (and the initial policy's to ``mb.reference``)."""
        solutions, counts = self._contexts(rollouts)
        tok = self.source.tokenizer
        teacher_prompts = [
            teacher_prompt_ids(tok, self.data, p["problem"], s or "", p.get("answer"))
            for p, s in zip(rollouts.problems, solutions)
        ]
        mbs = self.source.micro_batches(
            rollouts.prompts,
            rollouts.responses,
            rollouts.logprobs,
            teacher_prompts=teacher_prompts,
            keep=[s is not None for s in solutions],  # no correct peer: left out of the loss
        )
        form = dict(fused=self.loss.fused, chunk_tokens=self.loss.chunk_tokens)
        for mb in mbs:
            r_max = mb.response_mask_BR.shape[1]
            mb.teacher = self.teacher.view(mb.teacher_input, r_max, **form)
            if self.loss.ref_kl_coef:  # the initial policy on the student's own sequence
                mb.reference = self.teacher.view(mb.student, r_max, **form)
        return Scored(mbs, {"generated_tokens": float(rollouts.generated_tokens), **counts})

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
        """The chosen divergence per response token (vocab-parallel over ``groups.tp``), then each
        enabled token modifier in ``_MODIFIERS`` order; ``student`` and ``mb.teacher`` are both
        ``Logits`` or both ``Hidden`` (``loss.fused``). Statistics: the divergence's own, each
        modifier's, and ``DIAGNOSTICS`` (``losses/diagnostics.py``)."""
        kw = dict(temperature=self.loss.temperature, vocab_size=self.vocab_size, group=groups.tp)
        teacher = mb.teacher
        loss, diag, teacher_lp = self.divergence.fn(self.loss, student, teacher, mb, kw)
        for m in self.modifiers:
            loss, diag[m.stat] = m.apply(self.loss, loss, student, mb, diag, kw)
        if teacher_lp is None:
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


# --- the divergences: (loss, own statistics, the teacher's log-probs of ŷ if computed) ----------


def _jsd(cfg: LossConfig, student, teacher, mb, kw):
    out = student.jsd(teacher, beta=cfg.beta, term_clip=cfg.term_clip, compile=cfg.compile, **kw)
    return (
        out.loss,
        dict(student_entropy=out.student_entropy, teacher_entropy=out.teacher_entropy),
        None,
    )


def _topk_jsd(cfg: LossConfig, student, teacher, mb, kw):
    out = student.topk_jsd(
        teacher,
        beta=cfg.beta,
        k=cfg.teacher_top_k,
        mode=cfg.top_k_mode,
        term_clip=cfg.term_clip,
        **kw,
    )
    return out.loss, dict(teacher_topk_mass=out.teacher_mass), None


def _sampled_token(cfg: LossConfig, student, teacher, mb, kw):
    out = student.sampled_token(teacher, mb.response_tokens_BR, baseline=cfg.baseline, **kw)
    return out.loss, dict(advantage=out.advantage), out.teacher_logprobs


@dataclass(frozen=True)
class _Divergence:
    stats: tuple[str, ...]
    fn: Callable


_DIVERGENCES = {
    "jsd": _Divergence(("student_entropy", "teacher_entropy"), _jsd),
    "topk_jsd": _Divergence(("teacher_topk_mass",), _topk_jsd),
    "sampled_token": _Divergence(("advantage",), _sampled_token),
}


def _divergence_kind(cfg: LossConfig) -> str:
    if cfg.kind == "jsd" and cfg.teacher_top_k:
        return "topk_jsd"
    return cfg.kind


# --- the token modifiers, applied in this order: (new loss, the modifier's statistic) -----------


def _token_clip(cfg: LossConfig, loss, student, mb, diag, kw):
    """A token's whole divergence capped at ``loss.token_clip``; a capped token passes no
    gradient."""
    clipped = loss > cfg.token_clip
    return torch.where(clipped, torch.full_like(loss, cfg.token_clip), loss), clipped.float()


def _token_weight(cfg: LossConfig, loss, student, mb, diag, kw):
    """Tokens where the teacher is unsure (entropy above the threshold) down-weighted."""
    h_t = diag.get("teacher_entropy")  # the full JSD computed it already
    if h_t is None:
        h_t = mb.teacher.entropy(**kw)
    low = h_t > cfg.entropy_threshold
    return torch.where(low, cfg.low_confidence_weight * loss, loss), low.float()


def _ref_kl(cfg: LossConfig, loss, student, mb, diag, kw):
    """+ λ·KL(p_S ‖ p_ref) to the initial policy, differentiable w.r.t. the student."""
    ref_kl = student.jsd(mb.reference, beta=1.0, compile=cfg.compile, **kw).loss
    return loss + cfg.ref_kl_coef * ref_kl, ref_kl.detach()


@dataclass(frozen=True)
class _Modifier:
    stat: str
    on: Callable[[LossConfig], bool]
    apply: Callable


_MODIFIERS = (
    _Modifier("token_clipped_fraction", lambda c: c.token_clip is not None, _token_clip),
    _Modifier(
        "low_confidence_fraction", lambda c: c.token_weight == "teacher_entropy", _token_weight
    ),
    _Modifier("ref_kl", lambda c: bool(c.ref_kl_coef), _ref_kl),
)
