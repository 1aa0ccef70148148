"""The run decided once, in the launching process, before any rank or model exists: the config
(recipe + overrides), every path and data file checked, the layout checked against the world
size and the model, and the resume decision. The ranks receive it as is (``train/loop.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from opsd_megatron.config import Layout, OPSDConfig, load_config, validate_layout
from opsd_megatron.models.from_config import arch_of
from opsd_megatron.preflight import check_training_run
from opsd_megatron.train.resume import ResumePlan, plan_resume


@dataclass(frozen=True)
class Resolved:
    """What every rank runs: never reloaded or re-decided there."""

    cfg: OPSDConfig
    layout: Layout
    resume: ResumePlan


def resolve(recipe: str, overrides: list[str], world_size: int | None) -> Resolved:
    """Load and check the run (``UserError`` with a one-line reason when it must not start).
    ``world_size``: torchrun's, or None for the recipe's own layout (local ranks)."""
    cfg = load_config(recipe, overrides)
    check_training_run(cfg)
    layout = validate_layout(cfg, world_size, arch=arch_of(cfg.model))
    return Resolved(cfg, layout, plan_resume(cfg))
