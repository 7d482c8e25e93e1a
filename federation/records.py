"""Typed reading of Flower records (their values are unions of every record type)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, MetricRecord, RecordDict


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


def metrics(content: RecordDict, key: str = "metrics") -> dict[str, float]:
    record = content[key]
    if not isinstance(record, MetricRecord):
        raise ValueError(f"{key} is not a MetricRecord")
    return {name: float(value) for name, value in record.items() if isinstance(value, int | float)}
