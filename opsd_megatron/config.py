"""Typed run configuration: one dataclass per component, loaded from a YAML recipe and overridden by
``key=value`` dotlists (NeMo style: ``trainer.max_steps=100 loss.beta=0.5``).

Unknown keys fail naming the closest valid key; wrong types fail naming the key and the expected
type; each component validates itself in ``__post_init__``. Defaults follow the paper (Table 6,
§4.1): AdamW lr 2e-5, warmup 0.1, cosine, global batch 32, 1 rollout per problem, 2048 new
tokens at temperature 1.2, JSD β=0.5, LoRA r=64 α=128, teacher fixed to the initial policy.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from opsd_megatron.config_sections import (  # noqa: F401  (re-exported)
    ConfigError, EvalConfig, GRPOConfig, LossConfig, RolloutConfig, SFTConfig, VLLMConfig)
from opsd_megatron.models.lora import LoRAConfig
from opsd_megatron.models.teacher import TeacherConfig


def _at_least(key: str, value, low) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")


@dataclass
class ModelConfig:
    hf_dir: Optional[str] = None  # HF checkpoint to start from (config.json + safetensors)
    megatron_dir: Optional[str] = None  # or a converted megatron checkpoint
    # An HF config dict. Alone: a randomly initialised model (tiny recipes, tests). Beside hf_dir /
    # megatron_dir: lets a recipe validate its layout before the weights exist (checked against them).
    architecture: Optional[dict] = None
    recompute: bool = False  # full activation recompute of every layer (keeps only layer inputs)
    tokenizer: str = "builtin:arith"  # a tokenizer directory, or the project's local one
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    init_seed: int = 1234
    init_std: float = 0.02  # random init only (model.architecture alone)

    def sources(self) -> list:
        return [s for s in (self.hf_dir, self.megatron_dir, self.architecture) if s]

    def arch(self):
        """The ArchSpec from ``architecture`` if given, else from the checkpoint's files."""
        from opsd_megatron.models.checkpoint import read_checkpoint_metadata
        from opsd_megatron.models.hf_config import arch_from_hf_config, read_hf_config

        if self.architecture:
            return arch_from_hf_config(dict(self.architecture), "model.architecture")
        if self.hf_dir:
            return read_hf_config(self.hf_dir)[0]
        return read_checkpoint_metadata(self.megatron_dir)[0]

    def __post_init__(self):
        if self.hf_dir and self.megatron_dir:
            raise ConfigError("model: set only one of model.hf_dir, model.megatron_dir")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(f"model.dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    data_parallel_size: Optional[int] = None  # None: whatever the launch's world size leaves
    sequence_parallel: bool = False  # with TP > 1: activations outside the TP regions split along the sequence

    def __post_init__(self):
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            raise ConfigError("parallel: tensor/pipeline_model_parallel_size must be >= 1")


@dataclass
class TeacherUpdateConfig:
    kind: str = "fixed"  # fixed (initial policy) | ema (moving average of the student) | current
    ema_rate: float = 0.99
    model: TeacherConfig = field(default_factory=TeacherConfig)

    def __post_init__(self):
        if self.kind not in ("fixed", "ema", "current"):
            raise ConfigError(f"teacher.kind must be fixed|ema|current, got {self.kind!r}")
        if not 0.0 < self.ema_rate < 1.0:
            raise ConfigError(f"teacher.ema_rate must be in (0, 1), got {self.ema_rate}")


@dataclass
class OptimizerConfig:
    lr: float = 2e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0
    warmup_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | constant
    # megatron's distributed optimizer: fp32 master weights and moments sharded over DP (reduce-
    # scatter of grads, all-gather of weights). None: on (at DP1 it holds what the plain one does,
    # and its checkpoints resume at any DP size); false: megatron's non-distributed optimizer.
    distributed: Optional[bool] = None
    # fp32: master weights and AdamW moments in fp32 whenever the parameters are bf16 (default);
    # bf16: step the bf16 parameters themselves (no master copy; loses small updates, for comparison).
    precision: str = "fp32"
    overlap_grad_reduce: bool = True  # reduce gradient buckets during the backward (GPUs: CUDA streams)
    bucket_mb: Optional[int] = None  # DDP gradient bucket size in MiB of fp32 grads (None: megatron's)

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optimizer.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"optimizer.schedule must be cosine|constant, got {self.schedule!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optimizer.min_lr must be in [0, optimizer.lr], got {self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(f"optimizer: need eps > 0, weight_decay >= 0, grad_clip >= 0 (got eps={self.eps}, "
                              f"weight_decay={self.weight_decay}, grad_clip={self.grad_clip})")
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"optimizer.precision must be fp32|bf16, got {self.precision!r}")
        if self.precision == "bf16" and self.distributed:
            raise ConfigError("optimizer.precision=bf16 (no fp32 master weights) needs optimizer.distributed=false: "
                              "megatron's distributed optimizer always keeps fp32 master weights")
        if self.bucket_mb is not None and self.bucket_mb < 1:
            raise ConfigError(f"optimizer.bucket_mb must be >= 1, got {self.bucket_mb}")


