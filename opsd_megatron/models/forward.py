"""Forward passes through megatron's pipeline schedule that return vocab-sharded logits.

Used for the teacher's pass (forward-only, no grad) and for checks against HF: on the last
pipeline stage the result is ``[B, T, V/tp]`` logits, elsewhere ``None``.
"""

from __future__ import annotations

import torch


def forward_logits(model, tokens_BT: torch.Tensor, position_ids_BT: torch.Tensor | None = None,
                   micro_batch_size: int | None = None, inference_context=None) -> torch.Tensor | None:
    """Logits of ``tokens_BT`` under ``model`` (this rank's stage), forward-only through the schedule.

    With an ``inference_context`` (KV cache, see ``kv_cache.py``) the tokens continue the cached
    prefix; the batch then goes through in one micro-batch.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batch, seq = tokens_BT.shape
    micro = micro_batch_size or batch
    if batch % micro:
        raise ValueError(f"batch {batch} is not divisible by micro_batch_size {micro}")
    if position_ids_BT is None:
        position_ids_BT = torch.arange(seq, device=tokens_BT.device).expand(batch, seq)
    chunks = iter([(tokens_BT[i:i + micro], position_ids_BT[i:i + micro]) for i in range(0, batch, micro)])

    def step(data_iterator, m):
        tokens, positions = next(data_iterator)
        if inference_context is None:
            out = m(tokens, positions, attention_mask=None)
        else:
            out = m(tokens, positions, attention_mask=None, inference_context=inference_context)

        def keep_logits(output, non_loss_data=False):
            return output.detach() if non_loss_data else (output.sum() * 0, {})

        return out, keep_logits

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=chunks, model=[model], num_microbatches=batch // micro,
            seq_length=seq, micro_batch_size=micro, forward_only=True, collect_non_loss_data=True)
    if not ps.is_pipeline_last_stage():
        return None
    return torch.cat(outputs, dim=0)
