"""Shared helpers for the trainer tests: the tiny recipe, shrunk, and a plain single-process
reference."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
RECIPE = str(ROOT / "recipes" / "tiny_cpu.yaml")


def overrides(out: Path, tp=1, pp=1, steps=2, extra=()):
    return [
        f"trainer.output_dir={out}",
        f"trainer.max_steps={steps}",
        "trainer.global_batch_size=4",
        "trainer.micro_batch_size=2",
        "rollout.max_new_tokens=8",
        "trainer.save_rollouts=true",
        "checkpoint.save_interval=1",
        "logging.tensorboard=false",
        "logging.progress_bar=false",
        f"parallel.tensor_model_parallel_size={tp}",
        f"parallel.pipeline_model_parallel_size={pp}",
        "optimizer.warmup_ratio=0.0",
        "optimizer.lr=0.05",
        *extra,
    ]


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def rollouts(out: Path, step: int) -> list[dict]:
    rows = []
    for f in sorted(out.glob(f"rollouts/step_{step:06d}_dp*.jsonl")):
        rows += [json.loads(ln) for ln in f.read_text().splitlines()]
    return rows


def hf_initial_model(cfg):
    """The recipe's randomly initialised model as HF transformers in fp64 (the independent
    reference): the same seeded weights the run starts from at any TP/PP."""
    import transformers

    from opsd_megatron.models.from_config import arch_of
    from opsd_megatron.models.random_init import RandomHFWeights

    arch = arch_of(cfg.model)
    hf = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**cfg.model.architecture))
    weights = RandomHFWeights(arch, cfg.model.init_seed, cfg.model.init_std).state_dict()
    if arch.tie_word_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    hf.load_state_dict(weights)
    return hf.double().eval()


def reference_first_step_loss(out: Path, beta: float = 0.5) -> float:
    """Step 1 recomputed in one process with HF transformers in fp64 on the run's own rollouts.

    At step 1 the LoRA adapters are zero, so student and teacher are both the initial model; the
    loss is the paper's sequence mean of token means of full-vocabulary JSD_β.
    """
    from opsd_megatron.config import load_config
    from opsd_megatron.data.prompts import student_prompt_ids, teacher_prompt_ids
    from opsd_megatron.data.tokenizer import load_tokenizer
    from tests.losses import reference as ref

    cfg = load_config(RECIPE, [f"trainer.output_dir={out}"])
    hf = hf_initial_model(cfg)
    tok = load_tokenizer(cfg.model.tokenizer)
    problems = {
        p["id"]: p
        for p in __import__("opsd_megatron.data.dataset", fromlist=["x"])
        .load_problems(cfg.data)
        .rows
    }
    per_seq = []
    for row in rollouts(out, 1):
        p = problems[row["id"]]
        resp = row["response_ids"]
        logits = {}
        for role, prompt in (
            ("s", student_prompt_ids(tok, cfg.data, p["problem"])),
            ("t", teacher_prompt_ids(tok, cfg.data, p["problem"], p["solution"])),
        ):
            ids = torch.tensor([prompt + resp])
            with torch.no_grad():
                full = hf(ids).logits[0]
            logits[role] = full[len(prompt) - 1 : len(prompt) + len(resp) - 1]
        per_seq.append(ref.jsd(logits["s"], logits["t"], beta).mean())
    return torch.stack(per_seq).mean().item()


def rank_layout(cfg):
    """The layout the launcher would hand this rank's ``build_components`` (inside a rank)."""
    import torch.distributed as dist

    from opsd_megatron.config import validate_layout
    from opsd_megatron.models.from_config import arch_of

    return validate_layout(cfg, dist.get_world_size(), arch=arch_of(cfg.model))
