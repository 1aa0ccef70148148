"""Benchmark: the colocated vLLM engine against the Megatron-native sampler, in real training steps.

    python bench/vllm_rollout.py                 # tiny recipe and a Qwen3-1.7B-shaped random model
    python bench/vllm_rollout.py --shapes tiny --steps 3

For each model shape and engine it runs ``opsd-train`` for a few steps (TP=1, one GPU, random
weights, the synthetic task) and reads ``metrics.jsonl``: the refit time (vLLM: waking the weights
and streaming every tensor in, steps after the first), rollout tokens per second (generated
tokens / rollout time, refit excluded) and ``sampler_logprob_error``. Prints the numbers and the
ratio vLLM / Megatron; nothing is asserted. Needs a GPU, and vLLM for its half (skipped without).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": [],
    "qwen3_1p7b": [  # Qwen3-1.7B's shape (vocab, layers, widths) with random weights
        "model.architecture.vocab_size=151936",
        "model.architecture.hidden_size=2048",
        "model.architecture.intermediate_size=6144",
        "model.architecture.num_hidden_layers=28",
        "model.architecture.num_attention_heads=16",
        "model.architecture.num_key_value_heads=8",
        "model.architecture.head_dim=128",
        "model.architecture.max_position_embeddings=40960",
        "model.init_std=0.02",
        "lora.rank=64",
        "lora.alpha=128.0",
    ],
}


def run(shape: str, engine: str, steps: int, new_tokens: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bench_{shape}_{engine}_"))
    cmd = [
        sys.executable, "-m", "opsd_megatron.train.cli", str(ROOT / "recipes" / "tiny_cpu.yaml"),
        f"rollout.engine={engine}", "parallel.tensor_model_parallel_size=1",
        f"trainer.max_steps={steps}", f"trainer.output_dir={out}", "model.dtype=bfloat16",
        f"rollout.max_new_tokens={new_tokens}", "trainer.global_batch_size=16",
        "trainer.micro_batch_size=4", "checkpoint.save_interval=1000",
        "logging.progress_bar=false", "logging.tensorboard=false", *SHAPES[shape],
    ]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if res.returncode:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr else "failed"}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    later = metrics[1:] or metrics  # the first step includes compilation and the base load
    refit = sum(m.get("time/refit", 0.0) for m in later) / len(later)
    rollout = sum(m["time/rollout"] for m in later) - refit * len(later)
    tokens = sum(m["generated_tokens"] for m in later)
    return {
        "refit_s": refit,
        "rollout_tokens_per_s": tokens / max(rollout, 1e-9),
        "sampler_logprob_error": max(m.get("sampler_logprob_error", 0.0) for m in later),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    engines = ["megatron"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    if len(engines) == 1:
        print("vLLM is not importable here: only the Megatron sampler is measured")
    for shape in args.shapes:
        row = {e: run(shape, e, args.steps, args.new_tokens) for e in engines}
        if "vllm" in row and "error" not in row["vllm"] and "error" not in row["megatron"]:
            row["vllm_over_megatron_tokens_per_s"] = (
                row["vllm"]["rollout_tokens_per_s"] / row["megatron"]["rollout_tokens_per_s"]
            )
        print(json.dumps({"shape": shape, **row}, indent=2))


if __name__ == "__main__":
    main()
