"""Sliding windows: Gaussian blending, overlap, mirroring, calibrated study temperature."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from radfed.inference.model.windows import gaussian_importance, predict_windows


def _constant(value: float):  # type: ignore[no-untyped-def]
    def run(batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        return np.full((batch.shape[0], 1, *batch.shape[2:]), value, np.float32), np.full((batch.shape[0], 1), 2.0)

    return run


def test_gaussian_weights_peak_in_the_centre_and_never_vanish() -> None:
    weights = gaussian_importance((1, 32, 32))
    assert weights.shape == (1, 32, 32) and weights.max() == pytest.approx(1.0)
    assert weights[0, 15, 15] > weights[0, 8, 8] > weights[0, 0, 0] > 0
    assert np.allclose(weights, weights[:, ::-1, ::-1])


def test_blending_keeps_a_constant_prediction_constant() -> None:
    image = np.zeros((1, 3, 70, 90), np.float32)
    for gaussian in (True, False):
        prediction = predict_windows(image, (1, 32, 32), _constant(1.5), overlap=0.5, gaussian=gaussian)
        assert prediction.probability.shape == (3, 70, 90)
        assert np.allclose(prediction.probability, 1 / (1 + np.exp(-1.5)), atol=1e-5)
    more = predict_windows(image, (1, 32, 32), _constant(0.0), overlap=0.5)
    fewer = predict_windows(image, (1, 32, 32), _constant(0.0), overlap=0.0)
    assert more.windows > fewer.windows


def test_mirroring_averages_flipped_predictions() -> None:
    """A model that sees only the left half: mirrored along the columns, both halves get half its vote."""

    def left_only(batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        seg = np.zeros((batch.shape[0], 1, *batch.shape[2:]), np.float32)
        seg[..., : batch.shape[-1] // 2] = 4.0
        return seg, np.zeros((batch.shape[0], 1), np.float32)

    image = np.zeros((1, 1, 16, 16), np.float32)
    plain = predict_windows(image, (1, 16, 16), left_only, overlap=0.0)
    mirrored = predict_windows(image, (1, 16, 16), left_only, overlap=0.0, mirror_axes=(2,))
    assert plain.probability[0, 0, 0] > 0.9 and plain.probability[0, 0, -1] == pytest.approx(0.5)
    assert np.allclose(mirrored.probability, 1 / (1 + np.exp(-2.0)))


def test_the_study_temperature_softens_the_classification() -> None:
    image = np.zeros((1, 1, 16, 16), np.float32)
    sharp = predict_windows(image, (1, 16, 16), _constant(0.0)).study_probability
    soft = predict_windows(image, (1, 16, 16), _constant(0.0), temperature=4.0).study_probability
    assert sharp == pytest.approx(1 / (1 + np.exp(-2.0))) and soft == pytest.approx(1 / (1 + np.exp(-0.5)))
