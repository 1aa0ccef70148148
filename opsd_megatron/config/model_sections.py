"""Config sections of the model and its training: weights and architecture, parallel layout,
LoRA, the teacher, the optimizer. Each validates itself in ``__post_init__``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from opsd_megatron.config.base import ConfigError

LORA_TARGETS = {  # HF projection -> the megatron linear that holds it
    "q": "linear_qkv",
    "k": "linear_qkv",
    "v": "linear_qkv",
    "o": "linear_proj",
    "gate": "linear_fc1",
    "up": "linear_fc1",
    "down": "linear_fc2",
}


@dataclass
class ModelConfig:
    hf_dir: Optional[str] = None  # HF checkpoint to start from (config.json + safetensors)
    megatron_dir: Optional[str] = None  # or a converted megatron checkpoint
    # An HF config dict. Alone: a randomly initialised model (tiny recipes, tests). Beside hf_dir /
    # megatron_dir: lets a recipe validate its layout before the weights exist (checked against
    # them).
    architecture: Optional[dict] = None
    recompute: bool = False  # full activation recompute of every layer (keeps only layer inputs)
    tokenizer: str = "builtin:arith"  # a tokenizer directory, or the project's local one
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # seed of the random initialisation (model.architecture alone) and of megatron's RNG streams
    init_seed: int = 1234
    init_std: float = 0.02  # random init only (model.architecture alone)

    def sources(self) -> list:
        return [s for s in (self.hf_dir, self.megatron_dir, self.architecture) if s]

    def __post_init__(self):
        if self.hf_dir and self.megatron_dir:
            raise ConfigError("model: set only one of model.hf_dir, model.megatron_dir")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ConfigError(
                f"model.dtype must be auto|float32|bfloat16|float16, got {self.dtype!r}"
            )


@dataclass
class ParallelConfig:
    # TP: each rank holds 1/TP of every layer and V/TP of the logits
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1  # PP: the layers split into this many stages
    data_parallel_size: Optional[int] = None  # None: whatever the launch's world size leaves
    sequence_parallel: bool = (
        False  # with TP > 1: activations outside the TP regions split along the sequence
    )

    def __post_init__(self):
        if self.tensor_model_parallel_size < 1 or self.pipeline_model_parallel_size < 1:
            raise ConfigError("parallel: tensor/pipeline_model_parallel_size must be >= 1")


@dataclass
class LoRAConfig:
    rank: int = 64  # r of the A/B pair on every target linear (paper: 64; divisible by TP)
    alpha: float = 128.0  # the adapter's output is scaled by alpha / rank (paper: 128)
    dropout: float = 0.0  # dropout on the adapter's input (0: off)
    # Megatron fuses q,k,v into linear_qkv and gate,up into linear_fc1, so naming any member adapts
    # the fused linear (as NeMo and Megatron-Bridge do).
    target_modules: list[str] = field(
        default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"]
    )

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.target_modules) - set(LORA_TARGETS))
        if unknown:
            raise ConfigError(
                f"lora.target_modules has unknown entries {unknown} (valid: {sorted(LORA_TARGETS)})"
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def linear_names(self) -> set[str]:
        return {LORA_TARGETS[t] for t in self.target_modules}


@dataclass
class TeacherConfig:
    """Who scores the student's tokens (``models/teacher.py``).

    ``weights``, where the teacher's weights live: ``lora_base`` (the student with its adapters
    switched off, no second copy) or ``frozen_copy`` (a separate copy, for full-parameter
    training; ``offload`` keeps it in host memory between teacher passes). ``update``, what they
    track: ``fixed`` (the initial policy, the paper's), ``ema`` (w_T <- r*w_T + (1-r)*w_S after
    each step, r = ``ema_rate``) or ``current`` (the live student, through the teacher prompt).
    """

    update: str = "fixed"  # fixed | ema | current: what the teacher's weights track (class doc)
    ema_rate: float = 0.99  # update=ema: w_T <- r*w_T + (1-r)*w_S after each step
    # lora_base (adapters off, no copy) | frozen_copy (full-parameter training)
    weights: str = "lora_base"
    offload: bool = False  # frozen_copy: keep the copy in host memory between teacher passes
    # the teacher's privileged context: the reference solution, or (reference-free) another
    # correct rollout of the same problem (algorithms/peer.py; needs rollout.num_rollouts >= 2)
    context: str = "reference"  # reference | peer_success | peer_success_or_reference

    def __post_init__(self):
        if self.context not in ("reference", "peer_success", "peer_success_or_reference"):
            raise ConfigError(
                "teacher.context must be reference|peer_success|peer_success_or_reference, got "
                f"{self.context!r}"
            )
        if self.update not in ("fixed", "ema", "current"):
            raise ConfigError(f"teacher.update must be fixed|ema|current, got {self.update!r}")
        if self.weights not in ("lora_base", "frozen_copy"):
            raise ConfigError(
                f"teacher.weights must be lora_base|frozen_copy, got {self.weights!r}"
            )
        if not 0.0 < self.ema_rate < 1.0:
            raise ConfigError(f"teacher.ema_rate must be in (0, 1), got {self.ema_rate}")


@dataclass
class OptimizerConfig:
    lr: float = 2e-5  # peak learning rate of AdamW (paper: 2e-5)
    min_lr: float = 0.0  # the floor the schedule decays to
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    betas: list = field(default_factory=lambda: [0.9, 0.999])  # AdamW's (beta1, beta2)
    eps: float = 1e-8  # AdamW's epsilon
    # clip the global gradient norm to this (0: off); a non-finite norm skips the step
    grad_clip: float = 1.0
    warmup_ratio: float = 0.1  # linear warmup over this fraction of the schedule's horizon
    schedule: str = "cosine"  # cosine | constant
    # the schedule's horizon in steps (Megatron's --lr-decay-iters); None: trainer.max_steps
    decay_steps: Optional[int] = None
    # megatron's distributed optimizer: fp32 master weights and moments sharded over DP (reduce-
    # scatter of grads, all-gather of weights). None: on (at DP1 it holds what the plain one does,
    # and its checkpoints resume at any DP size); false: megatron's non-distributed optimizer.
    distributed: Optional[bool] = None
    # fp32: master weights and AdamW moments in fp32 whenever the parameters are bf16 (default);
    # bf16: step the bf16 parameters themselves (no master copy; loses small updates, for
    # comparison).
    precision: str = "fp32"
    overlap_grad_reduce: bool = (
        True  # reduce gradient buckets during the backward (GPUs: CUDA streams)
    )
    bucket_mb: Optional[int] = (
        None  # DDP gradient bucket size in MiB of fp32 grads (None: megatron's)
    )

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError(f"optimizer.lr must be > 0, got {self.lr}")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ConfigError(f"optimizer.decay_steps must be >= 1 or null, got {self.decay_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"optimizer.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.schedule not in ("cosine", "constant"):
            raise ConfigError(f"optimizer.schedule must be cosine|constant, got {self.schedule!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"optimizer.min_lr must be in [0, optimizer.lr], got {self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError(
                f"optimizer: need eps > 0, weight_decay >= 0, grad_clip >= 0 (got eps={self.eps}, "
                f"weight_decay={self.weight_decay}, grad_clip={self.grad_clip})"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"optimizer.precision must be fp32|bf16, got {self.precision!r}")
        if self.precision == "bf16" and self.distributed:
            raise ConfigError(
                "optimizer.precision=bf16 (no fp32 master weights) needs "
                "optimizer.distributed=false: "
                "megatron's distributed optimizer always keeps fp32 master weights"
            )
        if self.bucket_mb is not None and self.bucket_mb < 1:
            raise ConfigError(f"optimizer.bucket_mb must be >= 1, got {self.bucket_mb}")

    def use_distributed(self) -> bool:
        """``distributed: null`` means on whenever there are fp32 master weights, at any DP size —
        at DP1 it holds what the non-distributed optimizer holds, and one checkpoint format then
        resumes at any DP. The trainer and the planner both ask here."""
        return self.precision == "fp32" if self.distributed is None else bool(self.distributed)
