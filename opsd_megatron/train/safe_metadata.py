"""Reading a checkpoint someone else wrote without running their code.

torch's distributed checkpoint stores its index (``.metadata``) as a pickle, and megatron's
``common.pt`` is a ``torch.save`` file: loading either with plain pickle executes whatever the
author put there. ``load_metadata`` unpickles ``.metadata`` allowing only the classes torch's
checkpoint metadata is made of; ``common.pt`` goes through ``torch.load(weights_only=True)``."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

DCP = "torch.distributed.checkpoint"
ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    (f"{DCP}.filesystem", "_StorageInfo"),
    *(
        (f"{DCP}.metadata", n)
        for n in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorProperties",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    *((f"{DCP}.planner", n) for n in ("SavePlan", "TensorWriteData", "WriteItem", "WriteItemType")),
}


class UnsafeCheckpoint(ValueError):
    pass


class _Restricted(pickle.Unpickler):
    def __init__(self, data: bytes, where: Path):
        super().__init__(io.BytesIO(data))
        self.where = where

    def find_class(self, module: str, name: str):
        if (module, name) in ALLOWED or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise UnsafeCheckpoint(
            f"{self.where}: refers to {module}.{name}, which checkpoint metadata never "
            f"needs; not loading it (it could run code)"
        )


def load_metadata(path: Path):
    """Unpickle a ``.metadata`` file with only checkpoint-metadata classes allowed."""
    try:
        return _Restricted(path.read_bytes(), path).load()
    except UnsafeCheckpoint:
        raise
    except Exception as err:  # noqa: BLE001 - truncated or garbage
        raise UnsafeCheckpoint(
            f"{path}: not a readable checkpoint index ({type(err).__name__}: {err})"
        ) from None


def check_untrusted(ckpt: Path) -> list[str]:
    """Problems found loading every pickle-based file under ``ckpt`` the safe way ([] if none)."""
    problems = []
    for path in sorted(ckpt.rglob(".metadata")):
        try:
            load_metadata(path)
        except UnsafeCheckpoint as err:
            problems.append(str(err))
    for path in sorted(ckpt.rglob("*.pt")):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - weights_only refuses anything but tensors and plain data
            problems.append(
                f"{path}: refused by torch.load(weights_only=True) "
                f"({str(err).splitlines()[0][:200]})"
            )
    return problems
