"""Model-parallel initialisation that works the same on a GPU cluster and on CPU/gloo."""

from __future__ import annotations

import torch
import torch.distributed as dist

from opsd_megatron.platform import cpu_backend


def initialize_model_parallel(tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1,
                              seed: int = 1234, **kwargs) -> None:
    """Set up megatron's TP/PP/DP groups and its model-parallel RNG streams.

    Expects ``torch.distributed`` to be initialised (torchrun, or the test harness). On a machine
    without CUDA it first activates the CPU backend, so the same call serves both.
    """
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: launch with torchrun (or the test harness)")
    cpu_backend.activate()
    world = dist.get_world_size()
    if world % (tensor_model_parallel_size * pipeline_model_parallel_size):
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size*pipeline_model_parallel_size "
            f"= {tensor_model_parallel_size}*{pipeline_model_parallel_size}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        **kwargs,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
