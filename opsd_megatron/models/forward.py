"""Forward passes through megatron's pipeline schedule that return vocab-sharded logits.

Used for the teacher's pass (forward-only, no grad) and for checks against HF: on the last
pipeline stage the result is ``[B, T, V/tp]`` logits, elsewhere ``None``.
"""

from __future__ import annotations

import contextlib

import torch

from opsd_megatron.models.build import groups_of

SP_ATTRIBUTES = (
    "sequence_parallel",
    "reduce_scatter_embeddings",
)  # what megatron caches per module


def pad_for_sequence_parallel(model, tokens_BT: torch.Tensor, position_ids_BT: torch.Tensor):
    """Right-pad to a multiple of TP when the model runs sequence parallel (each rank takes T/tp
    positions). The model is causal, so logits at the real positions do not see the padding."""
    cfg = model.config
    extra = (-tokens_BT.shape[1]) % cfg.tensor_model_parallel_size if cfg.sequence_parallel else 0
    if not extra:
        return tokens_BT, position_ids_BT
    b, t = tokens_BT.shape
    more = torch.arange(t, t + extra, device=position_ids_BT.device).expand(b, extra)
    return (
        torch.cat([tokens_BT, tokens_BT.new_zeros(b, extra)], dim=1),
        torch.cat([position_ids_BT, more.to(position_ids_BT.dtype)], dim=1),
    )


@contextlib.contextmanager
def sequence_parallel_disabled(model):
    """Run ``model`` without sequence parallelism inside the block (KV-cache decoding feeds one
    token at a time). Megatron caches the flag per module, so every copy is switched and
    restored."""
    saved = [
        (m, a, getattr(m, a))
        for m in [model.config, *model.modules()]
        for a in SP_ATTRIBUTES
        if isinstance(getattr(m, a, None), bool)
    ]
    for m, a, _ in saved:
        setattr(m, a, False)
    try:
        yield
    finally:
        for m, a, value in saved:
            setattr(m, a, value)


def forward_logits(
    model,
    tokens_BT: torch.Tensor,
    position_ids_BT: torch.Tensor | None = None,
    micro_batch_size: int | None = None,
    inference_context=None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Logits of ``tokens_BT`` under ``model`` (this rank's stage), forward-only through the
    schedule.

    With an ``inference_context`` (KV cache, see ``kv_cache.py``) the tokens continue the cached
    prefix; the batch then goes through in one micro-batch, with ``attention_mask`` (True =
    masked, ``[B, 1, S, cached + S]``) if given.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    groups = groups_of(model)
    batch, seq = tokens_BT.shape
    micro = micro_batch_size or batch
    if batch % micro:
        raise ValueError(f"batch {batch} is not divisible by micro_batch_size {micro}")
    if position_ids_BT is None:
        position_ids_BT = torch.arange(seq, device=tokens_BT.device).expand(batch, seq)
    real = seq
    if inference_context is None:
        tokens_BT, position_ids_BT = pad_for_sequence_parallel(model, tokens_BT, position_ids_BT)
        seq = tokens_BT.shape[1]
    chunks = iter(
        [(tokens_BT[i : i + micro], position_ids_BT[i : i + micro]) for i in range(0, batch, micro)]
    )

    def step(data_iterator, m):
        tokens, positions = next(data_iterator)
        if inference_context is None:
            out = m(tokens, positions, attention_mask=None)
        else:
            out = m(
                tokens,
                positions,
                attention_mask=attention_mask,
                inference_context=inference_context,
            )

        def keep_logits(output, non_loss_data=False):
            return output.detach() if non_loss_data else (output.sum() * 0, {})

        return out, keep_logits

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=chunks,
            model=[model],
            num_microbatches=batch // micro,
            seq_length=seq,
            micro_batch_size=micro,
            forward_only=True,
            collect_non_loss_data=True,
        )
    if not groups.is_last_stage:
        return None
    return torch.cat(outputs, dim=0)[:, :real]
