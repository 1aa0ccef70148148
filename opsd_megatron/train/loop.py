"""The training run: build, resume, step, log, checkpoint, summarise. Called on every rank."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch.distributed as dist

from opsd_megatron.config import OPSDConfig, to_yaml
from opsd_megatron.eval.runner import evaluate
from opsd_megatron.train import preemption
from opsd_megatron.train.checkpointing import (
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_base_model,
    save_checkpoint,
    select_checkpoint,
)
from opsd_megatron.train.metrics import MetricsLogger, plot_loss
from opsd_megatron.train.resume import archive_previous_run
from opsd_megatron.train.setup import build_components
from opsd_megatron.train.step import train_step


def run(cfg: OPSDConfig) -> dict:
    """The whole run on this rank: decide fresh/resume (verified checkpoint), build, then step,
    log, evaluate and checkpoint until ``trainer.max_steps`` or a preemption request; returns the
    summary (also written to ``OUT/summary.json``). Collective: every rank calls it."""
    rank0 = dist.get_rank() == 0
    preemption.install()
    out = Path(cfg.trainer.output_dir)
    ckpt = (
        select_checkpoint(cfg) if cfg.checkpoint.resume is not False else None
    )  # verified against its manifest
    saved_step = read_state(ckpt)["step"] if ckpt is not None else 0
    if saved_step >= cfg.trainer.max_steps:
        if rank0:
            print(
                f"[opsd] {out}: finished at step {saved_step} ({ckpt}); nothing to do", flush=True
            )
        return {"steps": saved_step, "finished": True}
    if ckpt is None and rank0:  # a fresh start never overwrites an earlier run's files
        moved = archive_previous_run(out, time.strftime("%Y%m%d-%H%M%S"))
        if moved:
            print(f"[opsd] starting fresh; the earlier run's files are in {moved}", flush=True)
    dist.barrier()
    c = build_components(cfg)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
        preemption.clear_marker(cfg.trainer.output_dir)
        print(f"[opsd] {c.layout.describe()}; {len(c.problems)} problems", flush=True)
    start, counters = 0, {"generated_tokens": 0.0, "skipped_steps": 0}
    save_base_model(c)
    if ckpt is not None:
        start, counters = load_checkpoint(c, ckpt)
        if rank0:
            print(f"[opsd] resumed from {ckpt} at step {start}", flush=True)
    logger = MetricsLogger(cfg, rank0, cfg.trainer.max_steps, start)
    t0 = time.perf_counter()
    last = {}
    try:
        for step in range(start, cfg.trainer.max_steps):
            last = train_step(c, c.algorithm, step)
            counters["generated_tokens"] += last["generated_tokens"]
            counters["skipped_steps"] += last["skipped"]
            last.update(
                total_generated_tokens=counters["generated_tokens"],
                skipped_steps=counters["skipped_steps"],
            )
            if not math.isfinite(last["loss"]) and rank0:
                print(f"[opsd] step {step + 1}: non-finite loss, update skipped", flush=True)
            done = step + 1
            if cfg.eval.interval and cfg.eval.benchmarks and done % cfg.eval.interval == 0:
                report = evaluate(
                    c.model, c.tokenizer, cfg, c.arch, c.groups, tag=f"step_{done:06d}"
                )
                if report is not None:
                    last.update({f"eval/{k}": v for k, v in report["average"].items()})
                if cfg.eval.teacher_too:
                    report = evaluate(
                        c.model,
                        c.tokenizer,
                        cfg,
                        c.arch,
                        c.groups,
                        tag=f"step_{done:06d}_teacher",
                        with_reference=True,
                    )
                    if report is not None:
                        last.update({f"eval_teacher/{k}": v for k, v in report["average"].items()})
            logger.log(last)
            stop = preemption.requested(cfg.trainer.output_dir, c.groups.device)
            if stop or done % cfg.checkpoint.save_interval == 0 or done == cfg.trainer.max_steps:
                save_checkpoint(c, done, counters)
            if stop:
                if rank0:
                    preemption.acknowledge(cfg.trainer.output_dir, done)
                    print(
                        f"[opsd] preempted: checkpoint at step {done} written, stopping for requeue",
                        flush=True,
                    )
                return {"steps": done, "preempted": True}
    finally:
        logger.close()
    summary = {
        "steps": cfg.trainer.max_steps,
        "start_step": start,
        "final_loss": last.get("loss"),
        "generated_tokens": counters["generated_tokens"],
        "skipped_steps": counters["skipped_steps"],
        "wall_time_s": time.perf_counter() - t0,
        "layout": c.layout.describe(),
        "checkpoint": str(latest_checkpoint(cfg)),
        # what the built model really ran with (not just what the config asked for)
        "features": {
            "sequence_parallel": bool(c.model.config.sequence_parallel),
            "recompute": c.model.config.recompute_granularity == "full",
        },
    }
    if rank0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
        if (out / "metrics.jsonl").exists():
            plot_loss(out / "metrics.jsonl", out / "loss.png")
        print(f"[opsd] done: {json.dumps(summary)}", flush=True)
    return summary
