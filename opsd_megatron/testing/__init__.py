"""Helpers for testing distributed code on real CPU processes."""

from opsd_megatron.platform.local_processes import DistributedRunError, run_distributed

__all__ = ["DistributedRunError", "run_distributed"]
