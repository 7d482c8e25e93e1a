"""Sliding windows over a volume larger than the model input (and padding for a smaller one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
import numpy.typing as npt

from radfed.inference.taskspec import StudyScore


def axis_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Window starts along one axis: the first at 0, the last flush with the end, evenly spaced."""
    if size <= patch:
        return [0]
    stride = max(1, int(patch * (1.0 - overlap)))
    count = int(np.ceil((size - patch) / stride)) + 1
    return [round(i * (size - patch) / (count - 1)) for i in range(count)]


@dataclass(frozen=True)
class Window:
    """Where a patch sits in the (padded) volume."""

    start: tuple[int, int, int]
    patch: tuple[int, int, int]

    @property
    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + p) for s, p in zip(self.start, self.patch, strict=True))  # type: ignore[return-value]


def pad_to(volume: npt.NDArray[np.float32], patch: Sequence[int]) -> tuple[npt.NDArray[np.float32], tuple[slice, ...]]:
    """Pad the trailing spatial axes of (C, D, H, W) up to the patch size (centred); also return the
    slices that crop the original region back out."""
    spatial = volume.shape[-3:]
    before = [max(0, (p - s) // 2) for s, p in zip(spatial, patch, strict=True)]
    after = [max(0, p - s - b) for s, p, b in zip(spatial, patch, before, strict=True)]
    pads = [(0, 0)] * (volume.ndim - 3) + list(zip(before, after, strict=True))
    padded = np.pad(volume, pads, mode="constant")
    crop = tuple(slice(b, b + s) for b, s in zip(before, spatial, strict=True))
    return padded, crop


def windows(shape: Sequence[int], patch: Sequence[int], overlap: float = 0.5) -> Iterator[Window]:
    """All windows tiling a (padded) spatial shape with the given overlap."""
    starts = [axis_starts(s, p, overlap) for s, p in zip(shape, patch, strict=True)]
    for start in product(*starts):
        yield Window((start[0], start[1], start[2]), (patch[0], patch[1], patch[2]))


BatchRunner = Callable[[npt.NDArray[np.float32]], tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]]


@dataclass(frozen=True)
class Prediction:
    probability: npt.NDArray[np.float32]  # lesion probability on the model grid (slices, rows, columns)
    study_probability: float  # the most suspicious window's classification probability
    windows: int

    def study_score(self, rule: StudyScore) -> float:
        """The study's probability under the task's rule (taskspec.StudyScore)."""
        lesion = float(self.probability.max()) if self.probability.size else 0.0
        if rule is StudyScore.LESION:
            return lesion
        if rule is StudyScore.MAX:
            return max(lesion, self.study_probability)
        return self.study_probability


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(x, -60, 60))), dtype=np.float32)


def predict_windows(
    image: npt.NDArray[np.float32],
    patch: Sequence[int],
    run_batch: BatchRunner,
    *,
    overlap: float = 0.25,
    batch_size: int = 4,
) -> Prediction:
    """Sliding-window prediction with any backend (ONNX Runtime at the node, torch in federated evaluation):
    segmentation logits averaged where windows overlap, the study probability from the most suspicious window."""
    padded, crop = pad_to(image, patch)
    spatial = padded.shape[1:]
    logits_sum = np.zeros(spatial, dtype=np.float32)
    weight = np.zeros(spatial, dtype=np.float32)
    study = 0.0
    tiles = list(windows(spatial, patch, overlap))
    for first in range(0, len(tiles), batch_size):
        chunk = tiles[first : first + batch_size]
        batch = np.stack([padded[(slice(None), *w.slices)] for w in chunk]).astype(np.float32)
        seg, cls = run_batch(batch)
        for w, seg_logits, cls_logit in zip(chunk, seg[:, 0], cls[:, 0], strict=True):
            logits_sum[w.slices] += seg_logits
            weight[w.slices] += 1.0
            study = max(study, float(1.0 / (1.0 + np.exp(-float(cls_logit)))))
    probability = _sigmoid((logits_sum / np.maximum(weight, 1.0)).astype(np.float32))[crop]
    return Prediction(np.ascontiguousarray(probability), study, len(tiles))
