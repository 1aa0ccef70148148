"""Config sections of a run around the model: data and prompts, the trainer, checkpoints,
logging."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from opsd_megatron.config.base import ConfigError, at_least

SOLUTION_TEACHER_TEMPLATE = (
    "Problem: {problem}\n\nHere is a reference solution to this problem:\n=== Reference Solution "
    "Begin ===\n{solution}\n=== Reference Solution End ===\n\n\nAfter reading the reference "
    "solution above, make sure you truly understand the reasoning behind each step — do not copy "
    "or paraphrase it. Now, using your own words and independent reasoning, derive the same final "
    "answer to the problem above. Think step by step, explore different approaches, and don't be "
    "afraid to backtrack or reconsider if something doesn't work out:\n\nPlease reason step by "
    "step, and put your final answer within \\boxed{{}}."
)
ANSWER_TEACHER_TEMPLATE = (
    "Problem: {problem}\n\nThe final answer to this problem is: {answer}\n\n"
    "Now, using your own reasoning, derive this answer to the problem above. Think step by step, "
    "explore different approaches, and don't be afraid to backtrack or reconsider if something "
    "doesn't work out:\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
)
TEACHER_CONTEXTS = ("solution", "answer", "custom")


@dataclass
class DataConfig:
    source: str = "synthetic:arith"  # synthetic:arith | jsonl/parquet path(s) | an HF dataset name
    split: str = "train"  # HF dataset split (data.source is a Hub name)
    # Leave out the source's first N rows: the problems held out for evaluation when the same
    # file is the benchmark (eval.max_problems=N reads exactly those).
    skip_first: int = 0
    problem_field: str = "problem"  # the problem's field in the data
    solution_field: str = "solution"  # the reference solution's field
    max_problem_tokens: int = 1024  # problems longer than this (tokens) are dropped
    # problems whose solution is longer than this (tokens) are dropped
    max_solution_tokens: int = 4096
    deduplicate: bool = True  # drop repeated problems
    shuffle_seed: int = 0  # the order problems are drawn in
    skip_malformed: bool = False  # skip bad rows (else: an error naming the file and row)
    num_synthetic: int = 2000  # problems of synthetic:arith
    # the student's prompt ({problem})
    student_template: str = (
        "Problem: {problem}\n\nPlease reason step by step, and put your final answer within "
        "\\boxed{{}}."
    )
    # The teacher's prompt. ``solution`` (the paper's): problem + the full reference solution;
    # ``answer``: problem + only its final answer (less context: Kim et al. 2026, arXiv 2603.24472,
    # find a richly conditioned teacher suppresses the student's expressions of uncertainty);
    # ``custom``: data.teacher_template as written ({problem}, {solution}, {answer} available).
    teacher_context: str = "solution"
    # the teacher's prompt ({problem}, {solution}, {answer})
    teacher_template: str = SOLUTION_TEACHER_TEMPLATE
    student_thinking: bool = False  # the chat template's thinking mode in the student's prompt
    teacher_thinking: bool = True  # the chat template's thinking mode in the teacher's prompt

    def __post_init__(self):
        if self.skip_first < 0:
            raise ConfigError(f"data.skip_first must be >= 0, got {self.skip_first}")
        if self.teacher_context not in TEACHER_CONTEXTS:
            raise ConfigError(
                f"data.teacher_context must be solution|answer|custom, got {self.teacher_context!r}"
            )
        if self.teacher_context == "answer":
            if self.teacher_template not in (SOLUTION_TEACHER_TEMPLATE, ANSWER_TEACHER_TEMPLATE):
                raise ConfigError(
                    "data.teacher_context=answer brings its own template: set "
                    "data.teacher_context=custom to use data.teacher_template instead"
                )
            self.teacher_template = ANSWER_TEACHER_TEMPLATE
        if "{problem}" not in self.teacher_template:
            raise ConfigError("data.teacher_template must contain {problem}")

    @property
    def teacher_uses_answer(self) -> bool:
        return "{answer}" in self.teacher_template


@dataclass
class TrainerConfig:
    max_steps: int = 100  # optimizer steps of the run
    global_batch_size: int = 32  # sequences per step over all DP ranks (paper: 32)
    micro_batch_size: int = 1  # sequences per micro-batch of the student pass
    # Micro-batches by token budget (verl's use_dynamic_bsz, NeMo-RL's dynamic batching): the
    # step's sequences, longest first, grouped so that rows x the group's longest sequence stays
    # within this many tokens, each group padded only to its own longest row (micro_batch_size
    # then does not apply to the student and teacher passes). None: micro_batch_size rows each,
    # all padded to the step's longest sequence. Gradients are the same either way.
    micro_batch_tokens: Optional[int] = None
    seed: int = 42  # the trainer's seed
    output_dir: str = "runs/opsd"  # where checkpoints, metrics, config.yaml and evaluations go
    save_rollouts: bool = (
        False  # write every rollout (ids and text) to OUT/rollouts/step_N_dpR.jsonl
    )
    # CPU ranks started by opsd-train itself: intra-op threads per rank. None: the machine's cores
    # shared out; a fixed number makes float reductions — and so sampled runs — the same on
    # machines with different core counts (the CPU demo sets 2).
    threads_per_rank: Optional[int] = None

    def __post_init__(self):
        for key in ("max_steps", "global_batch_size", "micro_batch_size"):
            at_least(f"trainer.{key}", getattr(self, key), 1)
        if self.threads_per_rank is not None:
            at_least("trainer.threads_per_rank", self.threads_per_rank, 1)
        if self.micro_batch_tokens is not None:
            at_least("trainer.micro_batch_tokens", self.micro_batch_tokens, 2)


@dataclass
class CheckpointConfig:
    save_interval: int = 50  # checkpoint every N steps (and at the last step, and on preemption)
    keep_last: int = 2  # checkpoints kept (older ones are deleted once a newer one is complete)
    # true: resume the newest verified checkpoint if the run's config matches (train/resume.py);
    # false: start fresh (an earlier run's files move to OUT/previous/); force: resume regardless.
    resume: Any = True

    def __post_init__(self):
        if isinstance(self.resume, str) and self.resume.lower() in ("true", "false"):
            self.resume = self.resume.lower() == "true"
        if not (isinstance(self.resume, bool) or self.resume == "force"):
            raise ConfigError(f"checkpoint.resume must be true|false|force, got {self.resume!r}")
        at_least("checkpoint.save_interval", self.save_interval, 1)
        at_least("checkpoint.keep_last", self.keep_last, 1)


DEFAULT_MARKERS = ("wait", "hmm", "perhaps", "maybe", "let me check", "alternatively", "actually")


@dataclass
class LoggingConfig:
    # the name the run's console lines carry, [name] (null: the algorithm's, opsd | sft | grpo;
    # opsd-demo names each stage)
    name: Optional[str] = None
    tensorboard: bool = True  # TensorBoard event files in OUT/tensorboard
    wandb: bool = False  # log to Weights & Biases too
    wandb_project: str = "opsd-megatron"  # the W&B project
    progress_bar: bool = True  # a progress bar with the loss on rank 0
    phase_times: bool = False  # ... and each step's time/<phase> seconds and ms per sampled token
    # counted per 1,000 response tokens in training rollouts and evaluation outputs (marker_rate):
    # expressions of uncertainty a rich-context teacher is known to suppress (arXiv 2603.24472)
    uncertainty_markers: list = field(default_factory=lambda: list(DEFAULT_MARKERS))

    def __post_init__(self):
        bad = [m for m in self.uncertainty_markers if not isinstance(m, str) or not m.strip()]
        if bad:
            raise ConfigError(
                f"logging.uncertainty_markers must be non-empty strings, got {bad[0]!r}"
            )
