"""Training checkpoints: written to a temporary directory and renamed, so a crash never leaves a
half-written checkpoint that resume would pick; the last K are kept.

Layout of ``OUT/checkpoints/step_000050/``:
  model/               megatron dist checkpoint (adapters only with LoRA; any TP/PP can read it)
  optimizer/           megatron optimizer state (fp32 master weights, AdamW moments) as a dist
                       checkpoint (any TP/PP/DP can read it)
  rank00000.pt ...     per-rank LR schedule, RNG and sampler state (restored exactly at the same
                       layout; at another layout the run continues with fresh RNG streams)
  trainer_state.json   step, counters, layout
  config.yaml          the resolved config (resume compares it with the new run's: train/resume.py)
  manifest.json        every file's size and SHA-256 (train/manifest.py), verified before resume:
                       a checkpoint that fails is reported by path and the next older one is used
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from opsd_megatron.config import to_dict, to_yaml
from opsd_megatron.models.checkpoint import load_model_checkpoint, save_model_checkpoint
from opsd_megatron.platform import log
from opsd_megatron.train import manifest
from opsd_megatron.train.optimizer_state import (
    FORMAT,
    load_optimizer,
    optimizer_kind,
    save_optimizer,
)

STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(cfg) -> Path:
    return Path(cfg.trainer.output_dir) / "checkpoints"


def candidates(cfg) -> list[Path]:
    """Renamed (so fully written) checkpoint directories, newest first."""
    root = checkpoint_root(cfg)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if d.is_dir() and STEP_DIR.match(d.name)]
    return sorted(found, key=lambda d: int(STEP_DIR.match(d.name).group(1)), reverse=True)


def read_state(ckpt: Path) -> dict:
    """``trainer_state.json``; ValueError naming the file when it is missing or unreadable."""
    path = ckpt / "trainer_state.json"
    try:
        state = json.loads(path.read_text())
        int(state["step"])
        return state
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is missing or unreadable") from None


def problems_with(ckpt: Path, checksums: bool = True, share: tuple[int, int] = (0, 1)) -> list[str]:
    """What is wrong with ``ckpt`` ([] if it verifies); with ``share=(rank, world)`` only that
    rank's slice of the files is hashed (every rank checks the state and the manifest)."""
    try:
        state = read_state(ckpt)
        if not state.get("manifest"):  # written before manifests existed: nothing to check against
            return []
        recorded = manifest.read_manifest(ckpt)
    except ValueError as err:
        return [str(err)]
    names = sorted(recorded)[share[0] :: share[1]]
    return manifest.check_files(ckpt, recorded, names, checksums=checksums)


def latest_checkpoint(cfg, checksums: bool = False) -> Path | None:
    """The newest checkpoint that verifies (sizes only by default; ``select_checkpoint`` hashes)."""
    return next((d for d in candidates(cfg) if not problems_with(d, checksums)), None)


def first_verified(checkpoints: list[Path]) -> Path | None:
    """Collective: the first of ``checkpoints`` (the launcher's choice, then older ones) whose every
    file matches its manifest (hashing split over the ranks); each one skipped is reported by
    path on rank 0."""
    rank, world = dist.get_rank(), dist.get_world_size()
    for ckpt in checkpoints:
        found = [None] * world
        dist.all_gather_object(found, problems_with(ckpt, share=(rank, world)))
        problems = sorted({p for per_rank in found for p in per_rank})
        if not problems:
            return ckpt
        if rank == 0:
            log.say(
                f"skipping checkpoint {ckpt}: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
                + "; trying the previous one"
            )
    return None


def _layout(c) -> dict:
    return {"tp": c.layout.tp, "pp": c.layout.pp, "dp": c.layout.dp}


