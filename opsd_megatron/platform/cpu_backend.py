"""CPU backend for megatron-core: run its models, schedules and TP/PP collectives on CPU over gloo.

megatron-core assumes CUDA in three kinds of places (measured on 0.16.1, see
``shared/notes/megatron-core-on-cpu.md``):

(a) ``torch.cuda.current_device()`` picks the device of RoPE buffers, attention helpers and the
    pipeline's p2p shape tensors, and ``torch.cuda.synchronize()`` follows batched p2p;
(b) the model-parallel RNG tracker snapshots ``torch.cuda`` RNG states (dropout forks it);
(c) a few helpers allocate with a hard-coded ``device="cuda"`` (``get_default_causal_mask``, the
    schedules' token counters, the optimizers' found-inf / scale flags, the grad-norm buffers of
    ``clip_grads``) or move tensors with ``.cuda()`` (tied embeddings across pipeline stages);
(d) the mixed-precision and distributed optimizers sort parameters by ``tensor.type()`` strings
    (``'torch.cuda.BFloat16Tensor'``, ``clip_grads`` asserts ``'torch.cuda.FloatTensor'``), so a
    CPU bf16 parameter would be refused as "not a supported type".

``activate()`` mends exactly these: (a) resolves the current device to CPU and makes synchronize a
no-op, (b) swaps the tracker class for :class:`CpuRNGStatesTracker` (same API, CPU generator
states), (c) gives the listed megatron modules a view of ``torch`` whose factory functions map
``device="cuda"`` to CPU, and makes ``Tensor.cuda()`` a no-op (it could only fail without CUDA),
(d) makes the no-argument ``Tensor.type()`` name a CPU tensor's CUDA counterpart (the role CPU
tensors play here; ``type(dtype)`` conversions are untouched). It never does anything when a CUDA
device is present, and it is idempotent. Everything else in megatron-core is left untouched, but
for one speed mend: (e) dist_checkpointing's writer collects results through a
``multiprocessing.Manager`` queue started with ``spawn`` (safe beside CUDA), which costs ~2 s per
process on 2 cores before the first save and again at exit; without CUDA a ``fork`` manager is as
safe and takes ~0.05 s (measured: the first save of a tiny model 3.7 s -> 0.2 s).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import multiprocessing
import types

import torch

logger = logging.getLogger(__name__)

# Modules whose code allocates with a literal device="cuda" on paths a CPU run takes.
# Missing modules are skipped, so the list can name modules of any megatron-core 0.16-0.19.
CUDA_LITERAL_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.transformer.utils",
    "megatron.core.tensor_parallel.data",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.utils",  # local_multi_tensor_l2_norm, apex's fallback on CPU
)
_FACTORIES = frozenset(
    {
        "zeros",
        "ones",
        "empty",
        "full",
        "tensor",
        "arange",
        "rand",
        "randn",
        "empty_like",
        "zeros_like",
        "ones_like",
        "full_like",
    }
)

_active = False


def is_active() -> bool:
    """True once :func:`activate` has installed the backend in this process."""
    return _active


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    return isinstance(device, int)  # a bare ordinal means a CUDA device in torch's factories


def _cpu_factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")  # the rank's device object, as on a GPU
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


class _CpuTorchView(types.ModuleType):
    """``torch`` as seen by a patched module: factories allocate on CPU, everything else is
    torch."""

    def __init__(self):
        super().__init__("torch")
        self._wrapped = {name: _cpu_factory(getattr(torch, name)) for name in _FACTORIES}

    def __getattr__(self, name):
        wrapped = self.__dict__["_wrapped"].get(name)
        return wrapped if wrapped is not None else getattr(torch, name)


class CpuRNGStatesTracker:
    """Drop-in for megatron's ``CudaRNGStatesTracker`` that keeps named CPU generator states.

    Same contract: ``add(name, seed)`` registers a stream, ``fork(name)`` runs a block on that
    stream and restores the caller's stream after, so TP-rank-specific dropout stays reproducible.
    """

    def __init__(self, use_cudagraphable_rng=False, is_inference_rng_tracker=False):
        if use_cudagraphable_rng:
            raise ValueError("CUDA-graph-safe RNG needs a GPU; the CPU backend cannot provide it")
        self.use_cudagraphable_rng = False
        self.is_inference_rng_tracker = is_inference_rng_tracker
        self.reset()

    def is_initialized(self):
        return self._is_initialized

    def reset(self):
        self._is_initialized = False
        self.states_ = {}
        self.seeds_ = set()
        self._current_state_name = "default-rng"

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        orig = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig)

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig = torch.get_rng_state()
        orig_name = self._current_state_name
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)
            self._current_state_name = orig_name


def _install_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    base = mrandom.CudaRNGStatesTracker
    if not issubclass(base, CpuRNGStatesTracker):
        # A subclass, so megatron's isinstance checks (get_all_rng_states) keep working.
        tracker_cls = type("CpuRNGStatesTracker", (CpuRNGStatesTracker, base), {})
        mrandom.CudaRNGStatesTracker = tracker_cls
    mrandom.initialize_rng_tracker(force_reset=True)
    # activation recompute saves and restores the "device" RNG: on CPU that is the CPU generator
    mrandom._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: (
        torch.get_rng_state()
    )
    mrandom._set_cuda_rng_state = lambda new_state, device=-1, graph_safe=False: (
        torch.set_rng_state(new_state)
    )


def _install_type_names() -> None:
    """``t.type()`` -> ``'torch.cuda.FloatTensor'`` for a CPU float tensor (see (d) above)."""
    original = torch.Tensor.type

    @functools.wraps(original)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = original(self)
            return name.replace("torch.", "torch.cuda.", 1) if self.device.type == "cpu" else name
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_


def _install_fork_write_queue() -> None:
    """(e): the checkpoint writer's results queue from a ``fork`` manager, made on first use
    (megatron-core 0.16 names the maker ``_get_write_results_queue``, 0.19
    ``get_write_results_queue(mp_mode)``; both keep the queue in ``_results_queue``)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:
        return

    def queue(*_args, **_kwargs):
        if filesystem_async._results_queue is None:
            manager = multiprocessing.get_context("fork").Manager()
            filesystem_async._results_queue = manager.Queue()
        return filesystem_async._results_queue

    for name in ("_get_write_results_queue", "get_write_results_queue"):
        if hasattr(filesystem_async, name) and hasattr(filesystem_async, "_results_queue"):
            setattr(filesystem_async, name, queue)


def activate() -> bool:
    """Install the CPU backend if no CUDA device is present. Returns whether it is active."""
    global _active
    if _active:
        return True
    if torch.cuda.is_available():
        return False
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda device=None: None
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.cuda.empty_cache = lambda: None
    _install_type_names()
    _install_rng_tracker()
    _install_fork_write_queue()
    view = _CpuTorchView()
    for name in CUDA_LITERAL_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        module.torch = view
    _active = True
    logger.info("opsd_megatron: no CUDA device, megatron-core runs on the CPU backend")
    return True


def default_device() -> torch.device:
    """The device tensors should live on: the current CUDA device, or CPU under this backend."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
