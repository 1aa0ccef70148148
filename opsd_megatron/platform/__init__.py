"""Where the code runs: CUDA, or megatron-core's CPU backend, and model-parallel initialisation."""

from opsd_megatron.platform.clock import wall_clock
from opsd_megatron.platform.cpu_backend import activate as activate_cpu_backend
from opsd_megatron.platform.cpu_backend import default_device
from opsd_megatron.platform.parallel import (
    ParallelGroups,
    initialize_model_parallel,
)

__all__ = [
    "ParallelGroups",
    "activate_cpu_backend",
    "default_device",
    "initialize_model_parallel",
    "wall_clock",
]
