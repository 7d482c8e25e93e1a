"""Output settings chosen on validation studies."""

from __future__ import annotations

import numpy as np
import pytest

from radfed.federation.calibration import calibrate
from radfed.federation.cohort import UNKNOWN_LABEL, TrainingSample
from radfed.inference.windows import Prediction


def _study(key: str, label: int, lesion: bool, speck: bool, score: float) -> tuple[TrainingSample, Prediction]:
    truth = np.zeros((4, 32, 32), np.uint8)
    probability = np.zeros((4, 32, 32), np.float32)
    if lesion:
        truth[1:3, 8:16, 8:16] = 1
        probability[1:3, 8:16, 8:16] = 0.45  # a model that is under-confident on lesions
    if speck:
        probability[0, 28:30, 28:30] = 0.9  # small, confident false positives
    sample = TrainingSample(key, np.zeros((1, 4, 32, 32), np.float16), truth, label, voxel_mm3=1.0)
    return sample, Prediction(probability, score, 1)


def test_the_threshold_and_minimum_volume_fit_the_validation_studies() -> None:
    pairs = [_study(f"s{i}", i % 2, lesion=i % 2 == 1, speck=True, score=0.9 if i % 2 else 0.2) for i in range(6)]
    samples, predictions = [p[0] for p in pairs], [p[1] for p in pairs]
    calibration = calibrate(predictions, samples, default_min_volume_mm3=2.0)
    assert calibration.lesion_threshold < 0.45  # finds the under-confident lesions
    assert 4 < calibration.min_lesion_volume_mm3 <= 128  # drops the 4-voxel specks, keeps the 128-voxel lesions
    assert calibration.validation_dice == pytest.approx(1.0)
    # separable scores: a low temperature sharpens them
    assert calibration.study_temperature < 1.0


def test_unknown_labels_do_not_calibrate_the_study_probability() -> None:
    pairs = [_study(f"s{i}", UNKNOWN_LABEL, lesion=True, speck=False, score=0.7) for i in range(3)]
    calibration = calibrate([p[1] for p in pairs], [p[0] for p in pairs], default_min_volume_mm3=1.0)
    assert calibration.study_temperature == 1.0
