"""The training run on every rank: what the launcher decided (``Resolved``), then build, resume,
step, log, evaluate, checkpoint, summarise."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch.distributed as dist

from opsd_megatron.config import to_yaml
from opsd_megatron.eval.runner import evaluate
from opsd_megatron.platform import log
from opsd_megatron.train import preemption
from opsd_megatron.train.checkpointing import (
    first_verified,
    latest_checkpoint,
    load_checkpoint,
    save_base_model,
    save_checkpoint,
)
from opsd_megatron.train.components import Components, build_components
from opsd_megatron.train.metrics import MetricsLogger, plot_loss
from opsd_megatron.train.resolved import Resolved
from opsd_megatron.train.resume import archive_previous_run
from opsd_megatron.train.step import train_step


def run(resolved: Resolved) -> dict:
    """The whole run on this rank: verify the chosen checkpoint, build, then step, log, evaluate
    and checkpoint until ``trainer.max_steps`` or a preemption request; returns the summary (also
    written to ``OUT/summary.json``). Collective: every rank calls it."""
    cfg, rank0 = resolved.cfg, dist.get_rank() == 0
    log.set_name(cfg.logging.name or cfg.algorithm)  # this rank's lines: [opsd], [sft], [base]…
    out = Path(cfg.trainer.output_dir)
    preemption.install()
    ckpt = first_verified(resolved.resume.candidates)  # hashes split over the ranks
    if ckpt is None and rank0:  # a fresh start never overwrites an earlier run's files
        moved = archive_previous_run(out, time.strftime("%Y%m%d-%H%M%S"))
        if moved:
            log.say(f"starting fresh; the earlier run's files are in {moved}")
    dist.barrier()
    c = build_components(cfg, resolved.layout)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
        preemption.clear_marker(cfg.trainer.output_dir)
        log.say(f"{c.layout.describe()}; {len(c.problems)} problems")
    start, counters = 0, {"generated_tokens": 0.0, "skipped_steps": 0}
    save_base_model(c)
    if ckpt is not None:
        start, counters = load_checkpoint(c, ckpt)
        if rank0:
            log.say(f"resumed from {ckpt} at step {start}")
    logger = MetricsLogger(cfg, rank0, cfg.trainer.max_steps, start)
    t0, last = time.perf_counter(), {}
    try:
        for step in range(start, cfg.trainer.max_steps):
            last = train_step(c, c.algorithm, step)
            done = step + 1
            _count(last, counters, rank0)
            _evaluate(c, done, last)
            logger.log(last)
            stop = preemption.requested(cfg.trainer.output_dir, c.groups.device)
            if stop or done % cfg.checkpoint.save_interval == 0 or done == cfg.trainer.max_steps:
                save_checkpoint(c, done, counters)
            if stop:
                if rank0:
                    preemption.acknowledge(cfg.trainer.output_dir, done)
                    log.say(f"preempted: checkpoint at step {done} written, stopping for requeue")
                return {"steps": done, "preempted": True}
    finally:
        logger.close()
    return _summarise(c, start, counters, last, time.perf_counter() - t0)


def _count(metrics: dict, counters: dict, rank0: bool) -> None:
    """The run's running totals, into the step's metrics."""
    counters["generated_tokens"] += metrics["generated_tokens"]
    counters["skipped_steps"] += metrics["skipped"]
    metrics.update(
        total_generated_tokens=counters["generated_tokens"],
        skipped_steps=counters["skipped_steps"],
    )
    if not math.isfinite(metrics["loss"]) and rank0:
        log.say(f"step {metrics['step']}: non-finite loss, update skipped")


def _evaluate(c: Components, done: int, metrics: dict) -> None:
    """Every ``eval.interval`` steps: the student on ``eval.benchmarks`` (and, with
    ``eval.teacher_too``, the teacher's prompt with the reference), into the step's metrics."""
    e = c.cfg.eval
    if not (e.interval and e.benchmarks and done % e.interval == 0):
        return
    runs = [("eval", f"step_{done:06d}", None)]  # None: eval.with_reference decides
    if e.teacher_too:
        runs.append(("eval_teacher", f"step_{done:06d}_teacher", True))
    for prefix, tag, with_reference in runs:
        report = evaluate(
            c.model, c.tokenizer, c.cfg, c.arch, c.groups, tag=tag, with_reference=with_reference
        )
        if report is not None:
            metrics.update({f"{prefix}/{k}": v for k, v in report["average"].items()})


def _summarise(c: Components, start: int, counters: dict, last: dict, wall_s: float) -> dict:
    cfg, out = c.cfg, Path(c.cfg.trainer.output_dir)
    summary = {
        "steps": cfg.trainer.max_steps,
        "start_step": start,
        "final_loss": last.get("loss"),
        "generated_tokens": counters["generated_tokens"],
        "skipped_steps": counters["skipped_steps"],
        "wall_time_s": wall_s,
        "layout": c.layout.describe(),
        "checkpoint": str(latest_checkpoint(cfg)),
        # what the built model really ran with (not just what the config asked for)
        "features": {
            "sequence_parallel": bool(c.model.config.sequence_parallel),
            "recompute": c.model.config.recompute_granularity == "full",
        },
    }
    if dist.get_rank() == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if (out / "metrics.jsonl").exists():
            plot_loss(out / "metrics.jsonl", out / "loss.png")
        log.say(f"done: {json.dumps(summary)}")
    return summary
