"""Sampling the student's rollouts for a step (shared by OPSD and GRPO), optionally saved to disk."""

from __future__ import annotations

import json
from pathlib import Path

from opsd_megatron.data.prompts import student_prompt_ids


def student_rollouts(c, problems, step: int):
    prompts = [student_prompt_ids(c.tokenizer, c.cfg.data, p["problem"]) for p in problems]
    rollout = c.sampler.generate(prompts, c.cfg.rollout.max_new_tokens)
    if c.cfg.trainer.save_rollouts:
        save_rollouts(c, step, problems, rollout)
    return prompts, rollout


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
