"""Output settings chosen on validation studies, never on the test set: the lesion probability threshold
and minimum lesion volume that give the best mean per-study Dice (a study without reference lesions scores
1 when nothing is found, 0 otherwise), and a temperature for the study probability (minimum negative
log-likelihood of the known labels). They are stored in the artifact's manifest and used by every node."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from radfed.federation.cohort import TrainingSample
from radfed.federation.evaluation import lesion_components
from radfed.inference.windows import Prediction

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
# Minimum volumes tried, as multiples of the spec's own (0 keeps every component).
VOLUME_FACTORS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
TEMPERATURES = tuple(float(t) for t in np.geomspace(0.25, 16.0, 25))
MIN_GAIN = 0.01  # mean validation Dice a setting must add over the spec's own to replace it


@dataclass(frozen=True)
class Calibration:
    lesion_threshold: float
    min_lesion_volume_mm3: float
    study_temperature: float
    validation_dice: float
    studies: int

    def as_dict(self) -> dict[str, float | int]:
        return {
            "lesion_threshold": self.lesion_threshold,
            "min_lesion_volume_mm3": self.min_lesion_volume_mm3,
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


def calibrate(
    predictions: Sequence[Prediction],
    samples: Sequence[TrainingSample],
    default_min_volume_mm3: float,
) -> Calibration:
    """The output settings that do best on these validation studies (made with temperature 1)."""
    if not samples:
        raise ValueError("calibration needs validation studies")
    volumes = sorted({f * default_min_volume_mm3 for f in VOLUME_FACTORS} | {0.0})
    scores_by_setting: dict[tuple[float, float], float] = {}
    for threshold in THRESHOLDS:
        components = [
            lesion_components(p.probability, threshold, 0.0, s.voxel_mm3)
            for p, s in zip(predictions, samples, strict=True)
        ]
        sizes = [np.bincount(c.ravel()) * s.voxel_mm3 for c, s in zip(components, samples, strict=True)]
        for volume in volumes:
            scores = []
            for found, size, sample in zip(components, sizes, samples, strict=True):
                kept = np.flatnonzero(size >= volume)
                scores.append(_study_dice(np.isin(found, kept[kept > 0]), sample.lesions > 0))
            scores_by_setting[(threshold, volume)] = float(np.mean(scores))
    # A few validation studies decide little: leave the spec's settings only for a clear gain, and among equal
    # scores take the setting nearest to them (a minimum volume fitted to three studies would delete any
    # smaller true lesion in the next).
    default = (0.5, default_min_volume_mm3)
    baseline = scores_by_setting.get(default, -1.0)

    def distance(setting: tuple[float, float]) -> float:
        threshold, volume = setting
        return abs(threshold - 0.5) + abs(math.log((volume + 1.0) / (default_min_volume_mm3 + 1.0)))

    best_score = max(scores_by_setting.values())
    chosen = default
    if best_score > baseline + MIN_GAIN:
        chosen = min((s for s, v in scores_by_setting.items() if v >= best_score - 1e-9), key=distance)
    temperature = _temperature(predictions, samples)
    return Calibration(
        chosen[0],
        chosen[1],
        temperature if math.isfinite(temperature) else 1.0,
        scores_by_setting[chosen],
        len(samples),
    )
