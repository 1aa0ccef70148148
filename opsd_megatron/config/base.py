"""What every config section shares: the error type and the simple range check."""

from __future__ import annotations

from opsd_megatron.errors import ConfigError

__all__ = ["ConfigError", "at_least"]


def at_least(key: str, value, low) -> None:
    if value < low:
        raise ConfigError(f"{key} must be >= {low}, got {value}")
