"""Where data, tokenizers and models come from, decided before anything is loaded: an existing
local path, or a Hugging Face Hub name of the form ``owner/name``. A local path is never sent to
the Hub; a Hub name that cannot be fetched fails in seconds (clusters often have no internet;
``HF_HUB_OFFLINE=1`` uses only the local cache). JSONL is read with 1-based line numbers."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
from pathlib import Path
from typing import Iterator

from opsd_megatron.errors import PathError, UserError

HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
FILE_SUFFIXES = (
    ".json",
    ".jsonl",
    ".parquet",
    ".csv",
    ".txt",
    ".yaml",
    ".yml",
    ".gguf",
    ".safetensors",
    ".bin",
)
HUB_TIMEOUT_S = 10.0


class DataError(UserError):
    pass


def read_jsonl(path: Path) -> Iterator[tuple[int, object]]:
    """(1-based line number, parsed row or the DataError saying what is wrong with it) per non-blank
    line."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield (
                    n,
                    DataError(
                        f"{path}:{n}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column "
                        f"{err.start + 1})"
                    ),
                )
                continue
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as err:
                yield n, DataError(f"{path}:{n}: not valid JSON ({err.msg} at column {err.colno})")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _cached(name: str, repo_type: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(name, repo_type=repo_type, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means "not usable from the cache"
        return False


def check_hub(key: str, name: str, repo_type: str) -> None:
    """A Hub name must be in the local cache, or (online) answer within HUB_TIMEOUT_S."""
    if _cached(name, repo_type):
        return
    local = "download it where the cluster can read it and pass that local directory"
    if _offline():
        raise PathError(
            f"{key}={name!r}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"{local}"
        )
    from huggingface_hub import HfApi

    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        pool.submit(HfApi().repo_info, name, repo_type=repo_type, timeout=HUB_TIMEOUT_S / 2).result(
            HUB_TIMEOUT_S
        )
    except concurrent.futures.TimeoutError:
        raise PathError(
            f"{key}={name!r}: the Hugging Face Hub did not answer within {HUB_TIMEOUT_S:.0f} s; "
            f"{local} (or set HF_HUB_OFFLINE=1 to use the cache)"
        ) from None
    except Exception as err:  # noqa: BLE001 - network, auth, not found: all one message
        first = (str(err).splitlines() or [""])[0][:160]
        raise PathError(
            f"{key}={name!r}: not a local path, and the Hugging Face Hub cannot provide it "
            f"({type(err).__name__}: {first}); {local}"
        ) from None
    finally:
        pool.shutdown(wait=False)


def read_rows_file(path: Path) -> list[tuple[str, object]]:
    """(where, row) of a local data file, where = ``file:line`` (1-based) for JSONL, ``file row N``
    for Parquet; an empty file is an error."""
    if path.suffix == ".jsonl":
        rows = [(f"{path}:{n}", row) for n, row in read_jsonl(path)]
    elif path.suffix == ".parquet":
        from datasets import load_dataset

        rows = [
            (f"{path} row {i}", r)
            for i, r in enumerate(load_dataset("parquet", data_files=str(path), split="train"), 1)
        ]
    else:
        raise DataError(
            f"{path}: unsupported data file type '{path.suffix}' (use .jsonl or .parquet)"
        )
    if not rows:
        raise DataError(f"{path}: no rows (the file is empty)")
    return rows


def read_dataset(where: Path | str, split: str) -> list:
    """The rows of ``split`` of an HF dataset: a directory written by ``save_to_disk`` (read with
    ``load_from_disk``), a directory of data files, or a Hub name (``load_dataset``)."""
    import datasets

    path = Path(where)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(f"{where}: no split '{split}' (it has {sorted(ds)})")
            ds = ds[split]
        return list(ds)
    return list(datasets.load_dataset(str(where), split=split))


def resolve(key: str, spec: str, repo_type: str = "model") -> tuple[str, Path | str]:
    """("file" | "dir", Path) for an existing local path, ("hub", name) for an ``owner/name``;
    anything else is a PathError naming ``key``. Does not contact the Hub (see ``check_hub``)."""
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return "file", path
    if path.is_dir():
        return "dir", path
    looks_local = spec.startswith(("/", ".", "~")) or spec.lower().endswith(FILE_SUFFIXES)
    if looks_local or not HUB_NAME.match(spec):
        raise PathError(
            f"{key}={spec!r}: no such file or directory (and not a Hugging Face Hub name "
            "owner/name)"
        )
    return "hub", spec
