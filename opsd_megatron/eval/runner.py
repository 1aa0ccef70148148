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
from opsd_megatron.data.response_stats import RESPONSE_FIGURES, response_stats
from opsd_megatron.data.tokenizer import Tokenizer, stop_token_ids
from opsd_megatron.errors import UserError
from opsd_megatron.eval.metrics import summarize
from opsd_megatron.models.hf_config import ArchSpec
from opsd_megatron.platform import log
from opsd_megatron.platform.parallel import ParallelGroups
from opsd_megatron.platform.progress import Progress
from opsd_megatron.rollout.megatron_sampler import MegatronSampler


def _prompt_text(cfg, row, with_reference: bool) -> str:
    if not with_reference:
        return cfg.data.student_template.format(problem=row["problem"])
    if not row.get("solution"):
        raise ValueError(
            f"eval.with_reference needs a '{cfg.eval.solution_field}' for problem {row['id']}"
        )
    return cfg.data.teacher_template.format(
        problem=row["problem"], solution=row["solution"], answer=row["answer"]
    )


def _generate(
    model, tokenizer, cfg, rows, stop_ids, arch, with_reference, groups, name="eval"
) -> list[list[tuple[str, int, bool]]]:
    """Every sample's (text, token count, hit the new-token limit). New tokens are capped so prompt
    + new tokens stay within the model's ``max_position_embeddings`` (said once); rank 0 shows the
    batches' progress."""
    e, limit, vocab_size = cfg.eval, arch.max_position_embeddings, arch.vocab_size
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
    texts, starts, capped = {}, range(0, len(jobs), e.batch_size), False
    show = None
    if dist.get_rank() == 0 and cfg.logging.progress_bar:
        show = Progress(len(starts), label=name, under="eval")
    for n, start in enumerate(starts, 1):
        batch = jobs[start : start + e.batch_size]
        prompts = [
            chat_prompt_ids(tokenizer, _prompt_text(cfg, rows[i], with_reference), e.thinking)
            for i, _ in batch
        ]
        longest = max(len(p) for p in prompts)
        if longest >= limit:
            raise UserError(
                f"eval: a prompt of {name} has {longest} tokens; the model's "
                f"max_position_embeddings is {limit}"
            )
        new = min(e.max_new_tokens, limit - longest)
        if new < e.max_new_tokens and not capped and dist.get_rank() == 0:
            log.say(
                f"{name}: eval.max_new_tokens={e.max_new_tokens} capped at {new} so "
                f"prompt + new tokens fit max_position_embeddings={limit}",
                under="eval",
            )
            capped = True
        out = sampler.generate(prompts, new)
        for (i, s), resp, fin in zip(batch, out.responses, out.finished):
            texts[(i, s)] = (tokenizer.decode(resp, skip_special_tokens=True), len(resp), not fin)
        if show is not None:
            show.update(n, f"{len(batch)} samples")
    if show is not None:
        show.close()
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
    """Run every benchmark in ``cfg.eval.benchmarks``; returns the report on rank 0 (None
    elsewhere).

    ``with_reference`` (default ``cfg.eval.with_reference``) prompts with the teacher template,
    which measures what OPSD relies on: how much better the model solves a problem when shown its
    solution. ``eval.save_outputs``: every sample to ``eval/<tag>.jsonl`` (the exact prompt text
    after the chat template, the generated text without special tokens, the extracted answer and the
    verdict)."""
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
                arch,
                with_reference,
                groups,
                name,
            )
            if grader is None:
                continue
            per_problem = []
            figures = response_stats(
                *(list(x) for x in zip(*[o for outs in outputs for o in outs])),
                cfg.logging.uncertainty_markers,
            )
            outputs = [[text for text, _, _ in outs] for outs in outputs]
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
                **figures,
                "per_problem": per_problem,
            }
    finally:
        if grader is not None:
            grader.close()
    if dist.get_rank() != 0:
        return None
    metric_names = sorted(
        {k for s in report["benchmarks"].values() for k in s if "@" in k and "_ci" not in k}
    )
    report["average"] = {
        m: sum(s[m] for s in report["benchmarks"].values() if m in s)
        / max(1, sum(m in s for s in report["benchmarks"].values()))
        for m in metric_names + list(RESPONSE_FIGURES)
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
        if "avg@1_ci95" in s and "avg@1" in metrics:  # greedy: the Wilson 95 % interval
            lo, hi = s["avg@1_ci95"]
            cells[metrics.index("avg@1")] += f" [{100 * lo:.1f}, {100 * hi:.1f}]"
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
    lines += [
        "",
        "| benchmark | length (mean / p90) | truncated | repeated 4-grams | markers / 1k tokens |",
    ]
    lines.append("|---|---|---|---|---|")
    for name, s in report["benchmarks"].items():
        if "response_length" in s:
            lines.append(
                f"| {name} | {s['response_length']:.1f} / {s['response_length_p90']:.0f} | "
                f"{100 * s['truncation_rate']:.1f} % | {100 * s['repetition_rate']:.1f} % | "
                f"{s['marker_rate']:.2f} |"
            )
    return "\n".join(lines) + "\n"
