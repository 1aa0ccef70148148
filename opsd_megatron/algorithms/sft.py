"""Supervised fine-tuning: cross-entropy on the reference solution given the student prompt (or,
for a deterministic ``sft.teacher_prompt_fraction`` of examples, the teacher prompt), masked to
the solution's tokens (the solution is followed by the end-of-turn token)."""

from __future__ import annotations

import zlib

from opsd_megatron.data.prompts import student_prompt_ids, teacher_prompt_ids
from opsd_megatron.losses import vocab_parallel_token_logprobs
from opsd_megatron.train.batches import micro_batches, problems_for_step


class SFT:
    @staticmethod
    def stat_names(cfg) -> list[str]:
        return []

    def prepare(self, c, step: int):
        cfg, tok = c.cfg, c.tokenizer
        problems = problems_for_step(c, step)
        frac = cfg.sft.teacher_prompt_fraction
        prompts = [teacher_prompt_ids(tok, cfg.data, p["problem"], p["solution"])
                   if (zlib.crc32(f"{step}:{i}".encode()) % 1000) < frac * 1000
                   else student_prompt_ids(tok, cfg.data, p["problem"]) for i, p in enumerate(problems)]
        targets = [tok.encode(p["solution"], add_special_tokens=False) + [tok.eos_token_id] for p in problems]
        return micro_batches(prompts, targets, None, cfg.trainer.micro_batch_size, tok.pad_token_id), \
            {"generated_tokens": 0.0, "reference_tokens": float(sum(len(t) for t in targets))}

    def per_token_loss(self, c, student_BRV, mb, group):
        logprobs = vocab_parallel_token_logprobs(student_BRV, mb.response_tokens_BR, vocab_size=c.arch.vocab_size,
                                                 group=group)
        return -logprobs, {}
