"""A step's metrics: assembled from its phases' statistics (shared from the last pipeline stage
and over DP) and its timers, then written to a progress bar, a JSONL file and TensorBoard (W&B
optional) by rank 0."""

from __future__ import annotations

import json
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from opsd_megatron.algorithms.step_data import step_response_stats
from opsd_megatron.platform.parallel import ParallelGroups

PHASES = ("rollout", "score", "student", "optimizer")


@dataclass
class StepStats:
    """This rank's loss statistics of a step: ``means`` — the summed loss, and each diagnostic's
    mean over this rank's response tokens — and ``counts``, the tokens behind each mean, so that
    DP ranks combine into the mean over all the step's tokens however rows were grouped."""

    means: dict[str, float]
    counts: dict[str, float]


def step_metrics(
    c,
    algorithm,
    step: int,
    rollouts,
    scored,
    stats: StepStats,
    clock,
    grad_norm,
    finite: bool,
    lr: float,
) -> dict:
    """Every rank's metrics of step ``step`` (0-based): the loss statistics and the rollouts'
    counts summed over DP, the update, the phase timers and the sampled responses' figures."""
    sampled = ["sampler_logprob_error"] if any(mb.sampled for mb in scored.micro_batches) else []
    out = share_stats(
        stats, ["loss", "divergence", *algorithm.stat_names, *sampled], {"loss"}, c.groups
    )
    counts = share_stats(
        StepStats(scored.counts, {}), list(scored.counts), set(scored.counts), c.groups
    )
    if "reward_sum" in counts:
        out["reward"] = counts.pop("reward_sum") / max(counts.pop("rollouts"), 1.0)
    tokens = counts.pop("generated_tokens")
    out.update(counts)
    out.update(
        step=step + 1,
        grad_norm=grad_norm,
        skipped=0 if finite else 1,
        lr=lr,
        response_length=tokens / c.cfg.trainer.global_batch_size,
        generated_tokens=tokens,
        tokens_per_s=tokens / max(clock[-1] - clock[0], 1e-9),
    )
    out.update(phase_times(clock, c.sampler))
    if rollouts.finished is not None:  # sampled: length, truncation, repetition, markers
        figures = step_response_stats(
            rollouts, c.tokenizer, c.groups, c.cfg.logging.uncertainty_markers
        )
        figures.pop("response_length")  # logged above, from the engine's token count
        out.update(figures)
    return out


def share_stats(
    stats: StepStats, keys: list[str], summed: set[str], groups: ParallelGroups
) -> dict:
    """Loss statistics live on the last pipeline stage: give them to every rank; over DP, keys in
    ``summed`` add up (the loss is a sum of partial losses), token means are weighted by their
    token counts, and other values are averaged."""
    flat = []
    for k in keys:
        value, n = float(stats.means.get(k, 0.0)), 0.0 if k in summed else stats.counts.get(k, 1.0)
        flat += [value if k in summed else value * n, n]
    t = torch.tensor(flat, dtype=torch.float64).to(groups.device)  # NCCL: accelerator tensors
    if groups.pp_size > 1:
        dist.broadcast(t, groups.pp_last_rank, group=groups.pp)
    dist.all_reduce(t, group=groups.dp)
    v = t.tolist()
    return {
        k: v[2 * j] if k in summed else v[2 * j] / max(v[2 * j + 1], 1e-30)
        for j, k in enumerate(keys)
    }


def phase_times(clock: list[float], sampler) -> dict[str, float]:
    """``time/<phase>`` seconds from the phases' end times, the whole ``time/step``, and the
    sampler's own split where it keeps one: ``time/prefill`` and ``time/decode`` (Megatron
    sampler), ``time/refit`` (vLLM's weight push); all inside ``time/rollout``."""
    out = {f"time/{name}": b - a for name, a, b in zip(PHASES, clock, clock[1:])}
    out["time/step"] = clock[-1] - clock[0]
    for name, seconds in getattr(sampler, "last_phase_s", {}).items():
        out[f"time/{name}"] = seconds
    if hasattr(sampler, "last_refit_s"):
        out["time/refit"] = sampler.last_refit_s
    return out


def peak_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MetricsLogger:
    def __init__(self, cfg, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.path = Path(cfg.trainer.output_dir) / "metrics.jsonl"
        self.tb = self.wandb = self.progress = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if start_step == 0 and self.path.exists():
            self.path.unlink()
        elif (
            self.path.exists()
        ):  # resumed: drop lines past the checkpoint (they will be recomputed)
            lines = [
                ln
                for ln in self.path.read_text().splitlines()
                if json.loads(ln)["step"] <= start_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in lines))
        if cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(cfg.trainer.output_dir) / "tensorboard"))
        if cfg.logging.wandb:
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project, dir=cfg.trainer.output_dir, resume="allow"
            )
        if cfg.logging.progress_bar:
            from opsd_megatron.platform.progress import Progress

            self.progress = Progress(total_steps, start_step)
        self.phase_times = cfg.logging.phase_times

    def log(self, metrics: dict) -> None:
        if not self.enabled:
            return
        metrics = dict(metrics, peak_memory_gib=peak_memory_bytes() / 2**30)
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        if self.tb:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, step)
        if self.wandb:
            self.wandb.log(metrics, step=step)
        if self.progress:
            info = f"loss {metrics['loss']:.4f}"  # and what this algorithm's step has
            if metrics.get("generated_tokens"):
                info += f"  len {metrics['response_length']:.0f}"
            if "reference_tokens" in metrics:
                info += f"  ref tokens {metrics['reference_tokens']:.0f}"
            if "reward" in metrics:
                info += f"  reward {metrics['reward']:.2f}"
            info += f"  lr {metrics['lr']:.2e}"
            if self.phase_times:
                info += "  " + phase_line(metrics)
            self.progress.update(step, info)

    def close(self) -> None:
        if self.progress:
            self.progress.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def phase_line(metrics: dict) -> str:
    """``rollout 41.2s (prefill 0.9 decode 38.0) score 9.8s student 25.1s optimizer 0.3s =
    76.4s, 54.6 ms/token``: one step's phases for the progress line."""
    t = {k[len("time/") :]: v for k, v in metrics.items() if k.startswith("time/")}
    inner = [f"{k} {t[k]:.1f}" for k in ("refit", "prefill", "decode") if k in t]
    parts = [
        f"{k} {t[k]:.1f}s" + (f" ({' '.join(inner)})" if k == "rollout" and inner else "")
        for k in ("rollout", "score", "student", "optimizer")
        if k in t
    ]
    tokens = metrics.get("generated_tokens") or metrics.get("reference_tokens") or 0
    per_token = f", {1000 * t['step'] / tokens:.1f} ms/token" if tokens else ""
    return " ".join(parts) + f" = {t.get('step', 0.0):.1f}s{per_token}"


def plot_loss(metrics_path: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("OPSD training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
