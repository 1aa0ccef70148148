"""The device harness (``testing/device_audit.py``) through real steps on real gloo processes:

* clean: OPSD, SFT and GRPO steps (Megatron sampler, teacher pass, student pass, optimizer,
  stats), the preemption vote and a checkpoint save + load run at TP2, PP2 and DP2 with every
  tensor tagged as a CUDA rank would see it, and nothing is refused;
* each GPU crash of issue 27 put back (the code as it was) is refused, naming the line:
  micro-batches left on the host (the embedding meets host token ids), the stats and the
  preemption flag reduced on host tensors, the sampler's host generator, and at PP2 the sampled
  tokens broadcast after ``.cpu()``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from opsd_megatron.testing import run_distributed
from tests.train.tiny import RECIPE, overrides


def _components(out, tp, pp, extra=()):
    from opsd_megatron.config import load_config
    from opsd_megatron.train.components import build_components
    from tests.train.tiny import rank_layout

    cfg = load_config(RECIPE, overrides(out, tp, pp, extra=["grpo.group_size=2", *extra]))
    return cfg, build_components(cfg, rank_layout(cfg))


def _step(c, cfg, algorithm: str, step: int) -> dict:
    from opsd_megatron.algorithms import build_algorithm
    from opsd_megatron.train.step import train_step

    run = dataclasses.replace(cfg, algorithm=algorithm)
    alg = build_algorithm(run, c.algorithm.source, c.teacher, c.arch.vocab_size)
    return train_step(dataclasses.replace(c, cfg=run), alg, step)


def _clean(out, tp, pp):
    from opsd_megatron.testing.device_audit import device_audit
    from opsd_megatron.train import preemption
    from opsd_megatron.train.checkpointing import load_checkpoint, save_checkpoint

    with device_audit():
        cfg, c = _components(out, tp, pp)
        losses = [_step(c, cfg, a, i)["loss"] for i, a in enumerate(("opsd", "sft", "grpo"))]
        stop = preemption.requested(cfg.trainer.output_dir, c.groups.device)
        ckpt = save_checkpoint(c, 3, {"generated_tokens": 0.0, "skipped_steps": 0})
        start, _ = load_checkpoint(c, ckpt)
    return losses, stop, start


@pytest.mark.parametrize(
    "tp,pp,world", [(2, 1, 2), (1, 2, 2), (1, 1, 2)], ids=["tp2", "pp2", "dp2"]
)
def test_steps_pass_the_device_audit(tmp_path, tp, pp, world):
    results = run_distributed(_clean, world, tmp_path / "run", tp, pp, timeout=300)
    for losses, stop, start in results:
        assert all(torch.isfinite(torch.tensor(losses))), losses
        assert stop is False and start == 3


# --- the code as it was before issue 27, put back one piece at a time ---------------------------


def _host_micro_batches(original):
    def build(*args, **kwargs):
        return original(*args[:5], "cpu", *args[6:], **kwargs)  # built and left on the host

    return build


def _host_share_stats(stats, keys, summed, groups):
    t = torch.tensor([float(stats.means.get(k, 0.0)) for k in keys], dtype=torch.float64)
    if groups.pp_size > 1:
        dist.broadcast(t, groups.pp_last_rank, group=groups.pp)
    dist.all_reduce(t, group=groups.dp)
    return {k: v for k, v in zip(keys, t.tolist())}


def _host_generator(self):
    return torch.Generator().manual_seed(self.seed)


def _host_next(self, logits, b, gen, rows=None):  # the PP broadcast after .cpu(), as it was
    tok, lp = torch.zeros(b, dtype=torch.long), torch.zeros(b)
    if logits is not None:
        from opsd_megatron.rollout.sampling import sample_next_tokens

        tok, lp = sample_next_tokens(
            logits, temperature=self.temperature, generator=gen, vocab_size=self.vocab_size
        )
        tok, lp = tok.cpu(), lp.cpu()
    dist.broadcast(tok, self.groups.pp_last_rank, group=self.groups.pp)
    dist.broadcast(lp, self.groups.pp_last_rank, group=self.groups.pp)
    return tok, lp


def _host_preemption_vote(output_dir, device):
    flag = torch.tensor([0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _reverted(out, tp, pp, names):
    """Each named piece of old code, alone, under the audit: the error (or None)."""
    from opsd_megatron.algorithms import step_data as rollouts
    from opsd_megatron.rollout.megatron_sampler import MegatronSampler
    from opsd_megatron.testing.device_audit import DeviceAuditError, device_audit
    from opsd_megatron.train import metrics, preemption

    patches = {
        "micro_batches": (rollouts, "micro_batches", _host_micro_batches(rollouts.micro_batches)),
        "share_stats": (metrics, "share_stats", _host_share_stats),
        "generator": (MegatronSampler, "_generator", _host_generator),
        "pp_broadcast": (MegatronSampler, "_next", _host_next),
        "preemption": (preemption, "requested", _host_preemption_vote),
    }
    errors = {}
    with device_audit():
        cfg, c = _components(out, tp, pp)
        for name in names:
            owner, attr, replacement = patches[name]
            original = getattr(owner, attr)
            setattr(owner, attr, replacement)
            try:
                _step(c, cfg, "opsd", 0)
                preemption.requested(cfg.trainer.output_dir, c.groups.device)
                errors[name] = None
            except DeviceAuditError as e:
                errors[name] = str(e)
            finally:
                setattr(owner, attr, original)
    return errors


@pytest.mark.parametrize(
    "tp,pp,names,where",
    [
        (
            2,
            1,
            ["micro_batches", "share_stats", "generator", "preemption"],
            ["mixes host and device", "dist.all_reduce", "host torch.Generator", "dist.all_reduce"],
        ),
        (1, 2, ["pp_broadcast"], ["dist.broadcast on a host tensor"]),
    ],
    ids=["tp2", "pp2"],
)
def test_the_audit_refuses_each_crash_put_back(tmp_path, tp, pp, names, where):
    for errors in run_distributed(_reverted, 2, tmp_path / "run", tp, pp, names, timeout=300):
        for name, expected in zip(names, where):
            assert errors[name] is not None, f"{name}: the audit let the old code through"
            assert expected in errors[name], (name, errors[name])
            assert "opsd_megatron/" in errors[name]  # names the line to fix
    assert Path(tmp_path).exists()
