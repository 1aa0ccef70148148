"""megatron-core on the CPU backend: GPTModel at TP=2 equals TP=1, the pipeline schedule at PP=2 and
TP2xPP2 equals PP=1 (loss and gradients), dropout's RNG forks work, and CUDA machines are
untouched."""

from __future__ import annotations

import torch
import torch.distributed as dist

from opsd_megatron.testing import run_distributed

VOCAB, SEQ, LAYERS = 96, 10, 2


def _build(tp, pp, dropout=0.0):
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from opsd_megatron.platform import initialize_model_parallel

    initialize_model_parallel(tp, pp, seed=11)
    cfg = TransformerConfig(
        num_layers=LAYERS,
        hidden_size=32,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=48,
        use_cpu_initialization=True,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=dropout,
        attention_dropout=dropout,
        qk_layernorm=True,
        pipeline_dtype=torch.float32,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
    )
    return GPTModel(
        cfg,
        get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm"),
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
    )


def _tokens(batch=4):
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, VOCAB, (batch, SEQ), generator=g), torch.arange(SEQ).expand(batch, SEQ)


def _tp_forward(tp):
    """Eval logits (vocab shard) plus a train-mode step with dropout, which forks the RNG
    tracker."""
    from megatron.core import parallel_state as ps

    model = _build(tp, 1, dropout=0.1)
    tokens, pos = _tokens()
    model.eval()
    with torch.no_grad():
        logits = model(tokens, pos, attention_mask=None)
    model.train()
    before = torch.get_rng_state()
    model(tokens, pos, attention_mask=None).sum().backward()
    default_stream_advanced = not torch.equal(before, torch.get_rng_state())
    return logits, ps.get_tensor_model_parallel_rank(), default_stream_advanced


def test_gpt_tp2_equals_tp1():
    ref_logits = run_distributed(_tp_forward, 1, 1)[0][0]
    out = run_distributed(_tp_forward, 2, 2)
    assert out[0][0].shape[-1] == VOCAB // 2, "logits must stay vocab-sharded"
    full = torch.cat([o[0] for o in out], dim=-1)
    assert (full - ref_logits).abs().max() < 1e-5
    assert all(o[2] for o in out), (
        "train-mode dropout must draw from the CPU generator (the step ran dropout)"
    )


def _layer_key(key, offset):
    parts = key.split(".")
    if parts[:2] == ["decoder", "layers"]:
        parts[2] = str(int(parts[2]) + offset)
    return ".".join(parts)


def _pipeline_step(tp, pp, full_state=None):
    """Two micro-batches through megatron's schedule; returns losses and grads by global name."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model = _build(tp, pp)
    offset = ps.get_pipeline_model_parallel_rank() * (LAYERS // pp)
    if full_state is not None:  # load the PP=1/TP=1 weights into this stage (TP=1 only)
        model.load_state_dict(
            {
                k: full_state[_layer_key(k, offset)]
                for k in model.state_dict()
                if not k.endswith("_extra_state")
            },
            strict=False,
        )
    tokens, pos = _tokens()
    batches = iter([(tokens[:2], pos[:2]), (tokens[2:], pos[2:])])

    def step(data_iterator, m):
        t, p = next(data_iterator)
        out = m(t, p, attention_mask=None)

        def loss_fn(logits):
            loss = logits.float().square().mean() if tp == 1 else None
            if loss is None:  # sum of squares over the full vocab from the shards
                sq = logits.float().square().sum()
                dist.all_reduce(sq, group=ps.get_tensor_model_parallel_group())
                loss = sq / (logits.numel() * tp)
            return loss, {"loss": loss.detach().clone()}

        return out, loss_fn

    losses = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=batches,
        model=[model],
        num_microbatches=2,
        seq_length=SEQ,
        micro_batch_size=2,
        forward_only=False,
    )
    grads = {
        _layer_key(n, offset): p.grad.clone()
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    state = {
        _layer_key(k, offset): v.clone()
        for k, v in model.state_dict().items()
        if "_extra_state" not in k
    }
    return [l["loss"] for l in losses] if losses else None, grads, state


def test_pipeline_schedule_pp2_equals_pp1():
    ref_losses, ref_grads, ref_state = run_distributed(_pipeline_step, 1, 1, 1)[0]
    out = run_distributed(_pipeline_step, 2, 1, 2, ref_state)
    assert out[0][0] is None and out[1][0] is not None, "only the last stage reports losses"
    assert torch.allclose(torch.stack(out[1][0]), torch.stack(ref_losses), rtol=1e-6)
    grads = {**out[0][1], **out[1][1]}
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=1e-5, atol=1e-7), name


def test_pipeline_schedule_tp2_pp2_equals_pp2_tp1():
    """TP2xPP2 (4 ranks): with CPU initialisation TP=2 builds exactly the TP=1 weights for a seed,
    so the losses equal those of the PP=2/TP=1 run built the same way."""
    ref_losses = run_distributed(_pipeline_step, 2, 1, 2)[1][0]
    out = run_distributed(_pipeline_step, 4, 2, 2)
    losses = [o[0] for o in out if o[0] is not None]
    assert len(losses) == 2, "both TP ranks of the last stage report"
    for rank_losses in losses:
        assert torch.allclose(torch.stack(rank_losses), torch.stack(ref_losses), rtol=1e-5)


def _cuda_present_probe():
    from unittest import mock

    from opsd_megatron.platform import cpu_backend

    original = torch.cuda.current_device
    with mock.patch.object(torch.cuda, "is_available", return_value=True):
        activated = cpu_backend.activate()
    return activated, torch.cuda.current_device is original, cpu_backend.is_active()


def test_backend_is_never_applied_when_cuda_is_available():
    # A GPU cannot exist here: is_available is mocked, in a fresh process so nothing leaks.
    activated, untouched, active = run_distributed(_cuda_present_probe, 1)[0]
    assert (activated, untouched, active) == (False, True, False)


def _rng_fork_probe():
    from megatron.core import tensor_parallel

    from opsd_megatron.platform import initialize_model_parallel

    initialize_model_parallel(2, 1, seed=5)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(before, torch.get_rng_state()), "fork must restore the default stream"
    with tracker.fork():
        b = torch.rand(3)
    return a, b


def test_rng_tracker_streams_differ_per_tp_rank_and_advance():
    (a0, b0), (a1, b1) = run_distributed(_rng_fork_probe, 2)
    assert not torch.equal(a0, a1), "TP ranks need distinct model-parallel streams"
    assert not torch.equal(a0, b0), "a stream must advance between forks"
    (a0_again, _), _ = run_distributed(_rng_fork_probe, 2)
    assert torch.equal(a0, a0_again), "streams are reproducible for a seed"
