"""Training through megatron-core's DDP and mixed-precision (distributed) optimizer on CPU/gloo.

* bf16 parameters keep small updates: fp32 master weights move like an fp32 run's weights, where
  stepping the bf16 parameters themselves (``optimizer.precision=bf16``, what the plain-AdamW
  trainer did) loses most of them (measured: see the asserts' messages).
* DP2 with the distributed optimizer equals DP1 (SFT: no sampling, so the data are identical),
  also at PP2xDP2; each DP rank holds 1/DP of the optimizer state, as the planner says.
* A DP2 run stopped at step 2 resumes exactly, and resumes at DP1; a checkpoint of the older
  optimizer format is refused in one line.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from opsd_megatron.testing import run_distributed
from opsd_megatron.train.cli import _rank_entry
from opsd_megatron.train.resolved import resolve
from tests.train.tiny import RECIPE, metrics, overrides

ARCH = dict(
    model_type="qwen3",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


def _steps_with(dtype_name, precision, lora, lr=2e-5, steps=3):
    """3 optimizer steps on a fixed batch; returns {name: fp32 weights after - before}."""
    from opsd_megatron.config import load_config
    from opsd_megatron.models import arch_from_hf_config, build_gpt_model
    from opsd_megatron.models.hf_weights import load_hf_weights
    from opsd_megatron.models.lora import apply_lora
    from opsd_megatron.models.loss_contract import finalize_gradients
    from opsd_megatron.models.random_init import RandomHFWeights
    from opsd_megatron.platform import initialize_model_parallel
    from opsd_megatron.train.optimizer import optimizer_step, wrap_and_build, zero_grads

    groups = initialize_model_parallel(1, 1)
    dtype = getattr(torch, dtype_name)
    cfg = load_config(
        RECIPE,
        [
            f"optimizer.lr={lr}",
            f"optimizer.precision={precision}",
            "optimizer.grad_clip=0",
            "optimizer.distributed=false",  # its master copies map 1:1 to the params
            *([] if lora else ["lora=null", "teacher.weights=frozen_copy"]),
        ],
    )
    arch = arch_from_hf_config(ARCH)
    model = build_gpt_model(arch, dtype, initialize=False, groups=groups)
    load_hf_weights(model, RandomHFWeights(arch, 0, 0.1), arch)
    if lora:
        apply_lora(model, cfg.lora)
        with torch.no_grad():  # B = 0 at init would hide A's updates for a step
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.05)
    model.config.calculate_per_token_loss = True
    before = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    ddp, opt = wrap_and_build(cfg, model, dtype)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (4, 24), generator=gen)
    for _ in range(steps):
        zero_grads(ddp, opt)
        logits = ddp(tokens[:, :-1], None, attention_mask=None).float()
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1])[:, :128], tokens[:, 1:].reshape(-1)
        ).backward()
        finalize_gradients(ddp)
        optimizer_step(opt, 0.0)
    masters = {}
    inner = opt.chained_optimizers[0]
    if hasattr(
        inner, "fp32_from_float16_groups"
    ):  # the fp32 master copies, same order as the params
        for group, main_group in zip(inner.float16_groups, inner.fp32_from_float16_groups):
            for p, m in zip(group, main_group):
                masters[id(p)] = m
    return {
        n: masters.get(id(p), p).detach().float() - before[n]
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def _relative_update_error(lora):
    ref = run_distributed(_steps_with, 1, "float32", "fp32", lora)[0]
    out = {}
    for precision in ("fp32", "bf16"):
        got = run_distributed(_steps_with, 1, "bfloat16", precision, lora)[0]
        num = sum(float((got[n] - ref[n]).square().sum()) for n in ref)
        den = sum(float(ref[n].square().sum()) for n in ref)
        out[precision] = (num / den) ** 0.5
    return out


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_bf16_params_with_fp32_master_weights_update_like_fp32(lora):
    """lr 2e-5, 3 steps. Measured here: master-weight updates within 1.4% (LoRA) / 1.0% (full) of
    the fp32 run's (bf16 forward noise); the no-master-copy path is off by 54% / 97%."""
    err = _relative_update_error(lora)
    print(err)
    assert err["fp32"] < 0.3, err
    assert err["bf16"] > 0.9, f"stepping bf16 weights directly should lose updates: {err}"


def _sft(out, world, tp=1, pp=1, steps=3, extra=()):
    ov = overrides(
        out,
        tp,
        pp,
        steps=steps,
        extra=(
            "algorithm=sft",
            "optimizer.schedule=constant",
            "trainer.save_rollouts=false",
            *extra,
        ),
    )
    run_distributed(_rank_entry, world, resolve(RECIPE, ov, world), timeout=300)
    return metrics(out)


def _adapters(out, step):
    """Adapter weights of a checkpoint, by name, loaded into a TP1 model in one process."""
    from safetensors.torch import load_file

    export = out / f"export_{step}"
    tool = [
        sys.executable,
        "tools/convert_megatron_to_hf.py",
        "--megatron-dir",
        str(out / "base_model"),
        "--adapters",
        str(out / "checkpoints" / f"step_{step:06d}" / "model"),
        "--out",
        str(export),
        "--dtype",
        "float32",
    ]
    subprocess.run(tool, check=True, capture_output=True, timeout=300)
    return {
        k: v for f in sorted(export.glob("*.safetensors")) for k, v in load_file(str(f)).items()
    }


