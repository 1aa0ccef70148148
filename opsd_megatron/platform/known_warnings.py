"""Third-party warnings the command lines silence — each known, understood and not the user's to
act on, with why — so what a run prints is what a user can act on. Everything else still shows,
and the tests never install this: they should see a new warning.

Installed around the ranks by ``opsd-train``, ``opsd-eval`` and ``opsd-demo`` (``silenced``): as
filters in this process and as ``PYTHONWARNINGS`` for the rank processes it starts (megatron-core
warns at import, which happens in the process that starts the ranks' forkserver).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings

# (category, the message's first words, why it is not the user's to act on)
KNOWN = [
    (
        UserWarning,
        "Transformer Engine and Apex are not installed",
        "megatron-core 0.16 says so at import; without them it runs its local implementations, "
        "which are the ones this project uses on CPU (install the te extra on GPUs)",
    ),
    (
        UserWarning,
        "Apex is not installed. Falling back to Torch Norm",
        "our layer specs build megatron's torch norms on purpose (models/layer_specs.py)",
    ),
    (
        UserWarning,
        "full scope is deprecated",
        "megatron-core 0.16's own TransformerConfig default (cuda_graph_scope), not a setting of "
        "ours; no CUDA graphs are captured",
    ),
    (
        UserWarning,
        "When using async grad allreduce it is recommended to set the environment variable "
        "CUDA_DEVICE_MAX_CONNECTIONS",
        "launch/common.sh sets it on GPU nodes; on CPU there are no CUDA streams to order",
    ),
    (
        UserWarning,
        "The .grad attribute of a Tensor that is not a leaf Tensor is being accessed",
        "megatron-core 0.16's optimizer zeroes .grad of its parameter views "
        "(optimizer._zero_grad_group_helper); harmless",
    ),
    (
        FutureWarning,
        "`torch.distributed.reduce_scatter_tensor` is deprecated",
        "megatron-core 0.16's distributed optimizer calls it; torch 2.13 renamed it",
    ),
    (
        FutureWarning,
        "`torch.distributed.all_gather_into_tensor` is deprecated",
        "megatron-core 0.16's distributed optimizer calls it; torch 2.13 renamed it",
    ),
    (
        FutureWarning,
        "`load_state_dict` is deprecated and will be removed in future versions",
        "megatron-core 0.16's dist_checkpointing loads through torch's older API on resume",
    ),
    (
        FutureWarning,
        "Please use DTensor instead and we are deprecating ShardedTensor",
        "megatron-core 0.16's checkpoint format is built on ShardedTensor; torch warns on load",
    ),
]


def pythonwarnings() -> str:
    """The ``PYTHONWARNINGS`` value that silences ``KNOWN`` in a new interpreter."""
    return ",".join(f"ignore:{message}:{category.__name__}" for category, message, _ in KNOWN)


@contextlib.contextmanager
def silenced():
    """``KNOWN`` silenced in this process and the processes started inside; restored after."""
    before = os.environ.get("PYTHONWARNINGS")
    with warnings.catch_warnings():
        for category, message, _ in KNOWN:
            warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [before, pythonwarnings()]))
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("PYTHONWARNINGS", None)
            else:
                os.environ["PYTHONWARNINGS"] = before
