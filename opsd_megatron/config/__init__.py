"""The run's configuration: typed section dataclasses (``*_sections.py``), the whole-run schema
(``schema.py``), loading recipes with overrides (``loader.py``) and the layout check
(``layout.py``). Nothing here imports the rest of the library: every other package may import this
one."""

from opsd_megatron.config.algorithm_sections import (
    EvalConfig,
    GRPOConfig,
    LossConfig,
    RolloutConfig,
    SFTConfig,
    VLLMConfig,
)
from opsd_megatron.config.base import ConfigError
from opsd_megatron.config.layout import Layout, validate_layout
from opsd_megatron.config.loader import RENAMED, load_config, load_structured, to_dict, to_yaml
from opsd_megatron.config.model_sections import (
    LORA_TARGETS,
    LoRAConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    TeacherConfig,
)
from opsd_megatron.config.run_sections import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    TrainerConfig,
)
from opsd_megatron.config.schema import OPSDConfig

__all__ = [
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvalConfig",
    "GRPOConfig",
    "LORA_TARGETS",
    "Layout",
    "LoRAConfig",
    "LoggingConfig",
    "LossConfig",
    "ModelConfig",
    "OPSDConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RENAMED",
    "RolloutConfig",
    "SFTConfig",
    "TeacherConfig",
    "TrainerConfig",
    "VLLMConfig",
    "load_config",
    "load_structured",
    "to_dict",
    "to_yaml",
    "validate_layout",
]
