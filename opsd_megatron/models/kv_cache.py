"""A KV cache for the Megatron sampler, on megatron-core's ``StaticInferenceContext``.

megatron-core's inference path gathers the TP logits of the last token
(``runtime_gather_output`` is asserted). To keep the no-gather promise the model's post-processing
is replaced, for the duration of a generation only, by the output layer with vocab-sharded
output, so each rank still holds ``[B, 1, V/tp]``.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def sharded_inference_logits(model):
    """Inside the block, ``model(..., inference_context=ctx)`` returns vocab-sharded [B, S, V/tp]
    logits."""

    def postprocess(hidden_states, **_):
        if not model.post_process:  # an earlier pipeline stage hands on its hidden states
            return hidden_states
        weight = (
            model.shared_embedding_or_output_weight()
            if model.share_embeddings_and_output_weights
            else None
        )
        logits, _ = model.output_layer(hidden_states, weight=weight, runtime_gather_output=False)
        return logits.transpose(0, 1).contiguous()

    model._postprocess = postprocess
    try:
        yield
    finally:
        del model._postprocess  # back to the class method


def new_context(batch: int, max_len: int):
    from megatron.core.inference.contexts import StaticInferenceContext

    return StaticInferenceContext(batch, max_len)
