"""HF <-> megatron distributed checkpoint conversion: bit-exact round trips, resharding on load,
loadable exports, and bad input that fails cleanly without partial output."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opsd_megatron.models.convert import convert_hf_to_megatron, convert_megatron_to_hf
from opsd_megatron.models.hf_config import UnsupportedConfigError
from opsd_megatron.testing import run_distributed
from tests.models.fixtures import VOCAB, hf_logits, make_hf_checkpoint, sample_tokens

ROOT = Path(__file__).resolve().parents[2]


def _tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("family", ["qwen3_tied", "llama"])
def test_round_trip_tp2_pp2_is_bit_identical_and_loads_in_hf(tmp_path, family):
    src = make_hf_checkpoint(tmp_path / "hf", family)
    convert_hf_to_megatron(src, tmp_path / "mc", tp=2, pp=2, dtype="float32", streaming=False)
    meta = json.loads((tmp_path / "mc" / "opsd_model.json").read_text())
    assert meta["written_at"] == {
        "tensor_model_parallel_size": 2,
        "pipeline_model_parallel_size": 2,
    }
    convert_megatron_to_hf(tmp_path / "mc", tmp_path / "back", dtype="float32")

    want, got = _tensors(src), _tensors(tmp_path / "back")
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(want[name], got[name]), name
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want)
    assert (tmp_path / "back" / "tokenizer.json").is_file()
    assert torch.equal(
        hf_logits(tmp_path / "back", sample_tokens()), hf_logits(src, sample_tokens())
    )


def _logits_from_checkpoint(tp, ckpt):
    from megatron.core import parallel_state as ps

    from opsd_megatron.models import build_gpt_model
    from opsd_megatron.models.checkpoint import load_model_checkpoint, read_checkpoint_metadata
    from opsd_megatron.models.forward import forward_logits
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(tp, 1)
    arch, _ = read_checkpoint_metadata(ckpt)
    model = build_gpt_model(arch, initialize=False, groups=groups).eval()
    load_model_checkpoint(model, ckpt)
    return ps.get_tensor_model_parallel_rank(), forward_logits(model, sample_tokens())


def test_checkpoint_written_at_tp2_loads_at_tp1(tmp_path):
    src = make_hf_checkpoint(tmp_path / "hf", "qwen3_untied")
    convert_hf_to_megatron(src, tmp_path / "mc", tp=2, pp=1, dtype="float32", streaming=False)
    ((_, tp1_logits),) = run_distributed(_logits_from_checkpoint, 1, 1, str(tmp_path / "mc"))
    tp2 = sorted(run_distributed(_logits_from_checkpoint, 2, 2, str(tmp_path / "mc")))
    tp2_logits = torch.cat([l for _, l in tp2], dim=-1)
    assert torch.allclose(tp1_logits[..., :VOCAB], tp2_logits[..., :VOCAB], atol=1e-5)
    assert (tp1_logits[..., :VOCAB] - hf_logits(src, sample_tokens())).abs().max() <= 1e-4


def _no_leftovers(parent: Path, name: str) -> bool:
    return not (parent / name).exists() and not list(parent.glob(f".{name}.tmp-*"))


def test_missing_shard_fails_without_output(tmp_path):
    src = make_hf_checkpoint(tmp_path / "hf", "qwen3_untied")
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        convert_hf_to_megatron(src, tmp_path / "out", tp=1, pp=1)
    assert _no_leftovers(tmp_path, "out")


def test_unsupported_architecture_names_the_field(tmp_path):
    src = make_hf_checkpoint(tmp_path / "hf", "qwen3_untied")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        UnsupportedConfigError, match=r"config.json: model_type='gpt2' is not supported"
    ):
        convert_hf_to_megatron(src, tmp_path / "out")
    assert _no_leftovers(tmp_path, "out")


def test_tp_not_dividing_heads_is_refused(tmp_path):
    src = make_hf_checkpoint(tmp_path / "hf", "qwen3_untied")
    with pytest.raises(
        UnsupportedConfigError,
        match="tensor_model_parallel_size=3 does not divide num_attention_heads=4",
    ):
        convert_hf_to_megatron(src, tmp_path / "out", tp=3)
    assert _no_leftovers(tmp_path, "out")


def test_failure_inside_the_ranks_leaves_no_partial_output(tmp_path):
    """Weights that do not match config.json are only detected by the ranks, after output began."""
    src = make_hf_checkpoint(tmp_path / "hf", "qwen3_untied")
    other = make_hf_checkpoint(tmp_path / "hf2", "qwen3_tied")  # head_dim 24 vs 16
    for f in src.glob("model-*"):
        f.unlink()
    for f in other.glob("model*"):
        shutil.copy(f, src / f.name)
    for streaming in (True, False):
        with pytest.raises(Exception, match="config.json does not match the weights"):
            convert_hf_to_megatron(src, tmp_path / "out", tp=2, streaming=streaming)
        assert _no_leftovers(tmp_path, "out")


def test_cli_help_and_error_exit(tmp_path):
    for tool in ("convert_hf_to_megatron.py", "convert_megatron_to_hf.py"):
        out = subprocess.run(
            [sys.executable, str(ROOT / "tools" / tool), "--help"], capture_output=True, text=True
        )
        assert out.returncode == 0 and "--tp" in out.stdout and "--out" in out.stdout
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_hf_to_megatron.py"),
            "--hf-dir",
            str(tmp_path / "nope"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "no config.json" in out.stderr
