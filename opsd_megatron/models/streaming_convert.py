"""HF safetensors -> megatron distributed checkpoint, one tensor at a time, in one process.

A megatron ``torch_dist`` checkpoint stores each parameter as a global tensor (layers stacked on a
leading axis, q/k/v interleaved per query group, gate/up split as ``[gate; up]``) in chunks, and
loads at any TP/PP by reading the chunks that overlap each rank's shard. So one process can write
the TP=1/PP=1 chunks and the result loads everywhere. The layout comes from megatron itself: the
model is built on the ``meta`` device (no memory) and its ``sharded_state_dict`` gives every
chunk's key, global shape, offset and the view of its parameter. A torch.distributed.checkpoint
save plan lists those chunks; the planner materialises each from the safetensors only when the
writer asks for it (one file, serial writes). Peak memory: one parameter (a layer's largest
weight) plus the file buffers, whatever the model size.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import (
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from opsd_megatron.models import weight_map as wm
from opsd_megatron.models.hf_config import ArchSpec
from opsd_megatron.models.hf_io import HFCheckpointReader
from opsd_megatron.platform.progress import Progress


def _chunks(model) -> list[tuple[str, object]]:
    """(parameter name, megatron ShardedTensor / ShardedObject) for every chunk of the TP1/PP1
    model."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories

    sharded = model.sharded_state_dict()
    apply_factories(sharded)
    return [
        (name, item)
        for name, value in sharded.items()
        for item in (nested_values(value) if isinstance(value, (dict, list)) else [value])
    ]


def _release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, so RSS would creep up
    with every differently sized tensor even though nothing is held)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _LazyHFPlanner(SavePlanner):
    """A save plan of megatron's chunks whose data is read from the HF checkpoint on demand."""

    def __init__(
        self, chunks, params, reader: HFCheckpointReader, arch: ArchSpec, dtype: torch.dtype
    ):
        self.reader, self.arch, self.dtype, self.params = reader, arch, dtype, params
        self.items, self.sources = [], {}
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        for name, ch in chunks:
            if isinstance(
                ch, ShardedObject
            ):  # megatron's extra state: pickled bytes, as megatron saves them
                buf = io.BytesIO()
                torch.save([ch.data], buf)
                index = MetadataIndex(ch.unique_key)
                self.items.append(WriteItem(index=index, type=WriteItemType.BYTE_IO))
                self.sources[index] = buf
                continue
            sizes = (1,) * ch.prepend_axis_num + tuple(ch.data.shape)
            index = MetadataIndex(ch.key, torch.Size(ch.global_offset))
            self.items.append(
                WriteItem(
                    index=index,
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(
                            offsets=torch.Size(ch.global_offset), sizes=torch.Size(sizes)
                        ),
                        properties=TensorProperties(dtype=dtype),
                        size=torch.Size(ch.global_shape),
                    ),
                )
            )
            self.sources[index] = (name, ch.data, sizes)
        self._cached = (None, None)
        self.progress, self.done = Progress(len(self.items), label="convert"), 0

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=True) -> None:
        pass

    def create_local_plan(self) -> SavePlan:
        return SavePlan(self.items)

    def create_global_plan(self, all_plans):
        plans, metadata = create_default_global_save_plan(all_plans, rewrite_index_hints=False)
        return plans, metadata

    def finish_plan(self, new_plan: SavePlan) -> SavePlan:
        return new_plan

    def _parameter(self, name: str) -> torch.Tensor:
        """The full TP=1 megatron parameter ``name``, from its HF tensors (cached: fc1's halves)."""
        if self._cached[0] != name:
            self._cached = (None, None)  # drop the previous one before reading the next
            _release_freed_memory()
            rule = wm.rule_for(name, self.arch)
            shapes = [self.reader.shape(n) for n in rule.hf_names]
            parts = [
                self.reader.get(n, sl)
                for n, sl in zip(rule.hf_names, wm.source_slices(rule, self.arch, 0, 1, shapes))
            ]
            value = wm.combine(rule, parts, self.arch, 1).to(self.dtype)
            if tuple(value.shape) != tuple(self.params[name].shape):
                raise ValueError(
                    f"{self.reader.dir}: {rule.hf_names} give shape {tuple(value.shape)} for "
                    "megatron "
                    f"'{name}' which needs {tuple(self.params[name].shape)} (config.json does not "
                    f"match the weights?)"
                )
            self._cached = (name, value)
        return self._cached[1]

    def resolve_data(self, write_item: WriteItem):
        self.done += 1
        self.progress.update(min(self.done, self.progress.total), "chunks")
        source = self.sources[write_item.index]
        if isinstance(source, io.BytesIO):
            return source
        name, view, sizes = source
        full = self._parameter(name)
        return (
            full.as_strided(view.shape, view.stride(), view.storage_offset())
            .reshape(sizes)
            .contiguous()
        )


def stream_hf_to_megatron(
    hf_dir: str | Path, out_dir: str | Path, dtype: torch.dtype, groups
) -> int:
    """Write ``out_dir`` (must exist, empty) as a megatron torch_dist checkpoint; returns the chunk
    count.

    ``groups``: the TP=1/PP=1 process groups of one process (``initialize_model_parallel(1, 1)``).
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    from opsd_megatron.models import build_gpt_model, read_hf_config
    from opsd_megatron.models.lora import base_weight_items

    arch, _ = read_hf_config(hf_dir)
    with torch.device("meta"):
        model = build_gpt_model(arch, dtype, initialize=False, groups=groups)
    params = {name: t for name, t in base_weight_items(model)}
    with HFCheckpointReader(hf_dir, keep_open=False) as reader:
        planner = _LazyHFPlanner(_chunks(model), params, reader, arch, dtype)
        writer = FileSystemWriter(str(out_dir), single_file_per_rank=True, thread_count=1)
        dcp_save(state_dict={}, storage_writer=writer, planner=planner, no_dist=True)
        planner.progress.close()
    torch.save({}, Path(out_dir) / "common.pt")
    save_config(CheckpointingConfig("torch_dist", 1, "torch", 1), str(out_dir))
    return len(planner.items)
