"""A CPU harness that fails where a GPU would: every tensor is either *on the rank's device* or
*on the host*, and the harness raises at the first operation that a CUDA rank would refuse.

Why not the alternatives (weighed for issue 27):

* ``torch.set_default_device("meta")`` catches a tensor made without a device, but not a ``.cpu()``
  before a collective, nor a CPU generator drawing for device logits (both stay real CPU tensors),
  and it breaks third-party code that legitimately builds host tensors (tokenizers, gloo's object
  collectives).
* ``FakeTensorMode`` with CUDA fake tensors: a real megatron module cannot be moved onto fake CUDA
  (measured here), and a fake step computes nothing, so the numbers of the step go unchecked.
* A PrivateUse1 device backed by CPU: every aten op the model uses needs a kernel, and gloo
  refuses tensors of a foreign device — a second backend to maintain.

So the rank's device stays the CPU and the harness *tags* tensors instead (a
``TorchFunctionMode``, which sees every torch call with the arguments the code wrote):

* host: made by a factory with no ``device`` (the default device) or with ``device=`` a host
  tensor's ``.device``, by ``torch.tensor`` without one, ``from_numpy`` / ``frombuffer`` and the
  legacy ``torch.FloatTensor(...)`` constructors, by ``.cpu()`` or ``.to("cpu")``; a
  ``Parameter`` of a host tensor (a module built without a device and never moved); results of
  host-only operations.
* device: everything else — made with an explicit device (the rank's ``groups.device``, or
  ``x.device`` of a device tensor), moved with ``.to(device)`` / ``.cuda()``.

It raises :class:`DeviceAuditError` where CUDA raises: an operation mixing a host tensor of rank
> 0 with a device tensor (indices, copies and 0-dim host scalars excepted, as on CUDA), a
collective on a host tensor (NCCL reduces only CUDA tensors, torch 2.13 ``distributed_c10d``),
and a random draw that mixes a host generator (``torch.Generator()``, ``torch.default_generator``)
with device tensors.

What it cannot see: a literal ``torch.device("cpu")`` passed as ``device=`` reads as the rank's
device (CPU here); ``tests/test_device_discipline.py`` forbids such literals in the step's modules.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_TAG = "_opsd_on_host"


class DeviceAuditError(AssertionError):
    """An operation that a CUDA rank would refuse (mixed devices, host collective, host
    generator)."""


def on_host(t: torch.Tensor) -> bool:
    return getattr(t, _TAG, False)


def _tag(t, host: bool) -> None:
    if isinstance(t, torch.Tensor):
        if host:
            setattr(t, _TAG, True)
        elif _TAG in t.__dict__:
            delattr(t, _TAG)


def _tensors(args, kwargs) -> list[torch.Tensor]:
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out.extend(x for x in a if isinstance(x, torch.Tensor))
    return out


def _where() -> str:
    """The innermost frame of this project outside the harness (what to fix)."""
    import traceback

    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(here) and "device_audit" not in frame.filename:
            return f"{os.path.relpath(frame.filename, os.path.dirname(here))}:{frame.lineno}"
    return "outside opsd_megatron"


def _describe(tensors) -> str:
    return ", ".join(f"{'host' if on_host(t) else 'device'}{list(t.shape)}" for t in tensors[:6])


FACTORIES = frozenset(
    {
        "zeros", "ones", "empty", "full", "rand", "randn", "randint", "randperm", "arange",
        "linspace", "logspace", "eye", "tensor", "as_tensor", "from_numpy", "frombuffer",
        "scalar_tensor", "empty_strided", "normal",
    }
)  # fmt: skip
LIKE = frozenset({"zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like"})
# where CUDA accepts host tensors beside device ones: copies, index tensors, assignment
MIXING_ALLOWED = frozenset(
    {"copy_", "to", "cpu", "cuda", "__setitem__", "__getitem__", "index_put_", "index_put",
     "set_", "__set__", "new_tensor", "new_zeros", "new_ones", "new_full", "new_empty",
     "_has_compatible_shallow_copy_type"}
)  # fmt: skip


# ``host_t.device`` as the audited code received it: a fresh ``torch.device`` per read, kept here
# by id (torch.device takes no weak references) so a ``device=`` built from it reads as the host
_HOST_DEVICES: dict[int, torch.device] = {}


def _is_host_device(device) -> bool:
    """A ``device=`` argument that means the host: absent (the default device), the literal string
    "cpu", or the ``.device`` of a host tensor. Any other ``torch.device`` is taken to be the
    rank's (see the module docstring)."""
    if device is None or id(device) in _HOST_DEVICES:
        return True
    return isinstance(device, str) and device.split(":")[0] == "cpu"


