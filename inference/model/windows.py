"""Sliding windows over a volume larger than the model input (and padding for a smaller one)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import product

import numpy as np
import numpy.typing as npt

from radfed.inference.model.taskspec import StudyScore, TaskSpec


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


def gaussian_importance(patch: Sequence[int], sigma_scale: float = 0.125) -> npt.NDArray[np.float32]:
    """Window weights that fall off from the centre (sigma = patch / 8 per axis, as nnU-Net): a window's
    border, where the network sees the least context, counts least where windows overlap."""
    weight = np.ones(tuple(int(p) for p in patch), dtype=np.float64)
    for axis, size in enumerate(patch):
        if size <= 1:
            continue
        position = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
        profile = np.exp(-0.5 * (position / (size * sigma_scale)) ** 2)
        shape = [1, 1, 1]
        shape[axis] = size
        weight = weight * profile.reshape(shape)
    weight /= weight.max()
    return np.asarray(np.maximum(weight, 1e-3), dtype=np.float32)  # never zero: every voxel gets a vote


def _mirrored(run_batch: BatchRunner, axes: Sequence[int]) -> BatchRunner:
    """Test-time mirroring: the mean of the logits over every combination of flips along ``axes``
    (spatial axes of the patch, 0 = slice)."""
    combos: list[tuple[int, ...]] = [()]
    for axis in axes:
        combos += [c + (axis,) for c in combos]

    def run(batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        seg_total: npt.NDArray[np.float32] | None = None
        cls_total: npt.NDArray[np.float32] | None = None
        for combo in combos:
            flip = tuple(2 + a for a in combo)
            seg, cls = run_batch(np.ascontiguousarray(np.flip(batch, flip)) if flip else batch)
            seg = np.flip(seg, flip) if flip else seg
            seg_total = seg if seg_total is None else seg_total + seg
            cls_total = cls if cls_total is None else cls_total + cls
        assert seg_total is not None and cls_total is not None
        return (seg_total / len(combos)).astype(np.float32), (cls_total / len(combos)).astype(np.float32)

    return run


def predict_windows(
    image: npt.NDArray[np.float32],
    patch: Sequence[int],
    run_batch: BatchRunner,
    *,
    overlap: float = 0.5,
    batch_size: int = 4,
    gaussian: bool = True,
    mirror_axes: Sequence[int] = (),
    temperature: float = 1.0,
) -> Prediction:
    """Sliding-window prediction with any backend (ONNX Runtime at the node, torch in federated evaluation):
    segmentation logits blended where windows overlap (Gaussian importance weights, or a plain mean), optional
    mirroring test-time augmentation, the study probability from the most suspicious window's classification
    logit divided by ``temperature`` (calibrated on validation data)."""
    if mirror_axes:
        run_batch = _mirrored(run_batch, [a for a in mirror_axes if patch[a] > 1])
    padded, crop = pad_to(image, patch)
    spatial = padded.shape[1:]
    logits_sum = np.zeros(spatial, dtype=np.float32)
    weight = np.zeros(spatial, dtype=np.float32)
    importance = gaussian_importance(patch) if gaussian else np.ones(tuple(patch), dtype=np.float32)
    study_logit = -np.inf
    tiles = list(windows(spatial, patch, overlap))
    for first in range(0, len(tiles), batch_size):
        chunk = tiles[first : first + batch_size]
        batch = np.stack([padded[(slice(None), *w.slices)] for w in chunk]).astype(np.float32)
        seg, cls = run_batch(batch)
        for w, seg_logits, cls_logit in zip(chunk, seg[:, 0], cls[:, 0], strict=True):
            logits_sum[w.slices] += seg_logits * importance
            weight[w.slices] += importance
            study_logit = max(study_logit, float(cls_logit))
    probability = _sigmoid((logits_sum / np.maximum(weight, 1e-6)).astype(np.float32))[crop]
    study = float(1.0 / (1.0 + np.exp(-np.clip(study_logit / max(temperature, 1e-3), -60, 60))))
    return Prediction(np.ascontiguousarray(probability), study, len(tiles))


def with_context(image: npt.NDArray[np.floating], slices: int) -> npt.NDArray[np.floating]:
    """A (channels, z, y, x) volume with ``slices`` neighbouring slices either side of each slice stacked as
    more channels, nearest slice repeated at the ends: channel block ``j`` holds every channel shifted by
    ``j - slices`` slices. A 2.5-D network's input; training crops the same stacking (PatchSampler)."""
    if slices == 0:
        return image
    depth = image.shape[1]
    return np.concatenate(
        [image[:, np.clip(np.arange(depth) + offset, 0, depth - 1)] for offset in range(-slices, slices + 1)]
    )


def predict_study(
    image: npt.NDArray[np.float32], spec: TaskSpec, run_batch: BatchRunner, *, batch_size: int = 4
) -> Prediction:
    """Sliding-window prediction as the task's inference settings and calibration say (the node and the
    federation's evaluation run exactly this)."""
    settings = spec.inference
    if spec.plan is not None:
        image = with_context(image, spec.plan.network.context_slices)
    return predict_windows(
        image,
        spec.patch_size,
        run_batch,
        overlap=settings.overlap,
        batch_size=batch_size,
        gaussian=settings.gaussian,
        mirror_axes=spec.training.flip_axes if settings.mirror else (),
        temperature=spec.outputs.study_temperature,
    )
