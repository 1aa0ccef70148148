"""Model-parallel initialisation that works the same on a GPU cluster and on CPU/gloo, and the
typed view of the resulting process groups that the rest of the library is handed explicitly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from opsd_megatron.config.layout import Layout
from opsd_megatron.platform import cpu_backend


@dataclass(frozen=True)
class ParallelGroups:
    """This rank's place in the TP x PP x DP grid, built once at initialisation (as torchtitan's
    ``ParallelDims``) and passed to every function that communicates. Only this module asks
    megatron's ``parallel_state`` for groups; megatron's own modules still read it internally."""

    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    pp_last_rank: int  # global rank of this pipeline's last stage (where the logits are)
    # The one device of this rank (chosen once, ``cpu_backend.default_device``): every tensor that
    # meets the model, a collective or the sampler is created on it or moved to it at one seam.
    device: torch.device = torch.device("cpu")

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    def layout(self, sequence_parallel: bool = False) -> Layout:
        """The layout these groups realise (sequence parallelism as the model is built with)."""
        return Layout(self.tp_size, self.pp_size, self.dp_size, sequence_parallel)

    @classmethod
    def from_megatron(cls) -> "ParallelGroups":
        from megatron.core import parallel_state as ps

        return cls(
            tp=ps.get_tensor_model_parallel_group(),
            pp=ps.get_pipeline_model_parallel_group(),
            dp=ps.get_data_parallel_group(),
            tp_rank=ps.get_tensor_model_parallel_rank(),
            tp_size=ps.get_tensor_model_parallel_world_size(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            pp_last_rank=ps.get_pipeline_model_parallel_last_rank(),
            device=cpu_backend.default_device(),
        )


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    seed: int = 1234,
    **kwargs,
) -> ParallelGroups:
    """Set up megatron's TP/PP/DP groups and its model-parallel RNG streams; returns the groups.

    Expects ``torch.distributed`` to be initialised (torchrun, or the test harness). On a machine
    without CUDA it first activates the CPU backend, so the same call serves both.
    """
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: launch with torchrun (or the test harness)"
        )
    cpu_backend.activate()
    world = dist.get_world_size()
    if world % (tensor_model_parallel_size * pipeline_model_parallel_size):
        raise ValueError(
            f"world size {world} is not divisible by "
            "tensor_model_parallel_size*pipeline_model_parallel_size "
            f"= {tensor_model_parallel_size}*{pipeline_model_parallel_size}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        **kwargs,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return ParallelGroups.from_megatron()
