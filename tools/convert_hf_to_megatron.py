#!/usr/bin/env python3
"""Convert a Hugging Face checkpoint (Qwen3 / Qwen2.5 / Llama-3.x, safetensors) into a megatron-core
distributed checkpoint, which loads at any tensor/pipeline-parallel layout (megatron's
dist_checkpointing reshards on load).

By default one process streams it tensor by tensor: peak host memory is one parameter plus a fixed
≈0.4 GB (imports and buffers), whatever the model size (a 70B converts on a small node);
--tp/--pp are checked as the layout you will train at. --ranks instead runs TP*PP ranks (local CPU
processes, or under `torchrun --nproc-per-node TP*PP`) that each build and save their shard: the
whole model in memory across the ranks. The output directory appears only when the conversion
succeeded.

Example:
    python tools/convert_hf_to_megatron.py --hf-dir Qwen3-8B --out ckpt/qwen3-8b-tp2 --tp 2 --pp 1
"""

from __future__ import annotations

import argparse
import sys

from opsd_megatron.models.convert import convert_hf_to_megatron, run_tool


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--hf-dir",
        required=True,
        help="HF model directory: config.json, *.safetensors (+ index), tokenizer files",
    )
    p.add_argument(
        "--out", required=True, help="output directory for the megatron checkpoint (must not exist)"
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel size to train at (must divide heads and KV heads)",
    )
    p.add_argument(
        "--pp",
        type=int,
        default=1,
        help="pipeline-parallel size to train at (must divide the layers)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the stored weights; auto keeps config.json's torch_dtype",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--ranks",
        action="store_true",
        help="write with TP*PP ranks holding their shards instead of streaming in one process",
    )
    args = p.parse_args(argv)
    return run_tool(
        convert_hf_to_megatron,
        args.out,
        hf_dir=args.hf_dir,
        tp=args.tp,
        pp=args.pp,
        dtype=args.dtype,
        overwrite=args.overwrite,
        streaming=not args.ranks,
    )


if __name__ == "__main__":
    sys.exit(main())
