"""Config sections of the sampling, the algorithms' losses and evaluation."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from opsd_megatron.config.base import ConfigError


def check_answer_format(fmt: str) -> None:
    """``eval.answer_format``: boxed | last_number | gsm8k | regex:<pattern> (at most one group)."""
    if fmt in ("boxed", "last_number", "gsm8k"):
        return
    if not fmt.startswith("regex:"):
        raise ConfigError(
            f"eval.answer_format must be boxed|last_number|gsm8k|regex:<pattern>, got {fmt!r}"
        )
    try:
        groups = re.compile(fmt[len("regex:") :]).groups
    except re.error as err:
        raise ConfigError(f"eval.answer_format={fmt!r}: bad regex ({err})") from None
    if groups > 1:
        raise ConfigError(f"eval.answer_format={fmt!r}: use at most one group")


@dataclass
class VLLMConfig:
    """The colocated vLLM engine (``rollout.engine=vllm``, extra ``vllm``: vLLM 0.32.0)."""

    # vLLM's whole share (weights, KV cache, activations) of the GPU memory that is free once the
    # trainer's model, teacher and optimizer are built: vLLM refuses to start unless what it is
    # given is free, so it is sized from the free memory, never from the total.
    memory_fraction: float = 0.9
    # per GPU; None: what is left of vLLM's share (profiled). On CPU, None: this rank's rollouts
    kv_cache_gb: Optional[float] = None
    # None: the longest student prompt + rollout.max_new_tokens, capped at the model's limit
    max_model_len: Optional[int] = None
    overhead_gb: float = 1.5  # vLLM's activations, CUDA graphs, sampler: what the planner adds
    lora_mode: str = (
        "merged"  # merged: LoRA merged into the streamed weights | adapter: a vLLM LoRA adapter
    )
    bucket_mb: int = 512  # refit bucket: the most extra GPU memory a weight push holds at once
    # vLLM without CUDA graphs / compilation (slower decode, less memory, faster start); None:
    # eager on CPU (compiling costs minutes on a few cores), compiled on GPU
    enforce_eager: Optional[bool] = None

    def __post_init__(self):
        if self.lora_mode not in ("merged", "adapter"):
            raise ConfigError(
                f"rollout.vllm.lora_mode must be merged|adapter, got {self.lora_mode!r}"
            )
        if not 0 < self.memory_fraction < 1 or self.bucket_mb < 1 or self.overhead_gb < 0:
            raise ConfigError(
                "rollout.vllm: need 0 < memory_fraction < 1, overhead_gb >= 0 and bucket_mb >= 1 "
                f"(got {self.memory_fraction}, {self.overhead_gb}, {self.bucket_mb})"
            )
        if self.kv_cache_gb is not None and self.kv_cache_gb <= 0:
            raise ConfigError(f"rollout.vllm.kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"rollout.vllm.max_model_len must be >= 2, got {self.max_model_len}")

    def model_len(self, longest_prompt: int, max_new_tokens: int, model_limit: int) -> int:
        """vLLM's ``max_model_len``: the configured one, else the longest prompt plus the rollout
        length, never above the model's ``max_position_embeddings`` (vLLM refuses to start)."""
        return min(self.max_model_len or longest_prompt + max_new_tokens, model_limit)

    def free_bytes_needed(self, weights_bytes: float, kv_bytes: float) -> float:
        """GPU memory that must be free once the trainer is built for vLLM to hold its weights,
        ``kv_bytes`` of KV cache and its overhead within ``memory_fraction`` of it (the planner's
        vLLM term)."""
        kv = self.kv_cache_gb * 2**30 if self.kv_cache_gb else kv_bytes
        return (weights_bytes + kv + self.overhead_gb * 2**30) / self.memory_fraction

    def engine_memory(self, free_bytes: int, total_bytes: int, reserve_bytes: int = 0) -> dict:
        """vLLM's memory arguments from the memory free now (after the trainer is built), less
        ``reserve_bytes`` the trainer will still allocate (Adam's moments appear at the first step):
        ``gpu_memory_utilization`` is a fraction of the *total* that vLLM checks is free at start,
        so it is ``memory_fraction`` of that free memory expressed over the total; an explicit KV
        cache size goes to ``kv_cache_memory_bytes`` (vLLM 0.32 then skips profiling)."""
        free = free_bytes - reserve_bytes
        if free <= 0:
            raise ConfigError(
                f"rollout.engine=vllm: {free_bytes / 2**30:.1f} GiB free once the trainer is built "
                f"and {reserve_bytes / 2**30:.1f} GiB still to come for the optimizer: nothing "
                f"left for vLLM (run opsd-plan for a layout that fits)"
            )
        out = {"gpu_memory_utilization": self.memory_fraction * free / total_bytes}
        if self.kv_cache_gb:
            out["kv_cache_memory_bytes"] = int(self.kv_cache_gb * 2**30)
        return out


