"""Update compression: what a site sends in place of its full model (run-config key ``compression``).

A compressed reply carries the site's *update*, its locally trained model minus the round's global model:

- ``fp16``: the update cast to half precision (2 bytes a value; values beyond fp16's range are clipped);
- ``int8``: per-tensor symmetric quantisation, ``q = round(u / s)`` in [-127, 127] with one float32 scale
  ``s = max|u| / 127`` a tensor (1 byte a value; the error is at most ``s / 2``);
- ``topk:F``: per tensor, the fraction F of entries largest in magnitude, as float32 values and uint32
  indices (8 bytes a kept value), with error feedback (Stich et al., 2018; Karimireddy et al., 2019): what a
  round leaves out is kept at the site (``ErrorFeedback``) and added to the next round's update, so nothing is
  lost, only sent later.

The site compresses after training, so with DP-SGD after the noise: the update is already private and
compressing it is post-processing, which costs no privacy budget. The coordinator decompresses every reply back
to full arrays (``restore_reply``) before screening and aggregation, which thus still see each site's update.

A payload is a short list of arrays (a header, then one or two data arrays) that Flower's records, the site
worker's frames and the site's stored round reply all carry as they are. Pure numpy: no torch, no flwr.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt

Arrays = list[npt.NDArray[np.floating]]

_MAGIC = 0x52_46_55_50  # "RFUP": a radfed update payload
_FORMAT = 1
_FP16_MAX = float(np.finfo(np.float16).max)


class Scheme(StrEnum):
    NONE = "none"
    FP16 = "fp16"
    INT8 = "int8"
    TOPK = "topk"


_CODES = {Scheme.FP16: 1, Scheme.INT8: 2, Scheme.TOPK: 3}
_SCHEMES = {code: scheme for scheme, code in _CODES.items()}
CHOICES = "none, fp16, int8 or topk:F with 0 < F <= 1 (e.g. topk:0.05)"


@dataclass(frozen=True)
class Compression:
    """A compression setting: the scheme, and for top-k the fraction of each tensor's entries kept."""

    scheme: Scheme = Scheme.NONE
    fraction: float = 1.0

    @classmethod
    def parse(cls, text: str) -> Compression:
        """``none``, ``fp16``, ``int8`` or ``topk:F``; anything else raises ``ValueError`` listing them."""
        name, _, argument = text.strip().lower().partition(":")
        try:
            scheme = Scheme(name)
        except ValueError:
            raise ValueError(f"must be {CHOICES}, got {text!r}") from None
        if scheme is not Scheme.TOPK:
            if argument:
                raise ValueError(f"must be {CHOICES}, got {text!r} ({scheme} takes no argument)")
            return cls(scheme)
        try:
            fraction = float(argument)
        except ValueError:
            raise ValueError(f"must be {CHOICES}, got {text!r}") from None
        if not 0 < fraction <= 1:  # also refuses nan
            raise ValueError(f"must be {CHOICES}, got {text!r} (the fraction kept is out of range)")
        return cls(scheme, fraction)

    def __str__(self) -> str:
        return f"topk:{self.fraction:g}" if self.scheme is Scheme.TOPK else str(self.scheme)

    @property
    def error_feedback(self) -> bool:
        """Whether the site keeps what it did not send (top-k leaves most of each update for later)."""
        return self.scheme is Scheme.TOPK


NONE = Compression()


def compress(
    update: Sequence[npt.NDArray[np.floating]], compression: Compression, residual: Sequence[np.ndarray] | None = None
) -> tuple[list[np.ndarray], Arrays | None]:
    """The payload for ``update`` (the local model minus the global one), and for top-k the residual to carry
    into the next round (``update + residual`` minus what was sent); ``residual`` is what the previous round
    left (top-k only; ignored otherwise)."""
    if compression.scheme is Scheme.NONE:
        raise ValueError("compression none sends the model itself, not a payload")
    tensors = [np.asarray(u, dtype=np.float32) for u in update]
    header = [_MAGIC, _FORMAT, _CODES[compression.scheme], len(tensors)]
    for t in tensors:
        header += [t.ndim, *t.shape]
    payload: list[np.ndarray] = [np.asarray(header, dtype=np.int64)]
    flat = np.concatenate([t.ravel() for t in tensors]) if tensors else np.zeros(0, np.float32)
    if compression.scheme is Scheme.FP16:
        return payload + [np.clip(flat, -_FP16_MAX, _FP16_MAX).astype(np.float16)], None
    if compression.scheme is Scheme.INT8:
        scales = np.asarray([float(np.max(np.abs(t))) / 127 if t.size else 0.0 for t in tensors], dtype=np.float32)
        parts = []
        for t, scale in zip(tensors, scales, strict=True):
            ratio = t.astype(np.float64) / float(scale) if scale > 0 else np.zeros(t.size)
            parts.append(np.clip(np.rint(ratio), -127, 127).astype(np.int8).ravel())
        quantised = np.concatenate(parts) if parts else np.zeros(0, np.int8)
        return payload + [quantised, scales], None
    return _topk(payload, tensors, compression.fraction, residual)


