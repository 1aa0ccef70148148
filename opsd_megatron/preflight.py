"""Fail fast, in the launching process, before any rank or model exists: every path in the config
has the expected form, a Hub name is reachable (or cached) within seconds, and data and benchmark
files are read and validated in full (UTF-8, JSON per line, required fields; 1-based lines).
``opsd-train``/``opsd-eval`` run this first, ``--dry-run`` included."""

from __future__ import annotations

from pathlib import Path

from opsd_megatron.data.sources import check_hub, resolve
from opsd_megatron.errors import PathError

SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")


def _local_dir(key: str, spec: str, needs: tuple[str, ...], what: str) -> Path:
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise PathError(f"{key}={spec!r}: no such directory ({what} must be a local directory)")
    if not any((path / n).is_file() for n in needs):
        raise PathError(f"{key}={spec!r}: not {what} (has none of {', '.join(needs)})")
    return path


def check_model(cfg) -> None:
    m = cfg.model
    if m.hf_dir:
        _local_dir("model.hf_dir", m.hf_dir, ("config.json",), "an HF checkpoint")
        _local_dir("model.hf_dir", m.hf_dir, SAFETENSORS, "an HF safetensors checkpoint")
    if m.megatron_dir:
        _local_dir(
            "model.megatron_dir",
            m.megatron_dir,
            ("opsd_model.json",),
            "a converted checkpoint (tools/convert_hf_to_megatron.py)",
        )
    check_tokenizer("model.tokenizer", m.tokenizer)


def check_tokenizer(key: str, spec: str) -> None:
    from opsd_megatron.data.tokenizer import BUILTIN

    if spec == BUILTIN:
        return
    kind, where = resolve(key, spec, "model")
    if kind == "file":
        raise PathError(
            f"{key}={spec!r}: is a file; a tokenizer is a directory (tokenizer.json, "
            "tokenizer_config.json)"
        )
    if kind == "dir":
        _local_dir(
            key,
            spec,
            ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"),
            "a tokenizer directory",
        )
    else:
        check_hub(key, spec, "model")


def _hub_parts(spec: str) -> list[str]:
    return [
        s.strip()
        for s in spec.split(",")
        if resolve("data.source", s.strip(), "dataset")[0] == "hub"
    ]


def check_data(cfg) -> None:
    from opsd_megatron.data.dataset import load_problems

    if not cfg.data.source.startswith("synthetic:"):
        for name in _hub_parts(cfg.data.source):
            check_hub("data.source", name, "dataset")
    # reads and validates every row (length filters need the tokenizer: on the ranks)
    load_problems(cfg.data, solution_required=cfg.teacher.context == "reference")


def check_benchmarks(cfg) -> None:
    from opsd_megatron.data.benchmarks import load_benchmark

    for spec in cfg.eval.benchmarks:
        spec = str(spec)
        if (
            not spec.startswith("synthetic:")
            and resolve("eval.benchmarks", spec, "dataset")[0] == "hub"
        ):
            check_hub("eval.benchmarks", spec, "dataset")
        load_benchmark(spec, cfg.eval)


def check_training_run(cfg) -> None:
    """Every input of a training run (model, tokenizer, data, benchmarks), before any rank
    starts."""
    check_model(cfg)
    check_data(cfg)
    if cfg.eval.interval and cfg.eval.benchmarks:
        check_benchmarks(cfg)


def check_eval_run(cfg, checkpoint: str | None) -> None:
    """Every input of an evaluation (model, tokenizer, benchmarks, checkpoint), before any rank
    starts."""
    check_model(cfg)
    check_benchmarks(cfg)
    if checkpoint:
        path = Path(checkpoint)
        if not (path / "model").is_dir():
            raise PathError(
                f"--checkpoint {checkpoint!r}: not a training checkpoint (expected "
                f"OUT/checkpoints/step_N with a model/ directory)"
            )
