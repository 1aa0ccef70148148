"""Build a megatron-core GPTModel for an :class:`ArchSpec` on this rank's pipeline stage.

The model definition is megatron-core's; this module only translates the HF architecture into a
``TransformerConfig``. Where the model sits is the ``ParallelGroups`` it is built with (from
:func:`opsd_megatron.platform.initialize_model_parallel`); the model carries them
(``groups_of``), as megatron-core's own modules carry their process-group collection, so the
code that loads, saves, exports or runs it uses the groups it was built on. Logits stay
vocab-sharded (``parallel_output=True``) and padded to a multiple of 128·tp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from opsd_megatron.config import Layout
from opsd_megatron.models.hf_config import ArchSpec
from opsd_megatron.models.layer_specs import gpt_block_spec
from opsd_megatron.models.output_head import contiguous_logit_grads
from opsd_megatron.platform.parallel import ParallelGroups

_GROUPS = "opsd_parallel_groups"  # the attribute a built model carries its groups in


def groups_of(model: torch.nn.Module) -> ParallelGroups:
    """The process groups ``model`` (or the module a megatron wrapper holds) was built with."""
    m = model
    while not hasattr(m, _GROUPS) and hasattr(m, "module"):
        m = m.module
    if not hasattr(m, _GROUPS):
        raise ValueError(
            f"{type(model).__name__} was not built by build_gpt_model: its process groups are "
            f"unknown"
        )
    return getattr(m, _GROUPS)


def transformer_config(
    arch: ArchSpec,
    layout: Layout,
    params_dtype: torch.dtype = torch.float32,
    recompute: bool = False,
    initialize: bool = True,
):
    from megatron.core.transformer.transformer_config import TransformerConfig

    arch.check_layout(layout.tp, layout.pp)
    extra = {}
    if recompute:
        extra.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        pipeline_dtype=params_dtype,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        sequence_parallel=layout.sequence_parallel,
        perform_initialization=initialize,
        **extra,
    )


def build_gpt_model(
    arch: ArchSpec,
    params_dtype: torch.dtype = torch.float32,
    *,
    groups: ParallelGroups,
    recompute: bool = False,
    sequence_parallel: bool = False,
    transformer_engine: bool | None = None,
    initialize: bool = True,
):
    """This rank's stage of the model on ``groups`` (its TP/PP place), on the rank's device.

    ``initialize=False`` skips random initialisation, for weights that are loaded right after.
    ``sequence_parallel`` applies only with TP > 1 (as in Megatron-LM); inputs must then be padded
    to a multiple of TP (``forward.pad_for_sequence_parallel``).
    """
    from megatron.core.models.gpt import GPTModel

    layout = groups.layout(sequence_parallel=sequence_parallel)
    config = transformer_config(arch, layout, params_dtype, recompute, initialize)
    model = GPTModel(
        config,
        gpt_block_spec(arch, config, transformer_engine),
        vocab_size=arch.padded_vocab_size(layout.tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=groups.is_first_stage,
        post_process=groups.is_last_stage,
        parallel_output=True,
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_theta),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )
    setattr(model, _GROUPS, groups)
    mark_tensor_parallel_params(model)
    contiguous_logit_grads(model)
    if not any(p.is_meta for p in model.parameters()):
        # the rank's one device (on CPU the same tensors: no copy; under the device audit this is
        # what marks megatron's CPU-initialised parameters as the rank's, as on a GPU)
        model.to(groups.device)
    return model


def stage_layer_offset(arch: ArchSpec, groups: ParallelGroups) -> int:
    """Global index of this pipeline stage's first decoder layer."""
    per_stage = arch.num_layers // groups.pp_size
    return groups.pp_rank * per_stage


def mark_tensor_parallel_params(module: torch.nn.Module) -> None:
    """Set megatron's ``tensor_model_parallel`` attributes on sharded weights.

    megatron-core sets them only while initialising; a model built with ``initialize=False`` (its
    weights are loaded right after) would otherwise look TP-duplicated to norm and clipping code.
    """
    from megatron.core.tensor_parallel import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
    )
    from megatron.core.tensor_parallel.layers import (
        set_tensor_model_parallel_attributes,
    )

    for m in module.modules():
        if isinstance(m, (ColumnParallelLinear, VocabParallelEmbedding)):
            dim = 0
        elif isinstance(m, RowParallelLinear):
            dim = 1
        else:
            continue
        if getattr(m, "weight", None) is not None and not hasattr(m.weight, "partition_dim"):
            set_tensor_model_parallel_attributes(m.weight, True, dim, 1)
        bias = getattr(m, "bias", None)
        if (
            isinstance(m, ColumnParallelLinear)
            and bias is not None
            and not hasattr(bias, "partition_dim")
        ):
            set_tensor_model_parallel_attributes(bias, True, 0, 1)