@dataclass
class DataConfig:
    source: str = "synthetic:arith"  # synthetic:arith | jsonl/parquet path(s) | an HF dataset name
    split: str = "train"
    problem_field: str = "problem"
    solution_field: str = "solution"
    max_problem_tokens: int = 1024
    max_solution_tokens: int = 4096
    deduplicate: bool = True
    shuffle_seed: int = 0
    skip_malformed: bool = False
    num_synthetic: int = 2000
    student_template: str = ("Problem: {problem}\n\nPlease reason step by step, and put your final answer within "
                             "\\boxed{{}}.")
    teacher_template: str = (
        "Problem: {problem}\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin ===\n"
        "{solution}\n=== Reference Solution End ===\n\n\nAfter reading the reference solution above, make sure you "
        "truly understand the reasoning behind each step — do not copy or paraphrase it. Now, using your own words "
        "and independent reasoning, derive the same final answer to the problem above. Think step by step, explore "
        "different approaches, and don't be afraid to backtrack or reconsider if something doesn't work out:\n\n"
        "Please reason step by step, and put your final answer within \\boxed{{}}.")
    student_thinking: bool = False
    teacher_thinking: bool = True


@dataclass
class TrainerConfig:
    max_steps: int = 100
    global_batch_size: int = 32
    micro_batch_size: int = 1
    seed: int = 42
    output_dir: str = "runs/opsd"
    save_rollouts: bool = False  # write every rollout (ids and text) to OUT/rollouts/step_N_dpR.jsonl
    # CPU ranks started by opsd-train itself: intra-op threads per rank. None: the machine's cores
    # shared out; a fixed number makes float reductions — and so sampled runs — the same on
    # machines with different core counts (the CPU demo sets 2).
    threads_per_rank: Optional[int] = None

    def __post_init__(self):
        for key in ("max_steps", "global_batch_size", "micro_batch_size"):
            _at_least(f"trainer.{key}", getattr(self, key), 1)
        if self.threads_per_rank is not None:
            _at_least("trainer.threads_per_rank", self.threads_per_rank, 1)


@dataclass
class CheckpointConfig:
    save_interval: int = 50
    keep_last: int = 2
    # true: resume the newest verified checkpoint if the run's config matches (train/resume.py);
    # false: start fresh (an earlier run's files move to OUT/previous/); force: resume regardless.
    resume: Any = True

    def __post_init__(self):
        if isinstance(self.resume, str) and self.resume.lower() in ("true", "false"):
            self.resume = self.resume.lower() == "true"
        if not (isinstance(self.resume, bool) or self.resume == "force"):
            raise ConfigError(f"checkpoint.resume must be true|false|force, got {self.resume!r}")
        _at_least("checkpoint.save_interval", self.save_interval, 1)
        _at_least("checkpoint.keep_last", self.keep_last, 1)


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "opsd-megatron"
    progress_bar: bool = True


