"""opsd-megatron: On-Policy Self-Distillation on megatron-core."""

__version__ = "0.1.0"
