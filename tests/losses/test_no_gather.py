"""The no-gather promise at TP>1: every tensor the losses create is at most a local vocab shard,
and the only collectives are all-reduces of [K, tokens] per-token scalars."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from opsd_megatron.losses import vocab_parallel_jsd_with_entropy, vocab_parallel_sampled_token_loss
from opsd_megatron.testing import run_distributed

TOKENS, LOCAL_V, TP = 12, 24, 2


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def _rank_fn():
    calls = []
    originals = {}
    for name in (
        "all_reduce",
        "all_gather",
        "all_gather_into_tensor",
        "all_gather_object",
        "broadcast",
        "reduce_scatter",
        "reduce_scatter_tensor",
        "all_to_all",
        "all_to_all_single",
        "gather",
        "scatter",
        "send",
        "recv",
        "reduce",
    ):
        originals[name] = getattr(dist, name)

        def recorder(*args, _name=name, **kwargs):
            calls.append(
                (_name, tuple(args[0].shape) if isinstance(args[0], torch.Tensor) else None)
            )
            return originals[_name](*args, **kwargs)

        setattr(dist, name, recorder)

    g = torch.Generator().manual_seed(dist.get_rank())
    student = torch.randn(3, 4, LOCAL_V, generator=g, requires_grad=True)
    teacher = torch.randn(3, 4, LOCAL_V, generator=g)
    tokens = torch.randint(0, 2 * LOCAL_V - 5, (3, 4), generator=torch.Generator().manual_seed(0))
    recorder = ShapeRecorder()
    with recorder:
        out = vocab_parallel_jsd_with_entropy(
            student,
            teacher,
            beta=0.5,
            temperature=1.1,
            vocab_size=2 * LOCAL_V - 5,
            group=dist.group.WORLD,
            chunk_elements=100,
        )
        out.loss.sum().backward()
        st = vocab_parallel_sampled_token_loss(
            student, teacher, tokens, vocab_size=2 * LOCAL_V - 5, group=dist.group.WORLD
        )
        st.loss.sum().backward()
    for name, fn in originals.items():
        setattr(dist, name, fn)
    return recorder.shapes, calls


def test_losses_create_no_vocab_sized_tensor_and_reduce_only_per_token_scalars():
    for shapes, calls in run_distributed(_rank_fn, TP):
        assert shapes, "the recorder saw no tensors"
        full_vocab = TP * LOCAL_V
        too_big = [
            (op, s)
            for op, s in shapes
            if (s and s[-1] >= full_vocab) or torch.Size(s).numel() > TOKENS * LOCAL_V
        ]
        assert not too_big, f"tensors larger than the local shard: {too_big[:5]}"
        assert calls, "the losses must communicate at TP=2"
        assert {name for name, _ in calls} == {"all_reduce"}
        for _, shape in calls:
            assert len(shape) == 2 and shape[0] <= 8 and shape[1] == TOKENS, shape
