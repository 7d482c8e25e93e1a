"""Output settings chosen on validation studies, never on the test set: the lesion probability threshold,
minimum lesion volume and minimum share of the study's largest lesion that give the best mean per-study Dice
(a study without reference lesions scores 1 when nothing is found, 0 otherwise), and a temperature for the
study probability (minimum negative log-likelihood of the known labels). Without validation studies the
share comes from the training masks alone (``reference_fraction``). They are stored in the artifact's
manifest and used by every node."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from radfed.federation.learning.cohort import TrainingSample
from radfed.federation.learning.evaluation import lesion_components
from radfed.inference.model.windows import Prediction
from radfed.inference.pipeline.lesions import kept_components, protected_volume_mm3, slice_extents

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
# Minimum volumes tried, as multiples of the spec's own (0 keeps every component).
VOLUME_FACTORS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
TEMPERATURES = tuple(float(t) for t in np.geomspace(0.25, 16.0, 25))
# Shares of the study's largest component under which a component is dropped (nnU-Net's "largest component
# only" decision, graded).
FRACTIONS = (0.0, 0.02, 0.05, 0.1, 0.2)
# Without validation studies: the largest share that keeps this much of the reference lesion volume of a
# training study on average (a perfect prediction would lose ~1 % Dice).
KEPT_REFERENCE = 0.98
# The minimum slice extent tried from the reference masks: 2 drops "lesions" seen on one slice only (the
# single-slice specks a 2-D network scatters: on the brain set 94 % of its false-positive components, 35 % of
# its true ones, those mostly fragments). Chosen when the training masks keep KEPT_REFERENCE of their lesion
# volume with it, pooled over studies (one study's annotation fragments should not veto it for the rest).
MULTI_SLICE = 2
MIN_GAIN = 0.01  # mean validation Dice a setting must add over the spec's own to replace it

Setting = tuple[float, float, float]  # threshold, minimum volume, minimum share of the largest


@dataclass(frozen=True)
class Calibration:
    lesion_threshold: float
    min_lesion_volume_mm3: float
    min_lesion_fraction: float
    study_temperature: float
    validation_dice: float
    studies: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "lesion_threshold": self.lesion_threshold,
            "min_lesion_volume_mm3": self.min_lesion_volume_mm3,
            "min_lesion_fraction": self.min_lesion_fraction,
            "study_temperature": self.study_temperature,
            "validation_dice": self.validation_dice,
            "validation_studies": self.studies,
        }


def _study_dice(found: np.ndarray, reference: np.ndarray) -> float:
    predicted = found > 0
    if not reference.any():
        return float(not predicted.any())
    return float(2 * np.logical_and(predicted, reference).sum() / (predicted.sum() + reference.sum()))


def _temperature(predictions: Sequence[Prediction], samples: Sequence[TrainingSample]) -> float:
    pairs = [(p.study_probability, s.label) for p, s in zip(predictions, samples, strict=True) if s.label >= 0]
    labels = {label for _, label in pairs}
    if len(labels) < 2:
        return 1.0  # one class only: nothing to calibrate against
    probabilities = np.clip(np.array([p for p, _ in pairs]), 1e-12, 1 - 1e-12)
    logits = np.log(probabilities / (1 - probabilities))
    y = np.array([label for _, label in pairs], dtype=np.float64)

    def nll(t: float) -> float:
        z = logits / t
        return float(np.mean(np.logaddexp(0, z) - y * z))

    return min(TEMPERATURES, key=nll)


def reference_kept(samples: Sequence[TrainingSample], min_volume_mm3: float) -> tuple[list[float], int]:
    """For each share in ``FRACTIONS``: the sum over studies with reference lesions of the part of their
    lesion volume that the share-of-largest rule keeps (at the task's minimum lesion volume, whose multiple
    protects large components); and how many studies that is. Sums and a count: what a site may send
    (aggregates, additive across sites)."""
    kept = np.zeros(len(FRACTIONS))
    studies = 0
    protected = protected_volume_mm3(min_volume_mm3)
    for sample in samples:
        found, count = ndimage.label(sample.lesions > 0, structure=np.ones((3, 3, 3), dtype=bool))
        if not count:
            continue
        sizes = np.bincount(found.ravel())[1:]
        for i, fraction in enumerate(FRACTIONS):
            share = kept_components(sizes, sample.voxel_mm3, 0.0, fraction, protected_mm3=protected)
            kept[i] += float(sizes[share].sum() / sizes.sum())
        studies += 1
    return kept.tolist(), studies


def fraction_from_kept(kept: Sequence[float], studies: int) -> float:
    """The largest share whose mean kept reference volume is at least ``KEPT_REFERENCE`` (0 without lesions)."""
    if studies <= 0:
        return 0.0
    share = np.asarray(kept, dtype=np.float64) / studies
    return max(f for f, k in zip(FRACTIONS, share, strict=True) if k >= KEPT_REFERENCE)


def reference_fraction(samples: Sequence[TrainingSample], min_volume_mm3: float) -> float:
    """The largest share in ``FRACTIONS`` that, applied to the training studies' own reference masks, keeps
    on average ``KEPT_REFERENCE`` of their lesion voxels: one large lesion with specks around it allows a
    high share, several lesions of similar size a low one, lesions of every size none."""
    return fraction_from_kept(*reference_kept(samples, min_volume_mm3))


def reference_extent_kept(samples: Sequence[TrainingSample], min_volume_mm3: float) -> tuple[float, float]:
    """(volume of the reference lesions spanning at least MULTI_SLICE slices, volume of all reference
    lesions), in mm3 over the studies, lesions being components of at least the minimum volume: sums that
    add up across sites."""
    kept = total = 0.0
    for sample in samples:
        found, count = ndimage.label(sample.lesions > 0, structure=np.ones((3, 3, 3), dtype=bool))
        if not count:
            continue
        volumes = np.bincount(found.ravel())[1:] * sample.voxel_mm3
        lesions = volumes >= min_volume_mm3
        total += float(volumes[lesions].sum())
        kept += float(volumes[lesions & (slice_extents(found, count) >= MULTI_SLICE)].sum())
    return kept, total


def slices_from_kept(kept_mm3: float, total_mm3: float) -> int:
    """MULTI_SLICE when the reference lesions keep KEPT_REFERENCE of their volume with it, else 1 (no rule)."""
    return MULTI_SLICE if total_mm3 > 0 and kept_mm3 >= KEPT_REFERENCE * total_mm3 else 1


def reference_slices(samples: Sequence[TrainingSample], min_volume_mm3: float) -> int:
    """The minimum slice extent the training studies' own reference masks allow (see MULTI_SLICE)."""
    return slices_from_kept(*reference_extent_kept(samples, min_volume_mm3))


