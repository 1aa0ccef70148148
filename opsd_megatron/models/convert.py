"""HF <-> megatron distributed-checkpoint conversion at any TP/PP (the library side of
tools/convert_*).

Each conversion runs ``tp*pp`` ranks: under torchrun when launched so, else as local gloo
processes. Every rank builds only its stage/shard (no random init), streams exactly its slices
from safetensors or from the distributed checkpoint, and writes its part. Output goes to a
temporary sibling directory renamed at the end, so a failure leaves no partial output.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch
import torch.distributed as dist

from opsd_megatron.models.hf_io import (
    HFCheckpointReader,
    atomic_output_dir,
    copy_tokenizer_files,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_SUBDIR = "tokenizer"


def _dtype(name: str, fallback: str) -> torch.dtype:
    name = fallback if name == "auto" else name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _hf_to_megatron_rank(hf_dir: str, out: str, tp: int, pp: int, dtype: str) -> dict:
    from opsd_megatron.models import build_gpt_model, read_hf_config
    from opsd_megatron.models.checkpoint import save_model_checkpoint
    from opsd_megatron.models.hf_weights import load_hf_weights
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(tp, pp)
    before = _peak_rss_bytes()
    arch, raw = read_hf_config(hf_dir)
    model = build_gpt_model(arch, _dtype(dtype, arch.torch_dtype), initialize=False, groups=groups)
    with HFCheckpointReader(hf_dir) as reader:
        loaded = load_hf_weights(model, reader, arch)
    save_model_checkpoint(model, out, arch, raw)
    if dist.get_rank() == 0:
        (Path(out) / TOKENIZER_SUBDIR).mkdir()
        copy_tokenizer_files(Path(hf_dir), Path(out) / TOKENIZER_SUBDIR)
    return {"tensors": loaded, "peak_rss_bytes": _peak_rss_bytes(), "rss_before_bytes": before}


def _hf_to_megatron_streamed(hf_dir: str, out: str, dtype: str) -> dict:
    from opsd_megatron.models import read_hf_config
    from opsd_megatron.models.checkpoint import write_metadata
    from opsd_megatron.models.streaming_convert import stream_hf_to_megatron
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(1, 1)
    before = _peak_rss_bytes()
    arch, raw = read_hf_config(hf_dir)
    chunks = stream_hf_to_megatron(hf_dir, out, _dtype(dtype, arch.torch_dtype), groups)
    write_metadata(
        out,
        arch,
        raw,
        {"tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "streamed": True},
    )
    (Path(out) / TOKENIZER_SUBDIR).mkdir()
    copy_tokenizer_files(Path(hf_dir), Path(out) / TOKENIZER_SUBDIR)
    return {"tensors": chunks, "peak_rss_bytes": _peak_rss_bytes(), "rss_before_bytes": before}


def _megatron_to_hf_rank(
    ckpt_dir: str, out: str, tp: int, pp: int, dtype: str, adapters: str | None
) -> dict:
    from opsd_megatron.config import LoRAConfig
    from opsd_megatron.models import build_gpt_model
    from opsd_megatron.models.checkpoint import (
        load_model_checkpoint,
        read_checkpoint_metadata,
    )
    from opsd_megatron.models.hf_weights import export_hf_weights
    from opsd_megatron.models.lora import apply_lora
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(tp, pp)
    arch, meta = read_checkpoint_metadata(ckpt_dir)
    out_dtype = _dtype(dtype, arch.torch_dtype)
    model = build_gpt_model(arch, torch.float32, initialize=False, groups=groups)
    load_model_checkpoint(model, ckpt_dir)
    if adapters:
        _, adapter_meta = read_checkpoint_metadata(adapters)
        apply_lora(model, LoRAConfig(**adapter_meta["lora"]))
        load_model_checkpoint(model, adapters, adapters_only=True)
    export_hf_weights(model, arch, Path(out), dtype=out_dtype)
    if dist.get_rank() == 0:
        hf_config = dict(meta.get("hf_config") or {})
        hf_config["torch_dtype"] = dtype if dtype != "auto" else arch.torch_dtype
        (Path(out) / "config.json").write_text(json.dumps(hf_config, indent=2))
        copy_tokenizer_files(Path(ckpt_dir) / TOKENIZER_SUBDIR, Path(out))
    return {"peak_rss_bytes": _peak_rss_bytes()}


def _run(fn, world: int, *args) -> list[dict]:
    if dist.is_initialized():  # under torchrun: this process is one of the ranks
        if dist.get_world_size() != world:
            raise ValueError(f"launched with {dist.get_world_size()} ranks but tp*pp = {world}")
        return [fn(*args)]
    from opsd_megatron.platform.local_processes import run_distributed

    return run_distributed(fn, world, *args, timeout=24 * 3600)


def convert_hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "auto",
    overwrite: bool = False,
    streaming: bool = True,
) -> list[dict]:
    """Write a megatron distributed checkpoint (+ tokenizer) of an HF model, loadable at any TP x
    PP.

    ``streaming`` (default): one process writes it tensor by tensor (peak memory: one parameter);
    ``tp``/``pp`` are then only checked as the layout to train at. Otherwise ``tp*pp`` ranks each
    build and save their shard (peak memory: the whole model across the ranks)."""
    from opsd_megatron.models import read_hf_config

    arch, _ = read_hf_config(hf_dir)  # fail on a bad config before anything is spawned
    arch.check_layout(tp, pp)
    _dtype(dtype, arch.torch_dtype)
    HFCheckpointReader(hf_dir).close()  # fail on missing shards early, too
    with atomic_output_dir(out_dir, overwrite) as tmp:
        if streaming:
            return _run(_hf_to_megatron_streamed, 1, str(hf_dir), str(tmp), dtype)
        return _run(_hf_to_megatron_rank, tp * pp, str(hf_dir), str(tmp), tp, pp, dtype)


def convert_megatron_to_hf(
    ckpt_dir: str | Path,
    out_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    dtype: str = "auto",
    adapters: str | Path | None = None,
    overwrite: bool = False,
) -> list[dict]:
    """Export a megatron checkpoint (optionally with LoRA adapters merged) as an HF directory."""
    from opsd_megatron.models.checkpoint import read_checkpoint_metadata

    arch, _ = read_checkpoint_metadata(ckpt_dir)
    arch.check_layout(tp, pp)
    _dtype(dtype, arch.torch_dtype)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        return _run(
            _megatron_to_hf_rank,
            tp * pp,
            str(ckpt_dir),
            str(tmp),
            tp,
            pp,
            dtype,
            str(adapters) if adapters else None,
        )


def run_tool(convert, out: str, **kwargs) -> int:
    """What the two conversion scripts share: run, report peak memory, turn bad input into exit
    2."""
    import sys

    try:
        ranks = convert(out_dir=out, **kwargs)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    peak = max(r["peak_rss_bytes"] for r in ranks) / 2**20
    print(f"wrote {out}; peak host memory per rank: {peak:.0f} MiB")
    return 0