@dataclass
class OPSDConfig:
    algorithm: str = "opsd"  # opsd | sft | grpo
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    lora: Optional[LoRAConfig] = field(default_factory=LoRAConfig)  # null: full-parameter training
    teacher: TeacherUpdateConfig = field(default_factory=TeacherUpdateConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if self.algorithm not in ("opsd", "sft", "grpo"):
            raise ConfigError(f"algorithm must be opsd|sft|grpo, got {self.algorithm!r}")
        if self.lora is None and self.teacher.model.kind == "lora_base":
            raise ConfigError("lora is null (full-parameter training): set teacher.model.kind=frozen_copy")


def _valid_keys(node, prefix="") -> list[str]:
    keys = []
    for k in node.keys() if OmegaConf.is_dict(node) else []:
        path = f"{prefix}{k}"
        keys.append(path)
        child = node._get_node(k)
        if OmegaConf.is_dict(child) and not child._is_none():
            keys.extend(_valid_keys(child, path + "."))
    return keys


def _declared_type(key: str) -> str:
    """The annotation of a dotted key in the dataclass tree, e.g. 'int' for trainer.max_steps."""
    cls = OPSDConfig
    for part in key.split("."):
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return "the declared type"
        cls = hints[part]
        args = [a for a in typing.get_args(cls) if a is not type(None)]
        if args and not dataclasses.is_dataclass(cls):
            cls = args[0] if len(args) == 1 else cls
    return getattr(cls, "__name__", str(cls))


def _explain(err: OmegaConfBaseException, schema, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if isinstance(err, ConfigKeyError) or "not in" in str(err):
        close = difflib.get_close_matches(key, _valid_keys(schema), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{origin}: unknown config key '{key}'{hint}")
    if isinstance(err, ValidationError):
        return ConfigError(f"{origin}: bad value for '{key}' (expected {_declared_type(key)}): "
                           f"{err.msg.splitlines()[0]}")
    return ConfigError(f"{origin}: {err}")


def _recipe_chain(recipe: str | Path | None, seen: tuple = ()) -> list[tuple[Path, dict]]:
    """The recipe and, first, the recipes it names in ``defaults_from`` (relative to itself)."""
    if recipe is None:
        return []
    path = Path(recipe)
    if path.resolve() in seen:
        raise ConfigError(f"{path}: defaults_from cycle")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: recipe file not found") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping")
    base = data.pop("defaults_from", None)
    chain = _recipe_chain(path.parent / base, seen + (path.resolve(),)) if base else []
    return chain + [(path, data)]


def _line_of(path: Path, key: str) -> int | None:
    """1-based line where the dotted ``key`` is set in a YAML file, if it is."""
    try:
        node = yaml.compose(path.read_text())
    except yaml.YAMLError:
        return None
    line = None
    for part in key.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        hit = next(((k, v) for k, v in node.value if k.value == part), None)
        if hit is None:
            return None
        line, node = hit[0].start_mark.line + 1, hit[1]
    return line


def _origin(chain: list[tuple[Path, dict]], overrides: list[str], key: str) -> str | None:
    """Where ``key`` got its value: the last override setting it, else ``recipe:line``."""
    for item in reversed(overrides):
        if item.split("=", 1)[0].strip() == key:
            return f"override '{item}'"
    for path, _ in reversed(chain):
        line = _line_of(path, key)
        if line is not None:
            return f"{path}:{line}"
    return None


KEY_IN_MESSAGE = re.compile(r"\b([a-z_]+(?:\.[a-z_0-9]+)+)\b")


def _located(err: Exception, chain, overrides) -> ConfigError:
    """A validation error prefixed with where its key was set (``recipe.yaml:12: trainer...``)."""
    match = KEY_IN_MESSAGE.search(str(err))
    where = _origin(chain, overrides, match.group(1)) if match else None
    return ConfigError(f"{where}: {err}" if where else str(err))


def load_config(recipe: str | Path | None = None, overrides: list[str] | None = None) -> OPSDConfig:
    """Recipe YAML (safe_load) merged over the defaults, then ``key=value`` overrides; validated.
    Errors name where the offending key was set: ``recipe.yaml:LINE`` or the override."""
    schema = OmegaConf.structured(OPSDConfig)
    cfg = schema
    chain = _recipe_chain(recipe)
    overrides = list(overrides or [])
    for path, data in chain:
        try:
            cfg = OmegaConf.merge(cfg, data)
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or ""
            line = _line_of(path, key) if key else None
            raise _explain(err, schema, f"{path}:{line}" if line else str(path)) from err
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must be key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _explain(err, schema, f"override '{item}'") from err
    try:
        result = OmegaConf.to_object(cfg)
    except (ValueError, TypeError) as err:
        raise _located(err, chain, overrides) from err
    except OmegaConfBaseException as err:
        raise _explain(err, schema, str(recipe or "config")) from err
    if not result.model.sources():
        raise ConfigError(f"{recipe or 'config'}: set one of model.hf_dir, model.megatron_dir, model.architecture")
    return result


def to_yaml(cfg: OPSDConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: OPSDConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


@dataclass(frozen=True)
class Layout:
    world_size: int
    tp: int
    pp: int
    dp: int
    grad_accumulation: int

    def describe(self) -> str:
        return (f"world {self.world_size} = TP {self.tp} x PP {self.pp} x DP {self.dp}; "
                f"{self.grad_accumulation} micro-batch(es) per DP rank per step")


def validate_layout(cfg: OPSDConfig, world_size: int | None = None, arch=None) -> Layout:
    """Check the parallel layout against the world size, the model and the batch before building."""
    p, t = cfg.parallel, cfg.trainer
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    if world_size is None:
        world_size = tp * pp * (p.data_parallel_size or 1)
    if world_size % (tp * pp):
        raise ConfigError(f"world size {world_size} is not divisible by tensor_model_parallel_size*"
                          f"pipeline_model_parallel_size = {tp}*{pp}")
    dp = world_size // (tp * pp)
    if p.data_parallel_size is not None and p.data_parallel_size != dp:
        raise ConfigError(f"parallel.data_parallel_size={p.data_parallel_size} but world size {world_size} "
                          f"= {tp}*{pp}*{dp}")
    arch = arch or cfg.model.arch()
    try:
        arch.check_layout(tp, pp)
    except ValueError as err:
        raise ConfigError(f"parallel: {err}") from err
    per_step = t.micro_batch_size * dp
    if t.global_batch_size % per_step:
        raise ConfigError(f"trainer.global_batch_size={t.global_batch_size} is not divisible by "
                          f"trainer.micro_batch_size*dp = {t.micro_batch_size}*{dp}")
    repeats = {"grpo": cfg.grpo.group_size, "opsd": cfg.rollout.num_rollouts}.get(cfg.algorithm, 1)
    if t.global_batch_size % (repeats * dp):
        raise ConfigError(f"trainer.global_batch_size={t.global_batch_size} must be divisible by the rollouts "
                          f"per problem ({repeats}) x dp ({dp}), so no problem's rollouts straddle DP ranks")
    if cfg.lora is not None and cfg.lora.rank % tp:
        raise ConfigError(f"lora.rank={cfg.lora.rank} is not divisible by tensor_model_parallel_size={tp}")
    return Layout(world_size, tp, pp, dp, t.global_batch_size // per_step)
