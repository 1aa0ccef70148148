"""Per-GPU memory plan for a recipe and layout: what the trainer will hold, term by term.

Weights, gradients and optimizer states are exact counts of this trainer's tensors (megatron's vocab
padding, TP/PP sharding, our LoRA sharding). Gradients live in megatron DDP's fp32 main-grad buffer
(``grad_bytes``, 4 with fp32 master weights); megatron's optimizer keeps, per trainable parameter,
two fp32 AdamW moments plus an fp32 master copy when the parameters are 16-bit, all divided by DP
with ``distributed_optimizer`` (``master_fp32=False`` is the no-master-copy
``optimizer.precision=bf16`` mode: moments in the parameter dtype). Activations are the tensors each
layer saves for its backward, counted per implementation (``activation_bytes_per_layer``): ``te``
(GPU: transformer-engine norms, flash attention) or ``local`` (megatron-core's local spec, what runs
on CPU: fp32 torch norms, unfused attention with an fp32 softmax); full recompute keeps only each
layer's input. The ``local`` count is checked against the bytes megatron really saves
(tests/test_planner.py); ``te`` is the same accounting for TE's kernels, not yet measured on a GPU.
The loss terms are what the step keeps: teacher logits of the response rows for all micro-batches of
a rank (and the initial policy's with the ref-KL term), the student's logits and their response
rows, the gradient of those rows, and the loss's chunked fp32 working set; with ``loss.fused`` the
same terms hold hidden states (``teacher_hidden``, ``student_hidden``: H wide instead of V/tp) and
the working set stays bounded by the chunk. vLLM's share is its weight copy plus a KV cache for the
rank's rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass

from opsd_megatron.config import VLLMConfig
from opsd_megatron.models.hf_config import ArchSpec

GIB = 2**30
LOSS_TEMPORARIES = 8  # fp32 chunk-sized temporaries alive at once in the vocab-parallel losses
LOSS_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class PlanInput:
    arch: ArchSpec
    tp: int
    pp: int
    dp: int
    bytes_per_param: int = 2  # bf16
    lora_rank: int | None = 64
    lora_targets: tuple = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    micro_batch_size: int = 1
    micro_batch_tokens: int | None = None  # trainer.micro_batch_tokens: the micro-batch by budget
    micro_batches_per_rank: int = 4
    student_seq_len: int = 2560  # prompt + max_new_tokens
    response_len: int = 2048
    recompute: bool = False
    sequence_parallel: bool = False
    # te: transformer-engine + flash attention (GPU) | local: megatron-core local spec (CPU)
    impl: str = "te"
    distributed_optimizer: bool = False
    master_fp32: bool = True  # optimizer.precision=fp32: fp32 master weights and moments
    frozen_teacher_copy: bool = (
        False  # full-parameter training keeps a teacher copy (unless offloaded)
    )
    fused: bool = False  # loss.fused: hidden states instead of logits (teacher kept, student)
    ref_pass: bool = False  # loss.ref_kl_coef: the initial policy's view is kept as well
    vllm: VLLMConfig | None = None  # the colocated vLLM engine's settings (None: no vLLM)
    vllm_seq_len: int = 0  # its max_model_len: each rollout's KV cache holds this many tokens
    rollouts_per_rank: int = 4


def layer_linear_shapes(arch: ArchSpec) -> dict[str, tuple[int, int]]:
    """(in, out) of each fused megatron linear in one decoder layer (unsharded)."""
    h, hd = arch.hidden_size, arch.head_dim
    q, kv = arch.num_attention_heads * hd, arch.num_query_groups * hd
    return {
        "linear_qkv": (h, q + 2 * kv),
        "linear_proj": (q, h),
        "linear_fc1": (h, 2 * arch.ffn_hidden_size),
        "linear_fc2": (arch.ffn_hidden_size, h),
    }


def layer_params_per_rank(arch: ArchSpec, tp: int) -> int:
    shapes = layer_linear_shapes(arch)
    linear = sum(i * o for i, o in shapes.values()) // tp
    bias = (shapes["linear_qkv"][1] // tp) if arch.qkv_bias else 0
    norms = 2 * arch.hidden_size + (2 * arch.head_dim if arch.qk_norm else 0)
    return linear + bias + norms


def lora_params_per_layer_rank(arch: ArchSpec, tp: int, rank: int, targets) -> int:
    """Our sharding: column base A [r/tp, in] + B [out/tp, r]; row base A [r, in/tp] + B [out/tp,
    r]."""
    total = 0
    for name, (i, o) in layer_linear_shapes(arch).items():
        if name not in targets:
            continue
        a = (rank // tp) * i if name in ("linear_qkv", "linear_fc1") else rank * (i // tp)
        total += a + (o // tp) * rank
    return total


def stage_params(p: PlanInput) -> list[int]:
    """Base parameters held by each pipeline stage's rank."""
    a = p.arch
    vocab_rows = a.padded_vocab_size(p.tp) // p.tp * a.hidden_size
    layers = a.num_layers // p.pp * layer_params_per_rank(a, p.tp)
    out = []
    for stage in range(p.pp):
        n = layers
        if stage == 0:
            n += vocab_rows
        if stage == p.pp - 1:
            n += a.hidden_size  # final norm
            if not a.tie_word_embeddings or p.pp > 1:
                # output layer (a tied copy when the embedding lives on another stage)
                n += vocab_rows
        out.append(n)
    return out


