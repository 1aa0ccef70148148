"""Resume safety, decided in the launching process before any rank or model exists.

An output directory that holds a checkpoint is resumed only if the new config means the same
training as the one that wrote it: the keys under ``COMPARED`` must match, except those in
``NOT_COMPARED`` (layout, memory and logging knobs: TP/PP/DP reshard on load). Otherwise the
run stops naming the differing keys and the ways forward. ``checkpoint.resume``: true (resume
if compatible), false (start fresh: the previous run's files are moved to ``OUT/previous/<time>/``,
nothing is deleted), force (resume despite differences). A run whose checkpoint is at
``trainer.max_steps`` is finished: it says so and nothing is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opsd_megatron.config import OPSDConfig, to_dict
from opsd_megatron.errors import UserError
from opsd_megatron.train.checkpointing import candidates, problems_with, read_state

COMPARED = (
    "algorithm",
    "model.",
    "lora",
    "teacher.",
    "rollout.",
    "loss.",
    "grpo.",
    "sft.",
    "optimizer.",
    "data.",
    "trainer.",
)
NOT_COMPARED = (
    "model.recompute",
    "model.dtype",
    "teacher.offload",
    "rollout.engine",
    "rollout.vllm.",
    "optimizer.distributed",
    "optimizer.overlap_grad_reduce",
    "optimizer.bucket_mb",
    "trainer.micro_batch_size",
    "trainer.output_dir",
    "trainer.save_rollouts",
    "trainer.threads_per_rank",
    "trainer.max_steps",
)
RUN_FILES = (
    "config.yaml",
    "summary.json",
    "metrics.jsonl",
    "loss.png",
    "tensorboard",
    "checkpoints",
    "base_model",
    "rollouts",
    "eval",
)


class ResumeMismatch(UserError):
    pass


@dataclass
class ResumePlan:
    """The launcher's decision, handed to every rank: the ranks only hash-verify ``checkpoint``
    (then each of ``fallbacks``, older, in order) and load the first that verifies."""

    action: str  # fresh | resume | finished
    checkpoint: Path | None = None
    step: int = 0
    notes: list[str] = field(default_factory=list)
    fallbacks: list[Path] = field(default_factory=list)

    @property
    def candidates(self) -> list[Path]:
        """What the ranks verify, newest first (empty: a fresh start)."""
        if self.action != "resume":
            return []
        return [self.checkpoint, *self.fallbacks]


def _flat(d, prefix="") -> dict:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _compared(key: str) -> bool:
    hit = lambda prefixes: any(
        key == p.rstrip(".") or key.startswith(p if p.endswith(".") else p + ".") for p in prefixes
    )
    return hit(COMPARED) and not hit(NOT_COMPARED)


def config_diff(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved, current) for every compared key whose value differs ('<absent>' if missing).
    A key the saved config lacks (a checkpoint from before the key existed) counts as its
    default, so adding an option does not make older runs unresumable."""
    import dataclasses

    from opsd_megatron.config import OPSDConfig

    defaults = _flat(dataclasses.asdict(OPSDConfig()))
    a, b = _flat(saved), _flat(current)
    keys = sorted(k for k in set(a) | set(b) if _compared(k))
    old = {k: a.get(k, defaults.get(k, "<absent>")) for k in keys}
    return [(k, old[k], b.get(k, "<absent>")) for k in keys if old[k] != b.get(k, "<absent>")]


def plan_resume(cfg: OPSDConfig) -> ResumePlan:
    """What the run will do with ``trainer.output_dir``; ResumeMismatch if it must not start."""
    mode = cfg.checkpoint.resume
    whole, skips = [], []  # sizes only here; the ranks hash what is chosen
    for d in candidates(cfg):
        problems = problems_with(d, checksums=False)
        if not problems:
            whole.append(d)
        elif not whole:  # newer than anything usable: say why it is passed over
            skips.append(f"skipping checkpoint {d}: {problems[0]}; trying the previous one")
    if whole and mode is not False and _finished(whole[0], cfg):
        # a finished run is not resumed, so no rank would hash its final checkpoint: hash it
        # here before saying "nothing to do" (only on this path: a rerun of a finished run)
        damaged = problems_with(whole[0], checksums=True)
        if damaged:
            skips.append(f"skipping checkpoint {whole[0]}: {damaged[0]}; trying the previous one")
            whole = whole[1:]
    newest = whole[0] if whole else None
    if newest is None:
        return ResumePlan("fresh", notes=skips if mode is not False else [])
    if mode is False:
        return ResumePlan(
            "fresh",
            notes=[
                f"checkpoint.resume=false: the previous run's files in "
                f"{cfg.trainer.output_dir} move to {cfg.trainer.output_dir}/previous/"
            ],
        )
    step = int(read_state(newest)["step"])
    notes = skips
    try:
        saved = yaml.safe_load((newest / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        saved = None
    if not isinstance(saved, dict):
        if mode != "force":
            raise ResumeMismatch(
                f"{newest / 'config.yaml'} is missing or unreadable, so this run cannot be checked "
                f"against it; {_ways_forward(cfg)}"
            )
        notes.append(
            f"{newest / 'config.yaml'} unreadable; resuming anyway (checkpoint.resume=force)"
        )
    else:
        diffs = config_diff(saved, to_dict(cfg))
        if diffs and mode != "force":
            listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in diffs[:8])
            more = f" (and {len(diffs) - 8} more)" if len(diffs) > 8 else ""
            raise ResumeMismatch(
                f"{cfg.trainer.output_dir} holds a checkpoint at step {step} ({newest}) of a "
                f"different run: {listed}{more}; {_ways_forward(cfg)}"
            )
        if diffs:
            notes.append(
                "resuming despite "
                + ", ".join(k for k, _, _ in diffs)
                + " (checkpoint.resume=force)"
            )
        old_steps = _flat(saved).get("trainer.max_steps")
        if (
            old_steps is not None
            and old_steps != cfg.trainer.max_steps
            and step < cfg.trainer.max_steps
            and cfg.optimizer.decay_steps is None  # a fixed horizon keeps the schedule
        ):
            notes.append(
                f"trainer.max_steps {old_steps} -> {cfg.trainer.max_steps}: the LR schedule is "
                "recomputed "
                f"over {cfg.trainer.max_steps} steps"
            )
    if step >= cfg.trainer.max_steps:
        return ResumePlan("finished", newest, step, notes)
    return ResumePlan("resume", newest, step, notes, fallbacks=whole[1:])


def _finished(checkpoint: Path, cfg: OPSDConfig) -> bool:
    return int(read_state(checkpoint)["step"]) >= cfg.trainer.max_steps


def _ways_forward(cfg) -> str:
    return (
        f"start a new run with trainer.output_dir=<another dir>, start this one fresh with "
        f"checkpoint.resume=false (the old files move to {cfg.trainer.output_dir}/previous/), or "
        "continue it "
        f"on purpose with checkpoint.resume=force"
    )


def archive_previous_run(out: Path, stamp: str) -> Path | None:
    """Move the files of an earlier run in ``out`` to ``out/previous/<stamp>/`` (rank 0, fresh
    start)."""
    present = [out / n for n in RUN_FILES if (out / n).exists()]
    if not present:
        return None
    target = out / "previous" / stamp
    target.mkdir(parents=True, exist_ok=False)
    for p in present:
        p.rename(target / p.name)
    return target
