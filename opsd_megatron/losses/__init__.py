"""Vocab-parallel OPSD losses: no rank ever holds or gathers a full-vocabulary tensor."""

from opsd_megatron.losses.jsd import JSDOutput, vocab_parallel_jsd, vocab_parallel_jsd_with_entropy
from opsd_megatron.losses.reduction import global_normalizer, masked_mean, partial_loss
from opsd_megatron.losses.sampled_token import SampledTokenOutput, vocab_parallel_sampled_token_loss
from opsd_megatron.losses.token_logprob import vocab_parallel_token_logprobs

__all__ = [
    "JSDOutput",
    "SampledTokenOutput",
    "global_normalizer",
    "masked_mean",
    "partial_loss",
    "vocab_parallel_jsd",
    "vocab_parallel_jsd_with_entropy",
    "vocab_parallel_sampled_token_loss",
    "vocab_parallel_token_logprobs",
]