def calibrate(
    predictions: Sequence[Prediction],
    samples: Sequence[TrainingSample],
    default_min_volume_mm3: float,
    default_fraction: float = 0.0,
    min_slices: int = 1,
) -> Calibration:
    """The output settings that do best on these validation studies (made with temperature 1), under the
    minimum slice extent already chosen."""
    if not samples:
        raise ValueError("calibration needs validation studies")
    volumes = sorted({f * default_min_volume_mm3 for f in VOLUME_FACTORS} | {0.0})
    fractions = sorted(set(FRACTIONS) | {default_fraction})
    scores_by_setting: dict[Setting, float] = {}
    for threshold in THRESHOLDS:
        components = [
            lesion_components(p.probability, threshold, 0.0, s.voxel_mm3)
            for p, s in zip(predictions, samples, strict=True)
        ]
        sizes = [np.bincount(c.ravel())[1:] for c in components]
        extents = [slice_extents(c, len(size)) for c, size in zip(components, sizes, strict=True)]
        for volume in volumes:
            for fraction in fractions:
                scores = []
                for found, size, extent, sample in zip(components, sizes, extents, samples, strict=True):
                    keep = kept_components(
                        size, sample.voxel_mm3, volume, fraction, extents=extent, min_slices=min_slices
                    )
                    kept = np.flatnonzero(keep) + 1
                    scores.append(_study_dice(np.isin(found, kept), sample.lesions > 0))
                scores_by_setting[(threshold, volume, fraction)] = float(np.mean(scores))
    # A few validation studies decide little: leave the default settings only for a clear gain, and among
    # equal scores take the setting nearest to them (a minimum volume fitted to three studies would delete
    # any smaller true lesion in the next).
    default = (0.5, default_min_volume_mm3, default_fraction)
    baseline = scores_by_setting.get(default, -1.0)

    def distance(setting: Setting) -> float:
        threshold, volume, fraction = setting
        return (
            abs(threshold - 0.5)
            + abs(math.log((volume + 1.0) / (default_min_volume_mm3 + 1.0)))
            + abs(fraction - default_fraction) * 10
        )

    best_score = max(scores_by_setting.values())
    chosen = default
    if best_score > baseline + MIN_GAIN:
        chosen = min((s for s, v in scores_by_setting.items() if v >= best_score - 1e-9), key=distance)
    temperature = _temperature(predictions, samples)
    return Calibration(
        chosen[0],
        chosen[1],
        chosen[2],
        temperature if math.isfinite(temperature) else 1.0,
        scores_by_setting[chosen],
        len(samples),
    )