def save_checkpoint(c, step: int, counters: dict) -> Path:
    """Collective. Returns the final directory."""
    root = checkpoint_root(c.cfg)
    final = root / f"step_{step:06d}"
    tmp = root / f".tmp-step_{step:06d}"
    if dist.get_rank() == 0:
        for stale in root.glob(".tmp-step_*"):  # left by a run killed mid-save
            shutil.rmtree(stale, ignore_errors=True)
        (tmp / "model").mkdir(parents=True)
    dist.barrier()
    extra = {"lora": to_dict(c.cfg)["lora"]}
    hf_config = dict(c.cfg.model.architecture) if c.cfg.model.architecture else None
    save_model_checkpoint(
        c.model, tmp / "model", c.arch, hf_config, adapters_only=c.cfg.lora is not None, extra=extra
    )
    if dist.get_rank() == 0:
        (tmp / "optimizer").mkdir()
    dist.barrier()
    save_optimizer(c.model, c.optimizer, tmp / "optimizer")
    torch.save(
        {
            "scheduler": c.scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "sampler_calls": c.sampler.calls,
        },
        tmp / f"rank{dist.get_rank():05d}.pt",
    )
    dist.barrier()
    if dist.get_rank() == 0:
        (tmp / "config.yaml").write_text(to_yaml(c.cfg))
        state = {
            "step": step,
            "counters": counters,
            "layout": _layout(c),
            "optimizer_format": FORMAT,
            "optimizer_kind": optimizer_kind(c.optimizer),
            "manifest": manifest.MANIFEST,
        }
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
    dist.barrier()
    names = [manifest.files_of(tmp)] if dist.get_rank() == 0 else [None]
    dist.broadcast_object_list(names, src=0)
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(
        shares, manifest.describe(tmp, names[0][dist.get_rank() :: dist.get_world_size()])
    )
    if dist.get_rank() == 0:
        manifest.write_manifest(tmp, {k: v for share in shares for k, v in share.items()})
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _prune(root, c.cfg.checkpoint.keep_last)
    dist.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    steps = sorted((d for d in root.iterdir() if STEP_DIR.match(d.name)), key=lambda d: d.name)
    for d in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(d, ignore_errors=True)


def load_checkpoint(c, ckpt: Path) -> tuple[int, dict]:
    """Restore model/adapters, optimizer, schedule, RNG; returns (step, counters)."""
    state = read_state(ckpt)
    load_model_checkpoint(c.model, ckpt / "model", adapters_only=c.cfg.lora is not None)
    if (ckpt / "optimizer").is_dir():
        load_optimizer(
            c.model,
            c.optimizer,
            ckpt / "optimizer",
            state.get("optimizer_format"),
            state.get("optimizer_kind"),
        )
    same_layout = state["layout"] == _layout(c)
    rank_state = torch.load(
        ckpt / f"rank{dist.get_rank() if same_layout else 0:05d}.pt", weights_only=True
    )
    c.scheduler.load_state_dict(rank_state["scheduler"])
    c.sampler.calls = rank_state["sampler_calls"]
    if same_layout:
        torch.set_rng_state(rank_state["torch_rng"])
    elif dist.get_rank() == 0:
        log.say(
            f"{ckpt} was written at {state['layout']}; resuming at {_layout(c)} with resharded "
            "weights and optimizer state, fresh RNG streams"
        )
    return state["step"], state["counters"]


def save_base_model(c) -> Path | None:
    """A run from random init or from ``model.hf_dir`` saves its initial weights once
    (OUT/base_model, megatron format), so every student is exported the same way:
    tools/convert_megatron_to_hf.py --megatron-dir OUT/base_model --adapters
    OUT/checkpoints/step_N/model. A ``model.megatron_dir`` run's base is that directory."""
    if c.cfg.model.megatron_dir:
        return None
    target = Path(c.cfg.trainer.output_dir) / "base_model"
    if (target / "opsd_model.json").is_file():
        return target
    tmp = Path(c.cfg.trainer.output_dir) / ".tmp-base_model"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    if c.cfg.model.hf_dir:
        hf_config = json.loads((Path(c.cfg.model.hf_dir) / "config.json").read_text())
    else:
        hf_config = dict(c.cfg.model.architecture, torch_dtype="float32")
    save_model_checkpoint(c.model, tmp, c.arch, hf_config, base_only=True)
    if dist.get_rank() == 0:
        c.tokenizer.save_pretrained(tmp / "tokenizer")  # the export copies it next to the weights
        os.replace(tmp, target)
    dist.barrier()
    return target
