"""Typed reading of Flower records (their values are unions of every record type)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict


def number(record: Mapping[str, Any], key: str, default: float | None = None) -> float:
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, got {value!r}")
    return float(value)


def integer(record: Mapping[str, Any], key: str, default: int | None = None) -> int:
    return int(number(record, key, default))


def text(record: Mapping[str, Any], key: str, default: str = "") -> str:
    value = record.get(key, default)
    if not isinstance(value, str):
        raise ValueError(f"{key} must be text, got {value!r}")
    return value


def arrays(content: RecordDict, key: str = "arrays") -> list[np.ndarray]:
    record = content[key]
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"{key} is not an ArrayRecord")
    return list(record.to_numpy_ndarrays())


def metrics(content: RecordDict, key: str = "metrics") -> dict[str, float | list[float]]:
    record = content[key]
    if not isinstance(record, MetricRecord):
        raise ValueError(f"{key} is not a MetricRecord")
    values: dict[str, float | list[float]] = {}
    for name, value in record.items():
        if isinstance(value, list):
            values[name] = [float(v) for v in value]
        elif isinstance(value, int | float):
            values[name] = float(value)
    return values


HARMONISATION_PREFIX = "harmonisation."


def landmarks(config: Mapping[str, Any]) -> dict[str, list[float]] | None:
    """The federation's reference landmarks per channel (``harmonisation.<channel>``), if the job has them."""
    found = {
        key.removeprefix(HARMONISATION_PREFIX): [float(v) for v in value]
        for key, value in config.items()
        if key.startswith(HARMONISATION_PREFIX) and isinstance(value, list)
    }
    return found or None


def files(record: Any) -> dict[str, bytes]:
    """A ConfigRecord of file name -> bytes (the rolled-out artifact)."""
    if not isinstance(record, ConfigRecord):
        raise ValueError("the artifact is not a ConfigRecord")
    out = {name: value for name, value in record.items() if isinstance(value, bytes)}
    if not out:
        raise ValueError("the artifact record holds no file")
    return out
