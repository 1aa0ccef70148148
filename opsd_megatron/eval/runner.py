"""Evaluate the current model on benchmarks: sample n answers per problem with the rollout engine,
grade the last boxed answer, and report avg@n, pass@k and maj@n per benchmark and on average.

Collective: every rank calls it; DP ranks split the problems, rank 0 grades and writes
``eval/<tag>.json`` and ``eval/<tag>.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch.distributed as dist

from opsd_megatron.config import OPSDConfig
from opsd_megatron.data.benchmarks import load_benchmark
from opsd_megatron.data.grading import Grader
from opsd_megatron.data.prompts import chat_prompt_ids
from opsd_megatron.data.tokenizer import Tokenizer, stop_token_ids
from opsd_megatron.eval.metrics import summarize
from opsd_megatron.models.hf_config import ArchSpec
from opsd_megatron.platform.parallel import ParallelGroups
from opsd_megatron.rollout.megatron_sampler import MegatronSampler


def _prompt_text(cfg, row, with_reference: bool) -> str:
    if not with_reference:
        return cfg.data.student_template.format(problem=row["problem"])
    if not row.get("solution"):
        raise ValueError(
            f"eval.with_reference needs a '{cfg.eval.solution_field}' for problem {row['id']}"
        )
    return cfg.data.teacher_template.format(problem=row["problem"], solution=row["solution"])


def _generate(
    model, tokenizer, cfg, rows, stop_ids, vocab_size, with_reference, groups
) -> list[list[str]]:
    e = cfg.eval
    sampler = MegatronSampler(
        model,
        temperature=e.temperature,
        top_k=e.top_k,
        top_p=e.top_p,
        stop_ids=stop_ids,
        pad_id=tokenizer.pad_token_id,
        vocab_size=vocab_size,
        seed=e.seed,
        groups=groups,
    )
    dp, rank = groups.dp_size, groups.dp_rank
    jobs = [(i, s) for i in range(len(rows)) for s in range(e.n_samples)][rank::dp]
    texts = {}
    for start in range(0, len(jobs), e.batch_size):
        batch = jobs[start : start + e.batch_size]
        prompts = [
            chat_prompt_ids(tokenizer, _prompt_text(cfg, rows[i], with_reference), e.thinking)
            for i, _ in batch
        ]
        out = sampler.generate(prompts, e.max_new_tokens)
        for (i, s), resp in zip(batch, out.responses):
            texts[(i, s)] = tokenizer.decode(resp, skip_special_tokens=True)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, texts)
    merged = {k: v for part in gathered for k, v in part.items()}
    return [[merged[(i, s)] for s in range(e.n_samples)] for i in range(len(rows))]


def evaluate(
    model,
    tokenizer: Tokenizer,
    cfg: OPSDConfig,
    arch: ArchSpec,
    groups: ParallelGroups,
    tag: str = "eval",
    with_reference: bool | None = None,
) -> dict | None:
    """Run every benchmark in ``cfg.eval.benchmarks``; returns the report on rank 0 (None elsewhere).

    ``with_reference`` (default ``cfg.eval.with_reference``) prompts with the teacher template, which
    measures what OPSD relies on: how much better the model solves a problem when shown its solution.
    ``eval.save_outputs``: every sample to ``eval/<tag>.jsonl`` (the exact prompt text after the chat
    template, the generated text without special tokens, the extracted answer and the verdict)."""
    with_reference = cfg.eval.with_reference if with_reference is None else with_reference

    report = {"benchmarks": {}}
    samples = []  # eval.save_outputs: one row per generated sample
    grader = (
        Grader(cfg.eval.grade_timeout, cfg.eval.answer_format) if dist.get_rank() == 0 else None
    )
    try:
        for spec in cfg.eval.benchmarks:
            name, rows = load_benchmark(spec, cfg.eval)
            outputs = _generate(
                model,
                tokenizer,
                cfg,
                rows,
                stop_token_ids(tokenizer),
                arch.vocab_size,
                with_reference,
                groups,
            )
            if grader is None:
                continue
            per_problem = []
            for row, outs in zip(rows, outputs):
                grades = [grader.grade(o, row["answer"], row.get("answer_type")) for o in outs]
                if cfg.eval.save_outputs:
                    prompt = tokenizer.decode(
                        chat_prompt_ids(
                            tokenizer, _prompt_text(cfg, row, with_reference), cfg.eval.thinking
                        )
                    )
                    samples += [
                        {
                            "benchmark": name,
                            "id": row["id"],
                            "sample": k,
                            "prompt": prompt,
                            "text": o,
                            "extracted": g.extracted,
                            "verdict": g.correct,
                            "answer": row["answer"],
                        }
                        for k, (o, g) in enumerate(zip(outs, grades))
                    ]
                per_problem.append(
                    {
                        "id": row["id"],
                        "correct": [g.correct for g in grades],
                        "extracted": [g.extracted for g in grades],
                    }
                )
            report["benchmarks"][name] = {
                **summarize(per_problem, cfg.eval.ks),
                "per_problem": per_problem,
            }
    finally:
        if grader is not None:
            grader.close()
    if dist.get_rank() != 0:
        return None
    metric_names = sorted({k for s in report["benchmarks"].values() for k in s if "@" in k})
    report["average"] = {
        m: sum(s[m] for s in report["benchmarks"].values() if m in s)
        / max(1, sum(m in s for s in report["benchmarks"].values()))
        for m in metric_names
    }
    out = Path(cfg.trainer.output_dir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{tag}.json").write_text(json.dumps(report, indent=2))
    (out / f"{tag}.md").write_text(markdown_table(report, metric_names))
    if cfg.eval.save_outputs:
        (out / f"{tag}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in samples))
    return report


def markdown_table(report: dict, metrics: list[str]) -> str:
    lines = [
        "| benchmark | problems | " + " | ".join(metrics) + " |",
        "|---|---|" + "---|" * len(metrics),
    ]
    for name, s in report["benchmarks"].items():
        cells = [f"{100 * s[m]:.1f}" if m in s else "–" for m in metrics]
        lines.append(
            f"| {name} | {s['graded']}"
            + (f" (+{s['ungraded']} ungraded)" if s["ungraded"] else "")
            + " | "
            + " | ".join(cells)
            + " |"
        )
    lines.append(
        "| average | | " + " | ".join(f"{100 * report['average'][m]:.1f}" for m in metrics) + " |"
    )
    return "\n".join(lines) + "\n"