@dataclass
class RolloutConfig:
    engine: str = "megatron"  # megatron | vllm
    num_rollouts: int = 1  # OPSD: samples per problem (paper: 1; peer contexts need >= 2)
    # the rollout's token limit (paper: 2048); a response cut here counts as truncated
    max_new_tokens: int = 2048
    temperature: float = 1.2  # 0: greedy decoding
    top_p: float = 1.0  # nucleus sampling of the rollouts (1: off)
    top_k: int = 0  # 0: off
    # root of every rollout request's seed (same on every TP/PP rank and after a resume)
    seed: int = 0
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    @property
    def logprob_temperature(self) -> float:
        """The temperature of the sampler's (and the trainer's) log-probs: greedy reports T=1."""
        return self.temperature or 1.0

    @property
    def logprob_distribution(self) -> dict:
        """What the rollout log-probs are log-probs of, as keyword arguments of
        ``vocab_parallel_token_logprobs``: the sampling distribution — temperature, then top-k,
        then top-p, renormalised (vLLM's processed log-probs); greedy: the full one at T=1."""
        greedy = self.temperature == 0
        return dict(
            temperature=self.logprob_temperature,
            top_k=0 if greedy else self.top_k,
            top_p=1.0 if greedy else self.top_p,
        )

    def __post_init__(self):
        if self.engine not in ("megatron", "vllm"):
            raise ConfigError(f"rollout.engine must be megatron|vllm, got {self.engine!r}")
        if self.temperature < 0:
            raise ConfigError(
                f"rollout.temperature must be >= 0 (0: greedy), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= 4096:
            raise ConfigError(f"rollout.top_k must be in [0, 4096] (0: off), got {self.top_k}")
        if self.max_new_tokens < 1 or self.num_rollouts < 1:
            raise ConfigError(
                f"rollout: need max_new_tokens >= 1 and num_rollouts >= 1, got "
                f"{self.max_new_tokens} and {self.num_rollouts}"
            )


@dataclass
class LossConfig:
    kind: str = "jsd"  # jsd | sampled_token
    # JSD_beta's mixture weight: 0 forward KL(p_T||p_S), 1 reverse KL(p_S||p_T) (paper: 0.5)
    beta: float = 0.5
    temperature: float = 1.0  # both distributions are softmax(logits / temperature) in the loss
    # clip each vocabulary entry's divergence term at this value (OPSD code's jsd_token_clip; null:
    # off)
    term_clip: Optional[float] = None
    # clip each response token's summed divergence at this value; clipped tokens pass no gradient
    # (the per-token reading of jsd_token_clip some reproductions use; term_clip can push the
    # student away from its teacher, docs/losses.md; null: off)
    token_clip: Optional[float] = None
    reduction: str = "sequence_mean"  # sequence_mean (paper eq. 6/8) | token_mean
    # JSD over the teacher's global top-K tokens only (0: the full vocabulary): `tail` adds one
    # bucket with the rest of each distribution's mass, `renorm` renormalises the top-K (the OPSD
    # code's option); losses/topk_jsd.py
    teacher_top_k: int = 0
    # sampled_token only: reverse_kl adds sg[KL(p_S||p_T)] per token to the advantage (a control
    # variate: same expected gradient, lower variance; losses/sampled_token.py)
    baseline: str = "none"  # none | reverse_kl
    # λ: adds λ·KL(p_S || p_ref) per response token, p_ref the initial policy (the fixed teacher's
    # weights) reading the student's own prompt, one extra forward-only pass (StableOPD)
    ref_kl_coef: float = 0.0
    # teacher_entropy: tokens where the teacher's entropy (at the loss temperature, nats) exceeds
    # entropy_threshold get weight low_confidence_weight (our own simple option; the mean's
    # denominator is unchanged)
    token_weight: str = "none"  # none | teacher_entropy
    # token_weight=teacher_entropy: the teacher entropy (nats) above which a token is down-weighted
    entropy_threshold: float = 1.0
    low_confidence_weight: float = 0.0  # token_weight=teacher_entropy: the weight of those tokens
    top_k_mode: str = "tail"  # tail | renorm
    # true: the last stage stops at the final norm and the loss projects hidden states through
    # the output layer's vocab shard one token chunk at a time (losses/linear_jsd.py); the teacher
    # pass keeps [R, H] hidden states per sequence instead of [R, V/tp] logits. false: logits.
    fused: bool = False
    chunk_tokens: Optional[int] = None  # fused: tokens per chunk (null: ~2^24 fp32 elements on GPU)
    # the JSD's per-chunk elementwise work through torch.compile (losses/compiled.py): true, false
    # (eager: the reference), auto (compiled on CUDA, eager on CPU where compiling costs more
    # than it saves in a short run; a compiler failure falls back to eager with a warning)
    compile: str = "false"

    def __post_init__(self):
        if str(self.compile).lower() not in ("auto", "true", "false"):
            raise ConfigError(f"loss.compile must be auto|true|false, got {self.compile!r}")
        self.compile = str(self.compile).lower()  # YAML reads true/false as booleans
        if self.fused and self.teacher_top_k:
            raise ConfigError("loss.teacher_top_k needs loss.fused=false (its top-K reads logits)")
        if self.chunk_tokens is not None and self.chunk_tokens < 1:
            raise ConfigError(f"loss.chunk_tokens must be >= 1 or null, got {self.chunk_tokens}")
        if self.temperature <= 0:
            raise ConfigError(f"loss.temperature must be > 0, got {self.temperature}")
        if self.term_clip is not None and self.term_clip <= 0:
            raise ConfigError(f"loss.term_clip must be > 0 or null, got {self.term_clip}")
        if self.token_clip is not None and (self.token_clip <= 0 or self.kind != "jsd"):
            raise ConfigError(
                f"loss.token_clip must be > 0 (or null) and needs loss.kind=jsd, got "
                f"{self.token_clip} with kind {self.kind!r}"
            )
        if self.kind not in ("jsd", "sampled_token"):
            raise ConfigError(f"loss.kind must be jsd|sampled_token, got {self.kind!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"loss.beta must be in [0, 1], got {self.beta}")
        if not 0 <= self.teacher_top_k <= 4096:
            raise ConfigError(f"loss.teacher_top_k must be in [0, 4096], got {self.teacher_top_k}")
        if self.top_k_mode not in ("tail", "renorm"):
            raise ConfigError(f"loss.top_k_mode must be tail|renorm, got {self.top_k_mode!r}")
        if self.token_weight not in ("none", "teacher_entropy"):
            raise ConfigError(
                f"loss.token_weight must be none|teacher_entropy, got {self.token_weight!r}"
            )
        if self.entropy_threshold < 0 or self.low_confidence_weight < 0:
            raise ConfigError(
                "loss.entropy_threshold and loss.low_confidence_weight must be >= 0, got "
                f"{self.entropy_threshold}, {self.low_confidence_weight}"
            )
        if self.ref_kl_coef < 0:
            raise ConfigError(f"loss.ref_kl_coef must be >= 0, got {self.ref_kl_coef}")
        if self.baseline not in ("none", "reverse_kl"):
            raise ConfigError(f"loss.baseline must be none|reverse_kl, got {self.baseline!r}")
        if self.baseline != "none" and self.kind != "sampled_token":
            raise ConfigError("loss.baseline applies to loss.kind=sampled_token only")
        if self.teacher_top_k and self.kind != "jsd":
            raise ConfigError("loss.teacher_top_k applies to loss.kind=jsd only")
        if self.reduction not in ("sequence_mean", "token_mean"):
            raise ConfigError(
                f"loss.reduction must be sequence_mean|token_mean, got {self.reduction!r}"
            )


@dataclass
class GRPOConfig:
    group_size: int = 8  # rollouts per problem; advantages are normalised within the group
    clip_eps: float = 0.2  # PPO-style ratio clip: [1 - eps, 1 + eps]
    kl_coef: float = 0.0  # weight of the k3 KL to the initial policy (0: off)

    def __post_init__(self):
        if self.group_size < 2 or not 0 < self.clip_eps < 1 or self.kl_coef < 0:
            raise ConfigError("grpo: need group_size >= 2, 0 < clip_eps < 1, kl_coef >= 0")


@dataclass
class SFTConfig:
    # Fraction of examples whose prompt is the teacher prompt (problem + reference), e.g. to build a
    # base that can use a reference but only partly solves problems alone.
    teacher_prompt_fraction: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.teacher_prompt_fraction <= 1.0:
            raise ConfigError("sft.teacher_prompt_fraction must be in [0, 1]")


@dataclass
class EvalConfig:
    """Paper Table 5: thinking on, top-p 0.95, no top-k, 16 samples, T=1.2 (token budget per
    recipe)."""

    benchmarks: list = field(
        default_factory=list
    )  # JSONL paths (id, problem, answer), HF names, synthetic:arith
    split: str = "test"  # HF dataset split of a named benchmark
    problem_field: str = "problem"  # the problem's field in a benchmark file
    answer_field: str = "answer"  # the reference answer's field
    solution_field: str = "solution"  # the reference solution's field (eval.with_reference)
    with_reference: bool = (
        False  # opsd-eval: prompt with the teacher template (problem + reference solution)
    )
    teacher_too: bool = (
        False  # periodic eval also scores the model with the reference (logged as eval_teacher/*)
    )
    max_problems: Optional[int] = None  # the first N problems of each benchmark (null: all)
    # how the prediction is read from a sample (also GRPO's reward): boxed | last_number | gsm8k |
    # regex:<pattern> (data/grading.py); models that never write \boxed{} need another
    answer_format: str = "boxed"
    n_samples: int = 16  # samples per problem (paper: 16)
    ks: list = field(default_factory=lambda: [1, 4, 8, 16])  # the k of pass@k reported
    temperature: float = 1.2  # 0: greedy decoding
    top_p: float = 0.95  # nucleus sampling (paper: 0.95)
    top_k: int = 0  # top-k sampling (0: off)
    max_new_tokens: int = 38912  # token limit per sample (paper: 38912)
    thinking: bool = True  # the chat template's thinking mode for evaluation prompts
    batch_size: int = 16  # problems generated together
    # seconds a grader call may take before the sample counts as ungraded
    grade_timeout: float = 10.0
    interval: int = 0  # evaluate every N training steps (0: off)
    seed: int = 1234  # the sampling seed of evaluation
    save_outputs: bool = (
        False  # every sample (prompt, text, extracted, verdict) to eval/<tag>.jsonl
    )

    def __post_init__(self):
        if self.n_samples < 1 or any(k < 1 for k in self.ks) or self.batch_size < 1:
            raise ConfigError(
                "eval: need n_samples >= 1, ks >= 1, batch_size >= 1 (got "
                f"n_samples={self.n_samples}, "
                f"ks={self.ks}, batch_size={self.batch_size})"
            )
        if (
            self.interval < 0
            or self.max_new_tokens < 1
            or self.temperature < 0
            or not 0 < self.top_p <= 1
        ):
            raise ConfigError(
                f"eval: need interval >= 0, max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1 "
                f"(got {self.interval}, {self.max_new_tokens}, {self.temperature}, {self.top_p})"
            )
        check_answer_format(self.answer_format)
