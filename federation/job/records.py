"""Typed reading of Flower records (their values are unions of every record type), and the packed model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict


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
    """The model's tensors, from the packed form (``pack_arrays``) or one array per tensor."""
    record = content[key]
    if not isinstance(record, ArrayRecord):
        raise ValueError(f"{key} is not an ArrayRecord")
    if set(record.keys()) != {PACKED, SHAPES}:
        return list(record.to_numpy_ndarrays())
    vector, header = record[PACKED].numpy(), record[SHAPES].numpy().astype(np.int64).tolist()
    out, offset, position = [], 0, 1
    for _ in range(header[0]):
        ndim = header[position]
        shape = tuple(header[position + 1 : position + 1 + ndim])
        position += 1 + ndim
        size = int(np.prod(shape, dtype=np.int64))
        out.append(vector[offset : offset + size].reshape(shape))
        offset += size
    if offset != vector.size:
        raise ValueError(f"{key}: {vector.size} packed values for shapes that hold {offset}")
    return out


# A secure round's config (federation/coordinator/secure_aggregation.py) carries the round's max weight: a site masks
# its update with weight min(its training studies, this) (1: every site weighs the same).
SECURE_MAX_WEIGHT = "secure-aggregation-max-weight"

# Flower stores and moves every array of a message as its own object: one HTTP request per tensor on each
# hop (ServerApp -> SuperLink -> SuperNode -> ClientApp and back). The model goes as one float32 vector
# plus its shapes instead: 2 objects in place of 50 (see README, round cost).
PACKED, SHAPES = "model", "shapes"


def pack_arrays(tensors: Sequence[np.ndarray]) -> ArrayRecord:
    """One ArrayRecord holding all tensors as one vector (float32 models; others go one array each)."""
    if not tensors or any(np.asarray(t).dtype != np.float32 for t in tensors):
        return ArrayRecord([np.asarray(t) for t in tensors])
    header = [len(tensors)]
    for t in tensors:
        header += [t.ndim, *t.shape]
    vector = np.concatenate([np.asarray(t).ravel() for t in tensors])
    return ArrayRecord({PACKED: Array(vector), SHAPES: Array(np.asarray(header, dtype=np.int64))})


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
