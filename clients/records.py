"""Typed reads of a message's ConfigRecord: Flower types each value as a scalar or a list of them,
and the train config's instructions (`lora-rank`, `prune-target`, ...) are single values."""

from __future__ import annotations

from flwr.app import ConfigRecord
from flwr.app.typing import ConfigScalar


def scalar(config: ConfigRecord, key: str, default: ConfigScalar | None = None) -> ConfigScalar:
    """`config[key]`, or `default` (when given) where `key` is absent; TypeError for a list."""
    value = config[key] if default is None else config.get(key, default)
    if isinstance(value, list):
        raise TypeError(f"config `{key}` must be a single value, got a list: {value!r}")
    return value
