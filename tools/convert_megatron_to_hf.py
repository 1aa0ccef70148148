#!/usr/bin/env python3
"""Export a megatron-core distributed checkpoint made by this project (convert_hf_to_megatron.py or
training) as a Hugging Face directory: config.json, safetensors shards with an index, tokenizer
files. Loads with transformers.AutoModelForCausalLM.from_pretrained and with vLLM.

LoRA adapters saved by training can be merged into the weights with --adapters. Weights are
streamed one tensor at a time (gathered over TP, written by each pipeline stage).

Example:
    python tools/convert_megatron_to_hf.py --megatron-dir ckpt/qwen3-8b-tp2 --out qwen3-8b-opsd \\
        --adapters runs/opsd/checkpoints/step_000100/model
"""

from __future__ import annotations

import argparse
import sys

from opsd_megatron.models.convert import convert_megatron_to_hf, run_tool


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--megatron-dir", required=True, help="megatron checkpoint directory (has opsd_model.json)"
    )
    p.add_argument("--out", required=True, help="output HF directory (must not exist)")
    p.add_argument(
        "--adapters", default=None, help="LoRA adapter checkpoint to merge into the weights"
    )
    p.add_argument(
        "--tp", type=int, default=1, help="ranks to spread the export over (tensor parallel)"
    )
    p.add_argument(
        "--pp", type=int, default=1, help="ranks to spread the export over (pipeline parallel)"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype of the exported weights; auto uses the original config's torch_dtype",
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    return run_tool(
        convert_megatron_to_hf,
        args.out,
        ckpt_dir=args.megatron_dir,
        tp=args.tp,
        pp=args.pp,
        dtype=args.dtype,
        adapters=args.adapters,
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    sys.exit(main())