def _topk(
    payload: list[np.ndarray], tensors: list[np.ndarray], fraction: float, residual: Sequence[np.ndarray] | None
) -> tuple[list[np.ndarray], Arrays]:
    if residual is not None and [r.shape for r in residual] != [t.shape for t in tensors]:
        raise ValueError("the residual's shapes do not match the update's")
    total = sum(t.size for t in tensors)
    if total >= 2**32:
        raise ValueError(f"top-k indexes a model of at most 2**32 values, not {total}")
    indices, values, left, offset = [], [], [], 0
    for i, t in enumerate(tensors):
        carried = (t + np.asarray(residual[i], dtype=np.float32)).ravel() if residual is not None else t.ravel()
        k = min(carried.size, max(1, math.ceil(fraction * carried.size))) if carried.size else 0
        # argpartition keeps the k largest magnitudes; sorting the indices makes the payload deterministic
        kept = np.sort(np.argpartition(-np.abs(carried), k - 1)[:k]) if 0 < k < carried.size else np.arange(k)
        indices.append((kept + offset).astype(np.uint32))
        values.append(carried[kept])
        rest = carried.copy()
        rest[kept] = 0.0
        left.append(rest.reshape(t.shape))
        offset += carried.size
    empty_i, empty_v = np.zeros(0, np.uint32), np.zeros(0, np.float32)
    sent_i = np.concatenate(indices) if indices else empty_i
    sent_v = np.concatenate(values).astype(np.float32) if values else empty_v
    return payload + [sent_i, sent_v], left


def is_payload(arrays: Sequence[np.ndarray]) -> bool:
    """Whether ``arrays`` is a compressed update (``compress``) rather than a model's tensors."""
    if not arrays:
        return False
    head = np.asarray(arrays[0])
    return head.dtype == np.int64 and head.ndim == 1 and head.size >= 4 and int(head[0]) == _MAGIC


def decompress(payload: Sequence[np.ndarray]) -> Arrays:
    """The update a payload carries, as float32 arrays of the update's shapes."""
    if not is_payload(payload):
        raise ValueError("not a compressed update (no payload header)")
    header = np.asarray(payload[0]).tolist()
    if header[1] != _FORMAT or header[2] not in _SCHEMES:
        raise ValueError(f"unknown payload format {header[1]} or scheme code {header[2]}")
    scheme, shapes, position = _SCHEMES[header[2]], [], 4
    for _ in range(header[3]):
        ndim = header[position]
        shapes.append(tuple(header[position + 1 : position + 1 + ndim]))
        position += 1 + ndim
    sizes = [math.prod(s) for s in shapes]
    total = sum(sizes)
    expected_arrays = 2 if scheme is Scheme.FP16 else 3
    if len(payload) != expected_arrays:
        raise ValueError(f"a {scheme} payload has {expected_arrays} arrays, got {len(payload)}")
    if scheme is Scheme.FP16:
        flat = _sized(payload[1], total, "fp16 values").astype(np.float32)
    elif scheme is Scheme.INT8:
        quantised = _sized(payload[1], total, "int8 values")
        scales = _sized(payload[2], len(shapes), "int8 scales").astype(np.float32)
        flat = quantised.astype(np.float32) * np.repeat(scales, sizes)
    else:
        indices, values = np.asarray(payload[1]), np.asarray(payload[2])
        if indices.shape != values.shape or (indices.size and int(indices.max()) >= total):
            raise ValueError("top-k indices and values do not fit the update")
        flat = np.zeros(total, dtype=np.float32)
        flat[indices.astype(np.int64)] = values.astype(np.float32)
    out, start = [], 0
    for shape, size in zip(shapes, sizes, strict=True):
        out.append(flat[start : start + size].reshape(shape))
        start += size
    return out