def activation_bytes_per_layer(
    a: ArchSpec,
    s: int,
    b: int,
    tp: int,
    nbytes: int,
    impl: str = "te",
    sequence_parallel: bool = False,
) -> float:
    """Bytes one transformer layer saves for backward for a micro-batch of b sequences of s tokens.

    Per TP rank: hidden-size tensors are replicated, head and MLP tensors are split by tp. Norms
    save their input (and, in the local spec, an fp32 copy, the fp32 normalised value and the
    cast output); attention saves q, k, v (GQA-expanded in the local spec) plus, unfused, the
    fp32 softmax, its cast copy and a byte mask of the scores; SwiGLU saves fc1's output and its
    two halves' products.
    """
    heads, groups, d, f = (
        a.num_attention_heads // tp,
        max(1, a.num_query_groups // tp),
        a.head_dim,
        a.ffn_hidden_size // tp,
    )
    sb, h = s * b, a.hidden_size
    q, kv = sb * heads * d, sb * groups * d
    sb_hidden = (
        sb // tp if sequence_parallel else sb
    )  # hidden-size tensors: split along the sequence
    if impl == "local":
        hidden_norms = 2 * (
            (4 + 4 + nbytes) * sb_hidden * h + 4 * sb_hidden
        )  # fp32 in, fp32 normed, cast, rstd
        qk_norms = (
            8 * (q + kv) + 4 * sb * (heads + groups)
        ) * a.qk_norm  # fp32 input and normalised, rstd
        # SDPA (layer_specs.SDPACoreAttention): q, k, v (not expanded) and a contiguous copy of
        # one of k/v (measured), its output, the log-sum-exp
        attention = nbytes * (q + 3 * kv + q) + 4 * b * heads * s
        attention += 4 * nbytes * s * d  # RoPE's cos/sin for q and k
        return (
            hidden_norms + qk_norms + attention + nbytes * q + nbytes * 5 * sb * f
        )  # + proj input, SwiGLU
    if impl != "te":
        raise ValueError(f"impl must be te|local, got {impl!r}")
    hidden_norms = 2 * (
        2 * nbytes * sb_hidden * h + 4 * sb_hidden
    )  # input + output of each fused norm, rsigma
    qk_norms = (nbytes * (q + kv) + 4 * sb * (heads + groups)) * a.qk_norm
    attention = nbytes * (q + 2 * kv + q) + 4 * b * heads * s  # flash: q, k, v, output, log-sum-exp
    return hidden_norms + qk_norms + attention + nbytes * 3 * sb * f


def plan(p: PlanInput) -> dict[str, float]:
    """Bytes per GPU on the most loaded stage, by term, plus the total."""
    a = p.arch
    per_stage = stage_params(p)
    worst = max(range(p.pp), key=lambda s: per_stage[s])
    weights = per_stage[worst] * p.bytes_per_param
    if p.lora_rank:
        trainable = (
            a.num_layers // p.pp * lora_params_per_layer_rank(a, p.tp, p.lora_rank, p.lora_targets)
        )
        weights += trainable * p.bytes_per_param
    else:
        trainable = per_stage[worst]
    grads = trainable * (4 if p.master_fp32 else p.bytes_per_param)  # DDP's main-grad buffer
    if p.master_fp32:
        per_param = 8 + (
            4 if p.bytes_per_param < 4 else 0
        )  # moments (+ master copy of 16-bit params)
    else:
        per_param = 2 * p.bytes_per_param
    optimizer = per_param * trainable / (p.dp if p.distributed_optimizer else 1)
    layers_here = a.num_layers // p.pp
    s, b, h = p.student_seq_len, p.micro_batch_size, a.hidden_size
    if p.micro_batch_tokens:  # at most the budget's tokens, in rows of at most s: its bound is
        b = p.micro_batch_tokens / s  # the budget's tokens for linear terms, budget x s for scores
    if p.recompute:
        activations = (
            layers_here * p.bytes_per_param * s * b * h // (p.tp if p.sequence_parallel else 1)
        )
    else:
        activations = layers_here * activation_bytes_per_layer(
            a, s, b, p.tp, p.bytes_per_param, p.impl, p.sequence_parallel
        )
    v_local = a.padded_vocab_size(p.tp) // p.tp
    last = worst == p.pp - 1 or p.pp == 1
    # the teacher pass keeps, per micro-batch (twice with the ref-KL pass), its response rows:
    # logits [b, R, V/tp], or with the fused loss hidden states [b, R, H]; the student's output
    # ([b, s, V/tp] logits or [b, s, h] states), its response rows and their gradient
    width = h if p.fused else v_local
    resp_rows = b * p.response_len * width
    rows = p.micro_batches_per_rank * p.micro_batch_size  # the step's rows on this rank
    kept = rows * p.response_len * width * p.bytes_per_param * (2 if p.ref_pass else 1)
    teacher_kept = kept if last else 0
    student_out = (b * s * width + 2 * resp_rows) * p.bytes_per_param if last else 0
    loss_working = (  # the chunked fp32 working set, fused or not (linear_jsd.py, jsd.py)
        LOSS_TEMPORARIES * min(LOSS_CHUNK_ELEMENTS, b * p.response_len * v_local) * 4 if last else 0
    )
    teacher_copy = per_stage[worst] * p.bytes_per_param if p.frozen_teacher_copy else 0
    vllm = 0.0
    if p.vllm is not None:  # the step's rollouts on this rank at once, at vLLM's max_model_len
        kv = a.kv_cache_bytes(p.tp, a.num_layers, p.rollouts_per_rank, p.vllm_seq_len,
                              p.bytes_per_param)  # fmt: skip
        weights_here = sum(stage_params(PlanInput(**{**p.__dict__, "pp": 1}))) * p.bytes_per_param
        vllm = p.vllm.free_bytes_needed(weights_here, kv)
    sampler_kv = 0.0
    if p.vllm is None:  # the Megatron sampler decodes this rank's rollouts at once, in the
        # parameter dtype: models/decoder.py at PP=1, megatron-core 0.16.1
        # transformer/attention.py::_allocate_memory at PP>1 (same size)
        sampler_kv = a.kv_cache_bytes(p.tp, layers_here, p.rollouts_per_rank, p.student_seq_len,
                                      p.bytes_per_param)  # fmt: skip
    terms = {
        "weights": weights,
        "gradients": grads,
        "optimizer_states": optimizer,
        "activations": activations,
        "teacher_hidden" if p.fused else "teacher_logits": teacher_kept,
        "student_hidden" if p.fused else "student_logits": student_out,
        "loss_working_set": loss_working,
        "frozen_teacher_copy": teacher_copy,
        "vllm": vllm,
        "sampler_kv_cache": sampler_kv,
    }
    terms["total"] = sum(terms.values())
    return terms


def smallest_fitting_layout(
    p: PlanInput, gpu_bytes: float, world_sizes=(8, 16, 32, 64, 128)
) -> PlanInput | None:
    """The layout with the fewest model-parallel GPUs (then the smallest world) whose plan fits."""
    a = p.arch
    options = []
    for world in world_sizes:
        for tp in (1, 2, 4, 8):
            for pp in (1, 2, 4, 8, 16):
                if (
                    world % (tp * pp)
                    or a.num_attention_heads % tp
                    or a.num_query_groups % tp
                    or a.num_layers % pp
                ):
                    continue
                cand = PlanInput(**{**p.__dict__, "tp": tp, "pp": pp, "dp": world // (tp * pp)})
                if plan(cand)["total"] <= gpu_bytes:
                    options.append((tp * pp, world, tp, cand))
    return min(options, key=lambda o: o[:3])[3] if options else None
