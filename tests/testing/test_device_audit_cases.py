"""The device audit's blind spots of issue 45, each refused — and its correct form passed — in one
process: a module built without a device (its ``Parameter`` keeps the host mark), ``from_numpy`` /
``frombuffer`` (never routed through a ``TorchFunctionMode``), ``device=`` taken from a host
tensor's ``.device``, ``torch.default_generator`` and the legacy ``torch.FloatTensor`` constructors.
The whole step under the audit: tests/train/test_device_audit.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opsd_megatron.testing.device_audit import DeviceAuditError, device_audit

DEVICE = torch.device("cpu")  # the rank's device, as ``groups.device`` hands it out


def _x():
    return torch.ones(4, device=DEVICE)


CASES = {
    "module without a device": lambda: torch.nn.Linear(4, 4)(_x()),
    "parameter of a host tensor": lambda: _x() * torch.nn.Parameter(torch.zeros(4)),
    "from_numpy": lambda: _x() + torch.from_numpy(np.ones(4, dtype=np.float32)),
    "frombuffer": lambda: _x() + torch.frombuffer(bytearray(16), dtype=torch.float32),
    "device of a host tensor": lambda: _x() + torch.zeros(4, device=torch.arange(2).device),
    "to a host tensor's device": lambda: _x() + torch.ones(4).to(torch.arange(2).device),
    "default generator": lambda: torch.randn(4, generator=torch.default_generator, device=DEVICE),
    "legacy constructor": lambda: _x() + torch.FloatTensor([1.0, 2.0, 3.0, 4.0]),
}
FIXED = {
    "module without a device": lambda: torch.nn.Linear(4, 4, device=DEVICE)(_x()),
    "module moved": lambda: torch.nn.Linear(4, 4).to(DEVICE)(_x()),
    "parameter of a device tensor": lambda: _x() * torch.nn.Parameter(_x()),
    "from_numpy moved": lambda: _x() + torch.from_numpy(np.ones(4, dtype=np.float32)).to(DEVICE),
    "device of a device tensor": lambda: _x() + torch.zeros(4, device=_x().device),
    "a device generator": lambda: torch.randn(
        4, generator=torch.Generator(DEVICE).manual_seed(0), device=DEVICE
    ),
    "host only": lambda: torch.FloatTensor([1.0]) + torch.from_numpy(np.ones(1, dtype=np.float32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_audit_refuses_what_a_gpu_refuses(name):
    with device_audit(), pytest.raises(DeviceAuditError) as err:
        CASES[name]()
    assert "host" in str(err.value), err.value
    assert isinstance(torch.FloatTensor([1.0]), torch.FloatTensor)  # restored after the block


@pytest.mark.parametrize("name", list(FIXED))
def test_the_correct_form_passes(name):
    with device_audit():
        FIXED[name]()
    assert isinstance(torch.from_numpy(np.ones(1)), torch.Tensor)


def test_a_legacy_type_still_works_as_a_type_under_the_audit():
    original = torch.LongTensor
    with device_audit():
        assert isinstance(torch.ones(2), torch.FloatTensor)
        assert not isinstance(torch.ones(2, dtype=torch.long), torch.FloatTensor)
        # annotations of modules first imported under the audit (transformers' logits processors)
        assert (torch.LongTensor | None) == (original | None) == (None | torch.LongTensor)
        assert torch.LongTensor.dtype is original.dtype