def _sized(array: np.ndarray, size: int, what: str) -> np.ndarray:
    array = np.asarray(array).ravel()
    if array.size != size:
        raise ValueError(f"{what}: {array.size} values for an update of {size}")
    return array


def payload_nbytes(arrays: Sequence[np.ndarray]) -> int:
    """What a reply's arrays weigh (a payload or a full model)."""
    return int(sum(np.asarray(a).nbytes for a in arrays))


def compress_reply(
    compression: Compression,
    global_arrays: Sequence[np.ndarray],
    local_arrays: Sequence[np.ndarray],
    feedback: ErrorFeedback | None = None,
    server_round: int = 0,
) -> list[np.ndarray]:
    """A site's reply: the trained model itself without compression, otherwise the compressed update
    (``local - global``); with top-k, ``feedback`` adds what earlier rounds left and keeps what this one leaves."""
    if compression.scheme is Scheme.NONE:
        return list(local_arrays)
    update = [
        np.asarray(local, dtype=np.float32) - np.asarray(start, dtype=np.float32)
        for start, local in zip(global_arrays, local_arrays, strict=True)
    ]
    residual = feedback.residual_for(server_round, update) if feedback and compression.error_feedback else None
    payload, left = compress(update, compression, residual)
    if feedback is not None and left is not None:
        feedback.save(server_round, residual, left)
    return payload


def restore_reply(
    compression: Compression, global_arrays: Sequence[np.ndarray], reply: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """The site's model from its reply (at the coordinator): the round's global model plus the decompressed
    update, in the global model's dtypes. A reply that does not match the job's setting raises ``ValueError``."""
    if compression.scheme is Scheme.NONE:
        if is_payload(reply):
            raise ValueError("a compressed reply in a job without compression")
        return list(reply)
    if not is_payload(reply):
        raise ValueError(f"an uncompressed reply in a job with compression {compression}")
    update = decompress(reply)
    if [u.shape for u in update] != [np.shape(g) for g in global_arrays]:
        raise ValueError("the reply's update does not fit the global model's shapes")
    out = []
    for start, delta in zip(global_arrays, update, strict=True):
        start = np.asarray(start)
        restored = start.astype(np.float64) + delta
        out.append(np.rint(restored).astype(start.dtype) if start.dtype.kind in "iub" else restored.astype(start.dtype))
    return out


RESIDUAL = "update-residual.npz"


class ErrorFeedback:
    """What top-k left unsent, kept in the site's job folder between rounds.

    The file holds the round it was written for with the residual before and after that round, so that a
    round trained again (a crash before the reply was stored, or a different global model for the same round)
    starts from the same residual as the first time rather than from its own leftovers. A stored round reply
    that is sent again (replay) does not touch the residual."""

    def __init__(self, job_dir: Path) -> None:
        self.path = job_dir / RESIDUAL

    def residual_for(self, server_round: int, update: Sequence[np.ndarray]) -> Arrays | None:
        """The residual to add to ``server_round``'s update; None (nothing carried) for the job's first
        compressed round, after a coordinator that went back to an earlier round, or for other shapes."""
        if not self.path.is_file():
            return None
        with np.load(self.path, allow_pickle=False) as stored:
            header = json.loads(str(stored["header"]))
            if header["round"] < server_round:
                part = "after"
            elif header["round"] == server_round and header["before"]:
                part = "before"
            else:
                return None
            residual = [stored[f"{part}_{i}"] for i in range(header["arrays"])]
        if [r.shape for r in residual] != [np.shape(u) for u in update]:
            return None
        return residual

    def save(self, server_round: int, before: Sequence[np.ndarray] | None, after: Sequence[np.ndarray]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = json.dumps({"round": server_round, "arrays": len(after), "before": before is not None})
        stored = {f"after_{i}": np.asarray(a, dtype=np.float32) for i, a in enumerate(after)}
        stored |= {f"before_{i}": np.asarray(b, dtype=np.float32) for i, b in enumerate(before or [])}
        partial = self.path.with_name(RESIDUAL + ".partial.npz")
        np.savez(partial, header=np.asarray(header), **stored)  # type: ignore[arg-type]
        partial.replace(self.path)
