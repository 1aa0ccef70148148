"""Stand-ins for megatron's transformer-engine linears, for machines without TE.

They reproduce what LoRA reads and how the layers compute, as written in megatron-core 0.16.1
``extensions/transformer_engine.py`` (``TELinear`` / ``TERowParallelLinear`` /
``TELayerNormColumnParallelLinear``, unchanged in 0.19) over transformer-engine 2.9
``pytorch/module/linear.py`` and ``layernorm_linear.py``:

* no ``input_size`` / ``output_size``; TE's ``in_features`` / ``out_features`` are *per partition*
  (divided by ``tp_size`` along the split dimension), ``parallel_mode`` is "column" or "row";
* the weight carries ``tensor_model_parallel`` / ``partition_dim`` (TE's
  ``set_tensor_model_parallel_attributes``: dim 1 for row, 0 otherwise);
* the LayerNorm-fused linear owns ``layer_norm_weight`` (and ``layer_norm_bias`` for LayerNorm),
  ``eps``, ``normalization``, ``zero_centered_gamma``, and normalises its input itself (in fp32);
* ``forward(x)`` returns ``(out, None)``; neither class is a megatron ``RowParallelLinear``.
"""

from __future__ import annotations

import torch


class TELinearStandIn(torch.nn.Module):
    def __init__(self, in_size, out_size, parallel_mode, config, groups, weight_full):
        super().__init__()
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        tp_size, rank = groups.tp_size, groups.tp_rank
        self.config, self.parallel_mode, self.tp_size = config, parallel_mode, tp_size
        self.te_return_bias, self.use_bias = False, False
        dim = 1 if parallel_mode == "row" else 0
        self.in_features = in_size // tp_size if parallel_mode == "row" else in_size
        self.out_features = out_size // tp_size if parallel_mode == "column" else out_size
        shard = weight_full.chunk(tp_size, dim=dim)[rank].clone()
        self.weight = torch.nn.Parameter(shard)
        set_tensor_model_parallel_attributes(self.weight, True, dim, 1)

    def _project(self, x, weight):
        from megatron.core import tensor_parallel as mtp

        if self.parallel_mode == "column":
            return torch.nn.functional.linear(mtp.copy_to_tensor_model_parallel_region(x), weight)
        y = torch.nn.functional.linear(x, weight)
        return mtp.reduce_from_tensor_model_parallel_region(y)

    def forward(self, x):
        return self._project(x, self.weight), None


class TELayerNormColumnParallelLinearStandIn(TELinearStandIn):
    def __init__(self, in_size, out_size, config, groups, weight_full, *, zero_centered_gamma):
        super().__init__(in_size, out_size, "column", config, groups, weight_full)
        self.normalization, self.eps = "RMSNorm", 1e-6
        self.zero_centered_gamma = zero_centered_gamma
        gamma = torch.linspace(0.5, 1.5, in_size)
        self.layer_norm_weight = torch.nn.Parameter(gamma - 1 if zero_centered_gamma else gamma)

    def normalised(self, x):
        gamma = self.layer_norm_weight + 1 if self.zero_centered_gamma else self.layer_norm_weight
        rms = x.float().pow(2).mean(-1, keepdim=True).add(self.eps).rsqrt()
        return (x.float() * rms * gamma.float()).to(x.dtype)

    def forward(self, x):
        return self._project(self.normalised(x), self.weight), None
