"""Streaming safetensors I/O for HF checkpoints: read one tensor (or one slice) at a time, write
size-bounded shards with an index, and publish a directory atomically.

Only safetensors is read (never pickle). Reading a slice touches only its bytes, so a TP rank
loading its shard never materialises the full tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
    "added_tokens.json",
)


class HFCheckpointReader:
    """Tensor-by-tensor access to an HF directory's safetensors (sharded with an index, or
    single)."""

    def __init__(self, hf_dir: str | Path, keep_open: bool = True):
        """``keep_open=False`` maps a shard only while reading one tensor, so the pages read never
        accumulate in this process's resident memory (the streaming converter's bound)."""
        self.dir = Path(hf_dir)
        self.keep_open = keep_open
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"{index}: not a valid safetensors index ({err})") from err
        elif (self.dir / SINGLE).is_file():
            with safe_open(self.dir / SINGLE, framework="pt") as f:
                weight_map = {k: SINGLE for k in f.keys()}
        else:
            raise FileNotFoundError(
                f"{self.dir}: no {INDEX} or {SINGLE} (only safetensors checkpoints are read)"
            )
        missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
        if missing:
            raise FileNotFoundError(
                f"{self.dir}: shard file(s) listed in the index are missing: {', '.join(missing)}"
            )
        self.weight_map = weight_map
        self._handles: dict[str, object] = {}
        self._stack = contextlib.ExitStack()

    @contextlib.contextmanager
    def _file(self, name: str):
        if name not in self.weight_map:
            raise KeyError(f"{self.dir}: tensor '{name}' is not in the checkpoint")
        fname = self.weight_map[name]
        if not self.keep_open:
            with safe_open(self.dir / fname, framework="pt") as f:
                yield f
            return
        if fname not in self._handles:
            self._handles[fname] = self._stack.enter_context(
                safe_open(self.dir / fname, framework="pt")
            )
        yield self._handles[fname]

    def shape(self, name: str) -> tuple[int, ...]:
        with self._file(name) as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str, sl: tuple[int, int, int] | None = None) -> torch.Tensor:
        """The tensor, or only rows/columns ``start:stop`` along ``dim`` for ``sl=(dim, start,
        stop)``."""
        with self._file(name) as f:
            if sl is None:
                return f.get_tensor(name)
            dim, start, stop = sl
            view = f.get_slice(name)
            return view[start:stop] if dim == 0 else view[:, start:stop]

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HFCheckpointWriter:
    """Buffer tensors and flush them as safetensors parts of bounded size.

    Several writers (one per pipeline stage) may share a directory, told apart by ``prefix``;
    :meth:`write_index` then names all parts ``model-00001-of-0000N.safetensors`` and writes the
    index.
    """

    def __init__(self, out_dir: Path, max_shard_bytes: int = 2 << 30, prefix: str = ""):
        self.dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.prefix = prefix
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._parts: list[tuple[str, list[str], int]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor.detach().contiguous().cpu()
        self._buffer_bytes += nbytes

    def _flush(self) -> None:
        fname = f"{self.prefix}part-{len(self._parts):05d}.safetensors"
        save_file(self._buffer, str(self.dir / fname), metadata={"format": "pt"})
        self._parts.append((fname, list(self._buffer), self._buffer_bytes))
        self._buffer, self._buffer_bytes = {}, 0

    def close_parts(self) -> list[tuple[str, list[str], int]]:
        """Flush what is buffered; return (file, tensor names, bytes) of every part written."""
        if self._buffer:
            self._flush()
        return list(self._parts)

    @staticmethod
    def write_index(out_dir: Path, parts: list[tuple[str, list[str], int]]) -> None:
        n = len(parts)
        weight_map, total = {}, 0
        for i, (tmp_name, names, nbytes) in enumerate(parts):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(Path(out_dir) / tmp_name, Path(out_dir) / final)
            weight_map.update({k: final for k in names})
            total += nbytes
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (Path(out_dir) / INDEX).write_text(json.dumps(index, indent=2))


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


@contextlib.contextmanager
def atomic_output_dir(out_dir: str | Path, overwrite: bool = False):
    """Yield a temporary sibling directory; rename it to ``out_dir`` only if the block succeeds.

    A failure (bad input, crash) leaves no partial ``out_dir`` behind.
    """
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(
            f"{out}: output directory already exists (pass --overwrite to replace it)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
