"""On-Policy Self-Distillation: the student samples ŷ from the problem alone; the teacher (frozen
initial policy, or EMA/current) scores ŷ after reading the problem and the reference solution; the
loss is the vocab-parallel JSD_β (or the sampled-token objective) on ŷ's tokens."""

from __future__ import annotations

from opsd_megatron.algorithms.rollouts import student_rollouts
from opsd_megatron.data.prompts import pack, teacher_prompt_ids
from opsd_megatron.losses import vocab_parallel_jsd_with_entropy, vocab_parallel_sampled_token_loss
from opsd_megatron.train.batches import micro_batches, problems_for_step, response_rows


class OPSD:
    @staticmethod
    def stat_names(cfg) -> list[str]:
        return ["student_entropy", "teacher_entropy"] if cfg.loss.kind == "jsd" else ["advantage"]

    def prepare(self, c, step: int):
        cfg, tok = c.cfg, c.tokenizer
        problems = problems_for_step(c, step, cfg.rollout.num_rollouts)
        prompts, rollout = student_rollouts(c, problems, step)
        mbs = micro_batches(prompts, rollout.responses, rollout.logprobs, cfg.trainer.micro_batch_size,
                            tok.pad_token_id)
        micro = cfg.trainer.micro_batch_size
        for k, mb in enumerate(mbs):  # teacher pass: forward-only, no grad
            rows = problems[k * micro:(k + 1) * micro]
            teacher = pack([teacher_prompt_ids(tok, cfg.data, p["problem"], p["solution"]) for p in rows],
                           rollout.responses[k * micro:(k + 1) * micro], tok.pad_token_id)
            logits = c.teacher.logits(teacher.tokens_BT, teacher.position_ids_BT)
            if logits is not None:  # last pipeline stage
                mb.extras["teacher_logits_BRV"] = response_rows(logits, teacher, mb.response_mask_BR.shape[1])
        return mbs, {"generated_tokens": float(rollout.num_tokens)}

    def per_token_loss(self, c, student_BRV, mb, group):
        cfg = c.cfg
        kw = dict(temperature=cfg.loss.temperature, vocab_size=c.arch.vocab_size, group=group)
        teacher = mb.extras["teacher_logits_BRV"]
        if cfg.loss.kind == "jsd":
            out = vocab_parallel_jsd_with_entropy(student_BRV, teacher, beta=cfg.loss.beta,
                                                  term_clip=cfg.loss.term_clip, **kw)
            return out.loss, {"student_entropy": out.student_entropy, "teacher_entropy": out.teacher_entropy}
        out = vocab_parallel_sampled_token_loss(student_BRV, teacher, mb.response_tokens_BR, **kw)
        return out.loss, {"advantage": out.advantage}
