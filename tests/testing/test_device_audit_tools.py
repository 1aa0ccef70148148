"""The device audit over the paths beyond the step (issue 45): the colocated vLLM adapter inside a
training step (refit's TP gather and PP broadcast, generation, the log-prob check) and both
checkpoint converters' rank paths (HF -> megatron shards, megatron -> HF with LoRA merged), at TP2
and PP2. vLLM runs as the stand-in (tests/rollout/fake_vllm): the engine itself is vLLM's and lives
on the GPU; what a CUDA rank would refuse is in the adapter's and converters' own tensors. Each
path also runs with one gather moved to the host, as a first GPU day would find it, and is
refused naming the line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from opsd_megatron.testing import run_distributed

FAKE = str(Path(__file__).resolve().parents[1] / "rollout" / "fake_vllm")


def _host_gather_tp(tensor, groups):  # the TP gather of weights after a .cpu()
    shards = [torch.empty_like(tensor).cpu() for _ in range(groups.tp_size)]
    dist.all_gather(shards, tensor.contiguous().cpu(), group=groups.tp)
    return shards


def _vllm_step(base: Path, tp: int, pp: int) -> None:
    import dataclasses

    from opsd_megatron.algorithms import build_algorithm
    from opsd_megatron.config import load_config
    from opsd_megatron.train.components import build_components
    from opsd_megatron.train.step import train_step
    from tests.train.tiny import RECIPE, overrides, rank_layout

    extra = ["rollout.engine=vllm", "lora.rank=4", "lora.alpha=8.0"]
    cfg = load_config(RECIPE, overrides(base / "run", tp, pp, extra=extra))
    c = build_components(cfg, rank_layout(cfg))
    alg = build_algorithm(cfg, c.algorithm.source, c.teacher, c.arch.vocab_size)
    m = train_step(dataclasses.replace(c, cfg=cfg), alg, 1)
    assert m["sampler_logprob_error"] <= 1e-4, m


def _converters(base: Path, hf_dir: str, tp: int, pp: int) -> None:
    from megatron.core import parallel_state

    from opsd_megatron.models import convert

    shards, hf_out = base / "megatron", base / "hf"
    for d in (shards, hf_out):  # what the converters' atomic_output_dir makes
        d.mkdir(exist_ok=True)
    for run in (
        lambda: convert._hf_to_megatron_rank(hf_dir, str(shards), tp, pp, "float32"),
        lambda: convert._megatron_to_hf_rank(str(shards), str(hf_out), tp, pp, "float32", None),
    ):
        parallel_state.destroy_model_parallel()  # each converter sets up its own layout
        run()


def _paths(out: str, hf_dir: str, tp: int, pp: int, host_gather: bool) -> dict:
    """Under the audit: one OPSD step with vLLM rollouts, then both converters at this layout.
    Clean code raises nothing (a refusal on one rank ends the call with its traceback, the other
    rank's collective then closing); with ``host_gather`` each path's refusal is returned (both
    ranks refuse the same gather)."""
    sys.path.insert(0, FAKE)  # the stand-in engine, not the installed CPU build
    from opsd_megatron.models import hf_weights
    from opsd_megatron.testing.device_audit import DeviceAuditError, device_audit

    base = Path(out)
    paths = {
        "vllm": lambda: _vllm_step(base, tp, pp),
        "convert": lambda: _converters(base, hf_dir, tp, pp),
    }
    errors = {}
    if host_gather:
        hf_weights._gather_tp = _host_gather_tp
    with device_audit():
        for name, run in paths.items():
            try:
                run()
                errors[name] = None
            except DeviceAuditError as e:
                if not host_gather:
                    raise
                errors[name] = str(e)
    return errors


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tests.models.fixtures import make_hf_checkpoint

    return make_hf_checkpoint(tmp_path_factory.mktemp("hf"), "qwen3_untied")


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_vllm_adapter_and_converters_pass_the_audit(tmp_path, hf_dir, tp, pp):
    for errors in run_distributed(
        _paths, 2, str(tmp_path), str(hf_dir), tp, pp, False, timeout=300
    ):
        assert errors == {"vllm": None, "convert": None}, errors


def test_a_host_weight_gather_is_refused_in_refit_and_export(tmp_path, hf_dir):
    for errors in run_distributed(_paths, 2, str(tmp_path), str(hf_dir), 2, 1, True, timeout=300):
        for path in ("vllm", "convert"):
            assert errors[path] is not None, f"{path}: the audit let a host gather through"
            assert "dist.all_gather on a host tensor" in errors[path], errors[path]
            assert "opsd_megatron/" in errors[path] or "tests/testing" in errors[path]
