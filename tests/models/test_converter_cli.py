"""The conversion tools' options: ``--ranks`` (``streaming=False``) on a Qwen2 model (q/k/v
biases) at TP2 and back, bit-identical; bf16 storage both ways (rounded once); ``--overwrite``
through the CLI (refused without it, the old output untouched; replaced with it); ``--adapters``
through the CLI, merging a training run's LoRA into the export exactly as HF peft merges the same
adapters. The library calls run in-process (each CLI start costs ~8 s of imports on 2 cores)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from opsd_megatron.models.convert import convert_hf_to_megatron, convert_megatron_to_hf
from opsd_megatron.testing import run_distributed
from opsd_megatron.train.cli import _rank_entry
from opsd_megatron.train.resolved import resolve
from tests.models.fixtures import hf_logits, make_hf_checkpoint, sample_tokens

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "tools" / name), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(hf_dir.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_qwen2_with_ranks_and_back_is_bit_identical(tmp_path):
    src = make_hf_checkpoint(tmp_path / "hf", "qwen2")
    assert any(k.endswith("q_proj.bias") for k in _tensors(src)), "Qwen2 has q/k/v biases"
    convert_hf_to_megatron(src, tmp_path / "mc", tp=2, dtype="float32", streaming=False)
    meta = json.loads((tmp_path / "mc" / "opsd_model.json").read_text())
    assert meta["written_at"]["tensor_model_parallel_size"] == 2, "--ranks wrote TP shards"
    convert_megatron_to_hf(tmp_path / "mc", tmp_path / "back", tp=2, dtype="float32")
    want, got = _tensors(src), _tensors(tmp_path / "back")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert torch.equal(
        hf_logits(tmp_path / "back", sample_tokens()), hf_logits(src, sample_tokens())
    )


def test_bf16_both_ways_and_overwrite(tmp_path):
    src = make_hf_checkpoint(tmp_path / "hf", "qwen3_tied")
    mc, back = tmp_path / "mc", tmp_path / "back"
    convert_hf_to_megatron(src, mc, dtype="bfloat16")
    convert_megatron_to_hf(mc, back, dtype="bfloat16")
    want, got = _tensors(src), _tensors(back)
    assert all(got[k].dtype == torch.bfloat16 for k in got)
    assert all(torch.equal(want[k].to(torch.bfloat16), got[k]) for k in want), "rounded once"
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "bfloat16"

    to_mc = ["--hf-dir", str(src), "--out", str(mc), "--dtype", "float32"]
    before = {p.name: p.stat().st_mtime_ns for p in mc.rglob("*") if p.is_file()}
    again = _tool("convert_hf_to_megatron.py", *to_mc)
    assert again.returncode == 2 and "--overwrite" in again.stderr, again.stderr[-500:]
    assert {p.name: p.stat().st_mtime_ns for p in mc.rglob("*") if p.is_file()} == before
    res = _tool("convert_hf_to_megatron.py", *to_mc, "--overwrite")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[opsd] convert" in res.stdout and "(100%)" in res.stdout, res.stdout[-500:]  # progress
    convert_megatron_to_hf(mc, tmp_path / "back32", dtype="auto")
    assert all(torch.equal(want[k], v) for k, v in _tensors(tmp_path / "back32").items()), (
        "the fp32 conversion replaced the bf16 one"
    )


def test_adapters_are_merged_as_peft_merges_them(tmp_path):
    from tests.train.reference_steps import _peft_student, saved_weights
    from tests.train.tiny import RECIPE, overrides

    out = tmp_path / "run"
    run_distributed(_rank_entry, 1, resolve(RECIPE, overrides(out, 1, 1, 1), 1), timeout=300)
    res = _tool(
        "convert_megatron_to_hf.py", "--megatron-dir", str(out / "base_model"),
        "--adapters", str(out / "checkpoints" / "step_000001" / "model"),
        "--out", str(tmp_path / "merged"), "--dtype", "float32",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "[opsd] export" in res.stdout, res.stdout[-500:]  # progress
    from opsd_megatron.config import load_config

    adapters = run_distributed(saved_weights, 1, str(out), [1], timeout=300)[0][1]
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in adapters.items())
    peft = _peft_student(load_config(RECIPE, []), {"rank": 8, "alpha": 16.0}, adapters)
    want = {k: v.float() for k, v in peft.merge_and_unload().state_dict().items()}
    got = _tensors(tmp_path / "merged")
    assert set(got) <= set(want) and "model.layers.0.self_attn.q_proj.weight" in got
    errs = {k: (got[k] - want[k]).abs().max().item() for k in got}
    assert max(errs.values()) <= 1e-6, sorted(errs.items(), key=lambda kv: -kv[1])[:3]
    convert_megatron_to_hf(out / "base_model", tmp_path / "base", dtype="float32")
    base = _tensors(tmp_path / "base")
    assert any((got[k] - base[k]).abs().max() > 1e-4 for k in got), "the adapters changed weights"