def _host_generator(generator) -> bool:
    """``torch.Generator()`` made under the audit, or torch's own CPU ``default_generator``."""
    return generator is not None and (
        getattr(generator, _TAG, False) or generator is torch.default_generator
    )


def _name(func) -> str:
    return getattr(func, "__name__", "")


class _Audit(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name == "type":  # the CPU backend wraps Tensor.type; torch hands its wrapper back here
            return torch._C.TensorBase.type(*args, **kwargs)
        if name == "__get__" and func == _DEVICE_GET:  # host_t.device: device= from it is host
            out = func(*args, **kwargs)
            if on_host(args[0]):
                out = torch.device(out)
                _HOST_DEVICES[id(out)] = out
            return out
        inputs = _tensors(args, kwargs)
        host_gen = _host_generator(kwargs.get("generator"))

        if name in FACTORIES and not (name == "as_tensor" and inputs):
            host = _is_host_device(kwargs.get("device"))
            if host_gen and not host:
                raise DeviceAuditError(
                    f"{_where()}: torch.{name} draws a device tensor from a host "
                    f"torch.Generator() (CUDA refuses: make the generator on the device)"
                )
            out = func(*args, **kwargs)
            _tag(out, host)
            return out
        if name in LIKE and "device" in kwargs:
            out = func(*args, **kwargs)
            _tag(out, _is_host_device(kwargs["device"]))
            return out
        if name in ("cpu", "to", "cuda"):
            out = func(*args, **kwargs)
            target = {"cpu": "host", "cuda": "device"}.get(name) or _to_target(args[1:], kwargs)
            host = on_host(args[0]) if target is None else target == "host"
            if out is args[0] and host != on_host(out):
                out = out.view_as(out)  # on a GPU the move makes a new tensor; so here
            _tag(out, host)
            return out
        if name == "__set__" and len(args) == 2 and isinstance(args[1], torch.Tensor):
            out = func(*args, **kwargs)  # param.data = tensor: the parameter is where tensor is
            _tag(args[0], on_host(args[1]))
            return out

        host = [t for t in inputs if on_host(t)]
        device = [t for t in inputs if not on_host(t)]
        if name not in MIXING_ALLOWED:
            if host_gen and (device or not host):
                raise DeviceAuditError(
                    f"{_where()}: {name} draws for device tensors from a host torch.Generator()"
                )
            if device and any(t.dim() > 0 for t in host):
                raise DeviceAuditError(
                    f"{_where()}: {name} mixes host and device tensors ({_describe(inputs)}); "
                    f"CUDA raises 'Expected all tensors to be on the same device'"
                )
        elif name in ("__getitem__", "index_select") and on_host(args[0]):
            if any(t.dim() > 0 for t in device if t is not args[0]):
                raise DeviceAuditError(f"{_where()}: a host tensor indexed by device indices")
        out = func(*args, **kwargs)
        if name in ("copy_", "__setitem__", "index_put_", "set_"):
            return out  # in place: the destination stays where it is
        result_host = bool(host) and not device
        if name.startswith("new_") and inputs:
            result_host = (
                on_host(inputs[0]) if "device" not in kwargs else _is_host_device(kwargs["device"])
            )
        if isinstance(out, torch.Tensor):
            _tag(out, result_host)
        elif isinstance(out, (tuple, list)):
            for o in out:
                _tag(o, result_host)
        return out


def _to_target(args, kwargs) -> str | None:
    """Where ``Tensor.to(...)`` sends a tensor: "host", "device", or None (dtype only)."""
    dest = kwargs.get("device")
    for a in args:
        if isinstance(a, (str, torch.device, int)):
            dest = a
        elif isinstance(a, torch.Tensor):
            return "host" if on_host(a) else "device"
    if dest is None:
        return None
    return "host" if _is_host_device(dest) else "device"


COLLECTIVES = (
    "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
    "reduce_scatter_tensor", "reduce", "gather", "scatter", "send", "recv", "isend", "irecv",
    "all_to_all", "all_to_all_single", "batch_isend_irecv",
)  # fmt: skip


def _host_group(group) -> bool:
    """One of megatron's explicit gloo groups (created with ``backend="gloo"`` and a ``*_GLOO``
    description, megatron-core 0.16 ``parallel_state``): host tensors belong there on a GPU
    cluster too (the distributed optimizer's checkpoint gathers)."""
    return "GLOO" in (getattr(group, "group_desc", "") or "").upper()


def _checked_collective(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        groups = [a for a in (*args, *kwargs.values()) if isinstance(a, dist.ProcessGroup)]
        if groups and _host_group(groups[0]):
            return fn(*args, **kwargs)
        tensors = _tensors(args, kwargs)
        for a in (*args, *kwargs.values()):  # batch_isend_irecv: a list of P2POp
            if isinstance(a, (list, tuple)):
                tensors += [op.tensor for op in a if isinstance(op, dist.P2POp)]
        bad = [t for t in tensors if on_host(t)]
        if bad:
            raise DeviceAuditError(
                f"{_where()}: dist.{name} on a host tensor ({_describe(bad)}); NCCL has no CPU "
                f"backend: 'No backend type associated with device type cpu'"
            )
        return fn(*args, **kwargs)

    return wrapper


_DEVICE_GET = torch.Tensor.device.__get__
# the pre-factory constructors, which torch never routes through a TorchFunctionMode
LEGACY = (
    "FloatTensor", "DoubleTensor", "HalfTensor", "BFloat16Tensor", "LongTensor", "IntTensor",
    "ShortTensor", "CharTensor", "ByteTensor", "BoolTensor",
)  # fmt: skip


class _HostMade:
    """A host factory torch does not route through the mode (``from_numpy``, ``frombuffer``, the
    legacy ``torch.FloatTensor(...)``): its result is marked host; ``isinstance``, attributes and
    annotations (``torch.LongTensor | None``, met when a module is first imported under the audit)
    still work."""

    def __init__(self, original):
        self.original = original

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        _tag(out, True)
        return out

    def __instancecheck__(self, obj):
        return isinstance(obj, self.original)

    def __getattr__(self, name):
        return getattr(self.original, name)

    def __or__(self, other):
        return self.original | other

    def __ror__(self, other):
        return other | self.original


def _parameter_new(original):
    """``nn.Parameter(t)`` is a new tensor object: it keeps ``t``'s mark (a module built without
    a device, and never moved, holds host parameters — the first-day GPU crash)."""

    def new(cls, data=None, requires_grad=True):
        out = original(cls, data, requires_grad)
        if data is not None and on_host(data):
            _tag(out, True)
        return out

    return new


class _HostGenerator(torch.Generator):
    """``torch.Generator()`` as the code under audit sees it: remembers a host stream."""

    def __new__(cls, device=None):
        g = super().__new__(cls, device="cpu" if device is None else device)
        if _is_host_device(device):
            setattr(g, _TAG, True)
        return g


@contextlib.contextmanager
def device_audit():
    """Inside the block every torch call is checked as a CUDA rank would check it."""
    from opsd_megatron.platform import cpu_backend

    cpu_backend.activate()  # first: it replaces Tensor.cuda, which the audit wraps
    from torch.distributed import distributed_c10d as c10d

    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}
    # P2POp accepts only c10d's own isend/irecv: those two are wrapped where it looks them up
    # too (the rest only in ``torch.distributed``, so gloo's object collectives stay unchecked)
    saved_p2p = {name: getattr(c10d, name) for name in ("isend", "irecv")}
    saved_generator, saved_cuda = torch.Generator, torch.Tensor.cuda
    saved_factories = {n: getattr(torch, n) for n in ("from_numpy", "frombuffer", *LEGACY)}
    saved_parameter_new = torch.nn.Parameter.__new__

    def cuda(self, *args, **kwargs):  # the CPU backend's no-op .cuda() still means "to device"
        out = saved_cuda(self, *args, **kwargs)
        _tag(out, False)
        return out

    for name, fn in saved.items():
        setattr(dist, name, _checked_collective(name, fn))
    for name in saved_p2p:
        setattr(c10d, name, getattr(dist, name))
    torch.Generator = _HostGenerator
    torch.Tensor.cuda = cuda
    for name, fn in saved_factories.items():
        setattr(torch, name, _HostMade(fn))
    torch.nn.Parameter.__new__ = _parameter_new(saved_parameter_new)
    try:
        with _Audit():
            yield
    finally:
        for name, fn in saved_factories.items():
            setattr(torch, name, fn)
        torch.nn.Parameter.__new__ = saved_parameter_new
        _HOST_DEVICES.clear()
        for name, fn in saved.items():
            setattr(dist, name, fn)
        for name, fn in saved_p2p.items():
            setattr(c10d, name, fn)
        torch.Generator, torch.Tensor.cuda = saved_generator, saved_cuda
