"""The per-token-loss contract with megatron (``models/loss_contract.py``): with every piece in
place, the gradient megatron's schedule + DDP + ``finalize_model_grads`` produce at DP=2, two
micro-batches per rank with unequal token counts (and unequal totals per rank), equals plain
autograd of the global token mean on one process; each piece is also pinned on its own.

Checked by breaking each piece locally: without ``configure_model`` the gradient halves (megatron
divides by the 2 micro-batches), ``num_tokens=<the count>`` divides it by the step's count of 4,
a per-rank normaliser (no DP reduction) weights the ranks wrongly, a count other than 1 or a
missing ``no_sync_func`` fails the unit test. With ``overlap_grad_reduce`` (the GPU default,
megatron's hooks run here on gloo): a step with more micro-batches than the first is reduced
early without ``no_sync`` (error > 0.1, checked), and ``build_components`` not handing its DDP to
``configure_model`` fails the build test (checked).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from opsd_megatron.models import loss_contract
from opsd_megatron.testing import run_distributed

ARCH = dict(
    model_type="qwen3", vocab_size=64, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
    max_position_embeddings=32, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)  # fmt: skip
B, T = 2, 6
# response-mask lengths per (rank, micro-batch, row): unequal micro-batches and unequal ranks
LENGTHS = {0: [[6, 1], [2, 2]], 1: [[5, 6], [6, 3]]}


def _data():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ARCH["vocab_size"], (2, 2, B, T + 1), generator=g)
    masks = torch.zeros(2, 2, B, T, dtype=torch.bool)
    for rank, mbs in LENGTHS.items():
        for m, rows in enumerate(mbs):
            for r, n in enumerate(rows):
                masks[rank, m, r, :n] = True
    return tokens, masks


def _per_token(model, tokens_BT1):
    x = tokens_BT1[:, :-1]
    pos = torch.arange(T).expand(B, T)
    logits = model(x, pos, attention_mask=None).float()
    lp = torch.log_softmax(logits[..., : ARCH["vocab_size"]], -1)
    return -lp.gather(-1, tokens_BT1[:, 1:, None])[..., 0]


def _rank(overlap: bool = False, wired: bool = True):
    """Rank's worst relative gradient error against the single-process reference. ``overlap``:
    DDP's ``overlap_grad_reduce`` (the GPU default; its bucket hooks reduce as soon as a bucket's
    gradients are ready); ``wired``: ``configure_model`` gets the DDP (its ``no_sync``)."""
    import torch.distributed as dist
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from opsd_megatron.losses.reduction import partial_loss
    from opsd_megatron.models import arch_from_hf_config, build_gpt_model
    from opsd_megatron.models.hf_weights import load_hf_weights
    from opsd_megatron.models.random_init import RandomHFWeights
    from opsd_megatron.platform import initialize_model_parallel

    groups = initialize_model_parallel(1, 1)
    arch = arch_from_hf_config(ARCH)
    model = build_gpt_model(arch, torch.float32, initialize=False, groups=groups)
    load_hf_weights(model, RandomHFWeights(arch, 0, 0.1), arch)
    tokens, masks = _data()

    # the reference: plain autograd of the global token mean over both ranks' data
    total = masks.sum()
    loss = sum(
        torch.where(masks[r, m], _per_token(model, tokens[r, m]), 0.0).sum()
        for r in range(2)
        for m in range(2)
    )
    (loss / total).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    loss_contract.configure_model(model)
    ddp_cfg = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=overlap)
    ddp = DistributedDataParallel(model.config, ddp_cfg, model)
    if wired:
        loss_contract.configure_model(model, ddp)
    ddp.zero_grad_buffer()
    rank = dist.get_rank()
    mine = [(tokens[rank, m], masks[rank, m]) for m in range(2)]
    norm = loss_contract.normalizer([m for _, m in mine], "token_mean", groups.dp)

    def step(data_iterator, m):
        toks, mask = next(data_iterator)
        out = m(toks[:, :-1], torch.arange(T).expand(B, T), attention_mask=None)

        def loss_fn(logits):
            lp = torch.log_softmax(logits.float()[..., : ARCH["vocab_size"]], -1)
            per_token = -lp.gather(-1, toks[:, 1:, None])[..., 0]
            return loss_contract.loss_return(partial_loss(per_token, mask, "token_mean", norm), {})

        return out, loss_fn

    # with overlap, a second step with one micro-batch more (token-budget steps differ in count):
    # an empty one first, so the step's gradient is the same. Megatron's overlap hooks count each
    # parameter's gradients in the first step and, from the second on, reduce a bucket as soon as
    # the count is reached — after the last micro-batch only if no_sync marks the others
    steps = [mine] if not overlap else [mine, [(mine[0][0], torch.zeros_like(mine[0][1])), *mine]]
    for batches in steps:
        ddp.zero_grad_buffer()
        get_forward_backward_func()(
            forward_step_func=step,
            data_iterator=iter(batches),
            model=[ddp],
            num_microbatches=len(batches),
            seq_length=T,
            micro_batch_size=B,
            forward_only=False,
        )
        loss_contract.finalize_gradients(ddp)
    got = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    return max(float((got[n] - want[n]).abs().max() / want[n].abs().max()) for n in want)


def test_megatron_scales_the_gradient_to_the_global_token_mean():
    errors = run_distributed(_rank, 2, timeout=300)
    assert max(errors) < 1e-5, errors  # fp32 round-off; a broken piece is off by >= 25 %


def test_with_overlapped_reduction_no_sync_keeps_one_reduction_per_step():
    """``overlap_grad_reduce`` (on by default on a GPU, where its hooks run on CUDA streams; here
    megatron's same hooks with gloo's async all-reduce), over two steps of 2 and then 3 micro-
    batches: wired, the second step's gradients equal the reference; without ``no_sync`` every
    micro-batch counts as the last, megatron learns "two per step" from the first, reduces the
    second step's bucket after its second micro-batch and the third adds its local gradient
    unreduced. Unwired, gloo's all-reduce runs asynchronously beside the third micro-batch, so
    whether a rank's buffer is read before or after that gradient lands is a race: one rank may
    come out right by timing (a clean-clone run: 0.83 and 1.2e-7), so the broken case asserts
    that some rank is wrong, and the wired one that every rank is right."""
    assert max(run_distributed(_rank, 2, True, True, timeout=300)) < 1e-5
    assert max(run_distributed(_rank, 2, True, False, timeout=300)) > 0.1


def _components_with_overlap(out):
    from opsd_megatron.config import load_config
    from opsd_megatron.train import optimizer
    from opsd_megatron.train.components import build_components
    from tests.train.tiny import RECIPE, overrides, rank_layout

    optimizer.overlap_possible = lambda: True  # the GPU default (this process only)
    cfg = load_config(RECIPE, overrides(out, 1, 1))
    c = build_components(cfg, rank_layout(cfg))
    return c.ddp.ddp_config.overlap_grad_reduce, c.model.config.no_sync_func == c.ddp.no_sync


def test_build_components_hands_its_ddp_to_the_contract(tmp_path):
    """With overlap on (a GPU's default), the built model's schedule syncs through the DDP's
    ``no_sync``: what the test above shows is needed."""
    assert run_distributed(_components_with_overlap, 1, tmp_path / "run", timeout=300) == [
        (True, True)
    ]


def test_each_piece_of_the_contract():
    model = torch.nn.Module()
    model.config = SimpleNamespace(calculate_per_token_loss=False, no_sync_func=None)
    ddp = SimpleNamespace(ddp_config=SimpleNamespace(overlap_grad_reduce=True), no_sync=object())
    loss_contract.configure_model(model, ddp)
    assert model.config.calculate_per_token_loss is True
    assert model.config.no_sync_func is ddp.no_sync  # one sync per step when overlapping
    model.config.no_sync_func = None
    ddp.ddp_config.overlap_grad_reduce = False
    loss_contract.configure_model(model, ddp)
    assert model.config.no_sync_func is None
    loss = torch.tensor(0.5, dtype=torch.float64)
    out_loss, count, stats = loss_contract.loss_return(loss, {"k": 1})
    assert out_loss is loss and stats == {"k": 1}
    assert count.dtype == torch.int and count.shape == () and int(count) == 1
    assert count.device == loss.device


def test_finalize_passes_no_token_count(monkeypatch):
    import megatron.core.distributed as mcd

    seen = []
    monkeypatch.setattr(
        mcd, "finalize_model_grads", lambda models, num_tokens: seen.append(num_tokens)
    )
    loss_contract.finalize_gradients(object())
    assert seen == [None]
