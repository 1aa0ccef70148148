"""Per-step metrics to a progress bar, a JSONL file and TensorBoard (W&B optional); rank 0
writes."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch


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
    parts = [f"{k} {t[k]:.1f}s" + (f" ({' '.join(inner)})" if k == "rollout" and inner else "")
             for k in ("rollout", "score", "student", "optimizer") if k in t]  # fmt: skip
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
