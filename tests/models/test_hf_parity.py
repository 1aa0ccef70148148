"""HF transformers forward == megatron-core forward (weights loaded by our maps) at TP/PP
layouts."""

from __future__ import annotations

import pytest
import torch

from opsd_megatron.testing import run_distributed
from tests.models.fixtures import FAMILIES, VOCAB, hf_logits, make_hf_checkpoint, sample_tokens

TOL = 1e-4  # fp32, max abs logit difference


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {fam: make_hf_checkpoint(root / fam, fam) for fam in FAMILIES}


def megatron_logits(tp, pp, hf_dirs, sp=False, seq=12):
    from megatron.core import parallel_state as ps

    from opsd_megatron.models import build_gpt_model, read_hf_config
    from opsd_megatron.models.forward import forward_logits
    from opsd_megatron.models.hf_io import HFCheckpointReader
    from opsd_megatron.models.hf_weights import load_hf_weights
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(tp, pp)
    out = {}
    for fam, path in hf_dirs.items():
        arch, _ = read_hf_config(path)
        model = build_gpt_model(arch, sequence_parallel=sp, groups=groups).eval()
        with HFCheckpointReader(path) as reader:
            load_hf_weights(model, reader, arch)
        logits = forward_logits(model, sample_tokens(seq=seq))
        out[fam] = None if logits is None else (ps.get_tensor_model_parallel_rank(), logits)
    return out


@pytest.mark.parametrize(
    "tp,pp,sp",
    [(1, 1, False), (2, 1, False), (1, 2, False), (2, 2, False), (2, 1, True), (2, 2, True)],
    ids=["tp1", "tp2", "pp2", "tp2pp2", "tp2-sp", "tp2pp2-sp"],
)
def test_megatron_matches_hf(tp, pp, sp, hf_dirs):
    seq = (
        13 if sp else 12
    )  # sequence parallel: an odd length exercises the padding to a multiple of TP
    per_rank = run_distributed(megatron_logits, tp * pp, tp, pp, hf_dirs, sp, seq)
    for fam, path in hf_dirs.items():
        want = hf_logits(path, sample_tokens(seq=seq))
        shards = sorted(r[fam] for r in per_rank if r[fam] is not None)
        assert [s[0] for s in shards] == list(range(tp))
        full = torch.cat([s[1] for s in shards], dim=-1)
        assert full.shape[-1] >= VOCAB and full.shape[-1] % (128 * tp) == 0
        err = (full[..., :VOCAB] - want).abs().max().item()
        assert err <= TOL, f"{fam} at TP={tp} PP={pp}: max |logit diff| {err:.2e}"


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}  # the only values megatron-core takes


def _llama3_checkpoint(path, rope_scaling):
    """Llama with Llama-3 RoPE scaling, rope_theta 1e5 and head_dim 16: wavelengths 6 to 1.5e5
    positions, four of them beyond the 2048 where the scaling starts, so over 512 positions the
    scaled bands rotate by up to 0.4 rad less; weights large enough (std 0.15) that this shows."""
    import transformers

    from tests.models.fixtures import COMMON, build_tokenizer

    cfg = transformers.LlamaConfig(
        **{
            **COMMON,
            "tie_word_embeddings": False,
            "rope_theta": 1e5,
            "max_position_embeddings": 1024,
            "rope_scaling": rope_scaling,
            "initializer_range": 0.15,
        }
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).float().eval().save_pretrained(path, safe_serialization=True)
    build_tokenizer(path)
    return path


SEQ = 512


def test_llama3_rope_scaling_matches_hf_where_the_scaling_matters(tmp_path):
    scaled = _llama3_checkpoint(tmp_path / "scaled", LLAMA3_ROPE)
    tokens = sample_tokens(seq=SEQ)
    want = hf_logits(scaled, tokens)
    unscaled = hf_logits(_llama3_checkpoint(tmp_path / "plain", None), tokens)
    sensitivity = (want - unscaled).abs().max().item()
    assert sensitivity > 100 * TOL, (
        f"the scaling barely changes the logits ({sensitivity:.1e}): the test is blind"
    )
    per_rank = run_distributed(megatron_logits, 2, 2, 1, {"llama3": scaled}, False, SEQ)
    full = torch.cat([s[1] for s in sorted(r["llama3"] for r in per_rank)], dim=-1)[..., :VOCAB]
    err = (full - want).abs().max().item()
    assert err <= TOL, (
        f"Llama-3 RoPE at TP=2: max |logit diff| {err:.2e} (dropping the scaling: "
        f"{sensitivity:.1e})"
    )