# TP2 alone and DP2 alone are checked against fp64 in tests/train/test_e2e.py; here the
# distributed optimizer against the plain one, at DP2 and PP2xDP2
@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2)], ids=["dp2", "pp2xdp2"])
def test_distributed_optimizer_dp2_equals_dp1(tmp_path, tp, pp):
    one = _sft(tmp_path / "dp1", tp * pp, tp, pp, extra=("optimizer.distributed=false",))
    two = _sft(tmp_path / "dp2", 2 * tp * pp, tp, pp)  # the distributed optimizer (default)
    for a, b in zip(one, two):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a["loss"], b["loss"])
        assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * a["grad_norm"], (
            a["grad_norm"],
            b["grad_norm"],
        )
    if tp * pp > 1:  # steps 2-3 already depend on the updated weights; compare them once (dp2)
        return
    w1, w2 = _adapters(tmp_path / "dp1", 3), _adapters(tmp_path / "dp2", 3)
    assert w1.keys() == w2.keys()
    worst = max(float((w1[k] - w2[k]).abs().max()) for k in w1)
    print("max weight difference", worst)
    assert worst <= 1e-4, worst


def _state_bytes(tp, dp_world):
    """Per rank: bytes of the optimizer's state tensors after one step, and the planner's figure."""
    from opsd_megatron.config import load_config
    from opsd_megatron.plan_config import plan_input
    from opsd_megatron.planner import plan
    from opsd_megatron.train.components import build_components
    from opsd_megatron.train.step import train_step
    from tests.train.tiny import rank_layout

    cfg = load_config(
        RECIPE,
        [
            f"parallel.tensor_model_parallel_size={tp}",
            "algorithm=sft",
            "model.dtype=bfloat16",
            "trainer.global_batch_size=4",
            "trainer.micro_batch_size=2",
            "logging.tensorboard=false",
            "logging.progress_bar=false",
            "trainer.output_dir=/tmp/unused-opsd-test",
        ],
    )
    c = build_components(cfg, rank_layout(cfg))
    train_step(c, c.algorithm, 0)
    held = 0
    for inner in c.optimizer.chained_optimizers:
        for state in inner.optimizer.state.values():
            held += sum(
                v.numel() * v.element_size()
                for k, v in state.items()
                if torch.is_tensor(v) and k != "step"
            )
        for group in getattr(inner, "shard_fp32_from_float16_groups", None) or getattr(
            inner, "fp32_from_float16_groups", []
        ):
            held += sum(p.numel() * p.element_size() for p in group)
    return held, plan(plan_input(cfg, c.layout))["optimizer_states"]


def test_optimizer_state_is_sharded_over_dp_as_planned():
    alone = run_distributed(_state_bytes, 2, 2, 2)  # TP2: each rank holds its shard's full state
    sharded = run_distributed(_state_bytes, 4, 2, 4)  # TP2xDP2, distributed optimizer
    for held, planned in alone + sharded:
        assert held == planned, (held, planned)
    assert sum(h for h, _ in sharded) == sum(h for h, _ in alone), (
        "DP ranks split the state, nothing more"
    )
    assert sharded[0][0] == alone[0][0] / 2


def test_distributed_optimizer_resumes_exactly_and_at_another_dp(tmp_path):
    straight = _sft(tmp_path / "straight", 2, steps=4)
    out = tmp_path / "resumed"
    _sft(out, 2, steps=2)
    resumed = _sft(out, 2, steps=4)
    keys = ("loss", "grad_norm", "lr")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert json.loads((out / "summary.json").read_text())["start_step"] == 2, (
        "resumed, not restarted"
    )
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in straight]
    other = tmp_path / "other_dp"
    _sft(other, 2, steps=2)
    at_dp1 = _sft(other, 1, steps=4)
    assert [r["step"] for r in at_dp1] == [1, 2, 3, 4]
    assert json.loads((other / "summary.json").read_text())["start_step"] == 2
    for a, b in zip(at_dp1[2:], straight[2:]):
        assert (
            abs(a["loss"] - b["loss"]) <= 1e-5 * abs(b["loss"])
            and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-4 * b["grad_norm"]
        ), (a, b)


def test_checkpoint_of_the_older_optimizer_format_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    _sft(out, 1, steps=1)
    state_file = out / "checkpoints" / "step_000001" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del (
        state["optimizer_format"],
        state["optimizer_kind"],
        state["manifest"],
    )  # as the old trainer wrote it
    state_file.write_text(json.dumps(state))
    cmd = [
        sys.executable,
        "-m",
        "opsd_megatron.train.cli",
        RECIPE,
        *overrides(
            out,
            steps=2,
            extra=("algorithm=sft", "trainer.save_rollouts=false", "checkpoint.resume=force"),
        ),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "optimizer state is from an older format" in res.stdout + res.stderr
