"""Resume under transformer-engine's FusedAdam, without TE: megatron-core 0.16.1 picks TE's
``FusedAdam`` when TE is importable (``optimizer/__init__.py``, ``distrib_optimizer.py``:
``USING_TE_OPTIMIZER``). Its ``state_dict`` looks every per-parameter state name up in
``name_to_dtype_map`` (TE 2.9 ``optimizers/fused_adam.py::get_unscaled_state``) and keeps the
step count in the param group. The stand-in below does the same. A DP2 run with the distributed
optimizer takes a step, checkpoints, and a fresh build loads the checkpoint: the Adam moments
come back exactly. Before the fix (a torch-style ``"step"`` added to every parameter's state)
the load raised ``KeyError: 'step'`` — a requeued job would crash-loop."""

from __future__ import annotations

import torch

from opsd_megatron.testing import run_distributed
from tests.train.tiny import RECIPE, overrides


class FusedAdamStandIn(torch.optim.Optimizer):
    """TE 2.9 FusedAdam as megatron sees it: exp_avg/exp_avg_sq per parameter, the step in the
    param group, and a state_dict that refuses state names it does not know."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, **_):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.name_to_dtype_map = {
            n: torch.float32 for n in ("exp_avg", "exp_avg_sq", "master_param")
        }

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            if not g["params"]:
                continue
            g["step"] = g.get("step", 0) + 1
            (b1, b2), t = g["betas"], g["step"]
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
                st["exp_avg"].lerp_(p.grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                denom = (st["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(g["eps"])
                p.mul_(1 - g["lr"] * g["weight_decay"])
                p.addcdiv_(st["exp_avg"], denom, value=-g["lr"] / (1 - b1**t))

    def state_dict(self):
        sd = super().state_dict()
        for state in sd["state"].values():
            for name in state:
                self.name_to_dtype_map[name]  # TE: KeyError for anything else
        return sd


def _as_if_te_were_installed():
    import megatron.core.optimizer as mo
    import megatron.core.optimizer.distrib_optimizer as do

    mo.Adam, mo.USING_PYTORCH_OPTIMIZER = FusedAdamStandIn, False
    do.Adam, do.HAVE_APEX_OR_TE, do.USING_TE_OPTIMIZER = FusedAdamStandIn, True, True


def _step_save_load(out):
    import dataclasses

    from opsd_megatron.config import load_config
    from opsd_megatron.train.checkpointing import load_checkpoint, save_checkpoint
    from opsd_megatron.train.components import build_components
    from opsd_megatron.train.step import train_step
    from tests.train.tiny import rank_layout

    _as_if_te_were_installed()
    cfg = load_config(
        RECIPE, overrides(out, 1, 1, extra=["algorithm=sft", "optimizer.distributed=true"])
    )
    c = build_components(cfg, rank_layout(cfg))
    assert isinstance(c.optimizer.chained_optimizers[0].optimizer, FusedAdamStandIn)
    train_step(c, c.algorithm, 0)
    moments = _moments(c.optimizer)
    ckpt = save_checkpoint(c, 1, {"generated_tokens": 0.0, "skipped_steps": 0})
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()  # a resumed job builds everything anew
    fresh = build_components(dataclasses.replace(cfg), rank_layout(cfg))
    start, _ = load_checkpoint(fresh, ckpt)
    loaded = _moments(fresh.optimizer)
    diff = max(float((moments[k] - loaded[k]).abs().max()) for k in moments)
    return start, len(moments), diff


def _moments(optimizer) -> dict:
    inner = optimizer.chained_optimizers[0].optimizer
    return {
        (i, name): v.detach().clone()
        for i, state in enumerate(inner.state.values())
        for name, v in state.items()
    }


def test_a_te_fused_adam_checkpoint_resumes(tmp_path):
    for start, n, diff in run_distributed(_step_save_load, 2, tmp_path / "run", timeout=300):
        assert start == 1 and n > 0
        assert diff == 0.0, diff
