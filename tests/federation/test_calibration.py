"""Output settings chosen on validation studies."""

from __future__ import annotations

import numpy as np
import pytest

from radfed.federation.coordinator.checkpoint import calibration_section
from radfed.federation.lab.experiments import cross_calibrated
from radfed.federation.learning.calibration import (
    FRACTIONS,
    GRID_LENGTH,
    MULTI_SLICE,
    TEMPERATURES,
    CalibrationSums,
    PooledSums,
    calibrate,
    reference_extent_kept,
    reference_fraction,
    reference_kept,
    reference_slices,
)
from radfed.federation.learning.cohort import UNKNOWN_LABEL, TrainingSample
from radfed.federation.learning.evaluation import EvaluationCounts, predictions_counts
from radfed.federation.learning.messages import (
    CALIBRATION_GRID_LENGTH,
    LESION_KEPT_LENGTH,
    TEMPERATURE_COUNT,
    allowed_metrics,
)
from radfed.inference.model.taskspec import load_task_spec
from radfed.inference.model.windows import Prediction
from radfed.inference.pipeline.lesions import kept_components


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


@pytest.mark.parametrize(("inside", "halo", "best"), [(0.95, 0.75, 0.8), (0.25, 0.0, 0.2)])
def test_the_threshold_grid_reaches_a_model_that_over_or_under_segments(
    inside: float, halo: float, best: float
) -> None:
    """A model sure of its lesions but with a 0.75 halo around them wants 0.8; one that gives its lesions only
    0.25 wants 0.2: both beyond the 0.3-0.7 the grid stopped at before session 35."""
    pairs = []
    for i in range(6):
        sample, _ = _study(f"s{i}", 1, lesion=True, speck=False, score=0.9)
        probability = np.zeros((4, 32, 32), np.float32)
        probability[1:3, 6:18, 6:18] = halo  # a ring of two voxels around the 8 x 8 lesion
        probability[1:3, 8:16, 8:16] = inside
        pairs.append((sample, Prediction(probability, 0.9, 1)))
    calibration = calibrate([p[1] for p in pairs], [p[0] for p in pairs], default_min_volume_mm3=2.0)
    assert calibration.lesion_threshold == best
    assert calibration.validation_dice == pytest.approx(1.0)
    assert calibration.reference_dice < 0.8


def test_unknown_labels_do_not_calibrate_the_study_probability() -> None:
    pairs = [_study(f"s{i}", UNKNOWN_LABEL, lesion=True, speck=False, score=0.7) for i in range(3)]
    calibration = calibrate([p[1] for p in pairs], [p[0] for p in pairs], default_min_volume_mm3=1.0)
    assert calibration.study_temperature == 1.0


def test_sites_sums_choose_what_all_their_studies_together_choose() -> None:
    """A federation's calibration: each site sends its sums over its held-out studies, the coordinator adds
    them up; the settings equal those chosen on every study in one place, and the sums pass the allow-list."""
    pairs = [_study(f"s{i}", i % 2, lesion=i % 3 != 0, speck=i % 2 == 0, score=0.3 + 0.1 * i) for i in range(7)]
    samples, predictions = [p[0] for p in pairs], [p[1] for p in pairs]
    pooled = calibrate(predictions, samples, default_min_volume_mm3=2.0, default_fraction=0.05, min_slices=1)
    sites = [(0, 3), (3, 5), (5, 7)]
    sent = [
        allowed_metrics(CalibrationSums.of(predictions[a:b], samples[a:b], 2.0, 0.05, 1).as_metrics()) for a, b in sites
    ]
    received = [r for m in sent if (r := CalibrationSums.from_metrics(m)) is not None]
    assert len(received) == len(sites)
    total = sum(received[1:], received[0])
    assert total.studies == 7
    federated = total.calibration(2.0, 0.05)
    assert federated.as_dict() == pytest.approx(pooled.as_dict())
    assert federated.lesion_threshold != 0.5 or federated.min_lesion_volume_mm3 != 2.0  # a choice was made
    assert CalibrationSums.from_metrics({"dice": 0.5}) is None  # a site that sent none


def test_a_site_with_one_held_out_study_sends_no_sums_and_the_rest_still_calibrate() -> None:
    """``calibration-min-studies``: one study's sums would be its own Dice per setting (and its label and score),
    so a site under the minimum sends none and says so; label losses need as many labelled studies."""
    pairs = [_study(f"s{i}", i % 2, lesion=i % 3 != 0, speck=i % 2 == 0, score=0.3 + 0.1 * i) for i in range(5)]
    samples, predictions = [p[0] for p in pairs], [p[1] for p in pairs]

    def site(a: int, b: int) -> dict[str, object]:
        sums = CalibrationSums.of(predictions[a:b], samples[a:b], 2.0, 0.05, 1).shareable(2)
        return {"calibration_withheld": 1} if sums is None else allowed_metrics(sums.as_metrics())

    pooled = PooledSums.of({"hospital-1": site(0, 1), "hospital-2": site(1, 3), "hospital-3": site(3, 5)})
    assert pooled.withheld == ("hospital-1",)
    assert pooled.total is not None and pooled.total.studies == 4
    alone = calibrate(predictions[1:], samples[1:], default_min_volume_mm3=2.0, default_fraction=0.05, min_slices=1)
    assert pooled.total.calibration(2.0, 0.05).as_dict() == pytest.approx(alone.as_dict())
    # two held-out studies, one of them labelled: the Dice sums go, the label losses do not
    unlabelled = _study("u", UNKNOWN_LABEL, lesion=True, speck=False, score=0.6)
    sums = CalibrationSums.of([predictions[0], unlabelled[1]], [samples[0], unlabelled[0]], 2.0, 0.05, 1)
    assert sums.temperature.labelled == 1 and any(sums.temperature.losses)
    shared = sums.shareable(2)
    assert shared is not None and shared.dice == sums.dice and shared.studies == 2
    assert shared.temperature.labelled == 0 and not any(shared.temperature.losses)
    assert sums.shareable(3) is None
    assert PooledSums.of({"hospital-1": {"calibration_withheld": 1}}).total is None


def test_the_sums_lengths_are_the_allow_lists() -> None:
    assert GRID_LENGTH == CALIBRATION_GRID_LENGTH
    assert len(TEMPERATURES) == TEMPERATURE_COUNT
    # the same length whether or not the default share is one of FRACTIONS (a spec may set any)
    pairs = [_study("s0", 1, lesion=True, speck=False, score=0.7)]
    for fraction in (0.05, 0.07):
        sums = CalibrationSums.of([pairs[0][1]], [pairs[0][0]], 2.0, fraction, 1)
        assert len(sums.dice) == GRID_LENGTH


def _masked(key: str, sizes: list[int]) -> TrainingSample:
    """A study whose reference mask holds separate cubes-ish blocks of the given voxel counts."""
    truth = np.zeros((8, 64, 64), np.uint8)
    for i, size in enumerate(sizes):
        rows = -(-size // 8)  # 8 columns wide, as many rows as needed, on one slice
        block = np.zeros(rows * 8, np.uint8)
        block[:size] = 1
        truth[2 * i, 2 : 2 + rows, 2:10] = block.reshape(rows, 8)  # every other slice: not connected
    return TrainingSample(key, np.zeros((1, 8, 64, 64), np.float16), truth, 1, voxel_mm3=1.0)


def test_the_share_of_the_largest_lesion_follows_the_reference_masks() -> None:
    # one tumour with specks around it (specks 0.5 % of its volume): the highest share keeps 99 % of it
    assert reference_fraction([_masked("a", [400, 2, 2]), _masked("b", [300, 1])], 10.0) == max(FRACTIONS)
    # lesions of every size below the protected volume (4 x 10 mm3): a share above 2 % would lose > 2 % of it
    assert reference_fraction([_masked("c", [400, 30, 10]), _masked("d", [200, 15, 6])], 10.0) <= 0.02
    # no reference lesions: no rule
    assert reference_fraction([_masked("e", [])], 10.0) == 0.0


def test_the_share_rule_never_drops_a_lesion_of_several_minimum_volumes() -> None:
    # a 60 mm3 lesion beside a 2000 mm3 one (3 %) at minimum volume 10 mm3: protected from 40 mm3
    sizes = np.array([2000, 60, 20])
    assert kept_components(sizes, 1.0, 10.0, 0.05).tolist() == [True, True, False]
    assert kept_components(sizes, 1.0, 10.0, 0.05, protected_mm3=np.inf).tolist() == [True, False, False]
    assert kept_components(sizes, 1.0, 0.0, 0.05).all()  # no minimum volume: every component is a lesion
    # masks of several lesions of different sizes no longer force a low share: the rule cannot hurt them
    several = [_masked("f", [480, 60]), _masked("g", [450, 80, 2])]  # 12 % and 18 % of the largest
    assert reference_fraction(several, 10.0) == max(FRACTIONS)


def test_calibration_drops_specks_beside_a_large_lesion_by_their_share() -> None:
    samples, predictions = [], []
    for i in range(4):
        truth = np.zeros((4, 64, 64), np.uint8)
        truth[1:3, 8:40, 8:40] = 1  # 2048 voxels
        probability = truth.astype(np.float32) * 0.9
        probability[0, 48 + i : 56 + i, 48:64] = 0.9  # a 128-voxel false positive, 6 % of the lesion
        samples.append(TrainingSample(f"s{i}", np.zeros((1, 4, 64, 64), np.float16), truth, 1, voxel_mm3=1.0))
        predictions.append(Prediction(probability, 0.9, 1))
    # at the spec's 40 mm3 the rule protects components from 160 mm3: the share can drop the 128 mm3 one
    calibration = calibrate(predictions, samples, default_min_volume_mm3=40.0)
    assert calibration.validation_dice == pytest.approx(1.0)
    assert calibration.min_lesion_fraction > 128 / 2048 or calibration.min_lesion_volume_mm3 > 128
    # the same studies with the spec's share already high enough: nothing to gain, the default stays
    kept = calibrate(predictions, samples, default_min_volume_mm3=40.0, default_fraction=0.1)
    assert kept.min_lesion_fraction == 0.1 and kept.min_lesion_volume_mm3 == 40.0


def test_the_federation_pools_the_sites_reference_statistics_exactly() -> None:
    from radfed.federation.coordinator.checkpoint import CoordinatorCheckpoint

    site_a = [_masked("a", [400, 2, 2]), _masked("b", [300, 1])]
    site_b = [_masked("c", [400, 30, 10]), _masked("d", [200, 15, 6])]
    state = CoordinatorCheckpoint(
        lesion_kept_per_site={"a": reference_kept(site_a, 10.0), "b": reference_kept(site_b, 10.0)}
    )
    assert state.lesion_fraction() == reference_fraction(site_a + site_b, 10.0)
    assert len(reference_kept(site_a, 10.0)[0]) == len(FRACTIONS) == LESION_KEPT_LENGTH


def _slab(key: str, lesions: list[tuple[int, int]]) -> TrainingSample:
    """A study whose reference mask holds 10 x 10 blocks spanning (first slice, slice count)."""
    truth = np.zeros((12, 64, 64), np.uint8)
    for i, (first, count) in enumerate(lesions):
        truth[first : first + count, 2 + 12 * i : 12 + 12 * i, 2:12] = 1
    return TrainingSample(key, np.zeros((1, 12, 64, 64), np.float16), truth, 1, voxel_mm3=1.0)


def test_the_minimum_slice_extent_follows_the_reference_masks() -> None:
    # tumours over several slices and one 100-voxel fragment on a single slice: 100 of 2200 mm3 (4.5 %) is more
    # than the rule may lose, so it stays off
    assert reference_slices([_slab("a", [(1, 12)]), _slab("b", [(2, 9), (0, 1)])], 10.0) == 1
    # every lesion spans slices (a single-slice speck under the minimum volume does not count)
    sample = _slab("c", [(1, 8), (3, 4)])
    sample.lesions[10, 60, 60] = 1
    assert reference_slices([sample, _slab("d", [(0, 5)])], 10.0) == MULTI_SLICE
    kept, total = reference_extent_kept([sample], 10.0)
    assert kept == total == 1200.0  # sums in mm3: what a site could add to another's
    assert reference_slices([], 10.0) == 1  # no lesions: no rule


def test_calibration_works_under_the_chosen_slice_extent() -> None:
    samples, predictions = [], []
    for i in range(4):
        truth = np.zeros((6, 32, 32), np.uint8)
        truth[1:4, 4:14, 4:14] = 1
        probability = truth.astype(np.float32) * 0.9
        probability[5, 20:30, 20:30] = 0.9  # a 100-voxel single-slice false positive
        samples.append(TrainingSample(f"s{i}", np.zeros((1, 6, 32, 32), np.float16), truth, 1, voxel_mm3=1.0))
        predictions.append(Prediction(probability, 0.9, 1))
    assert calibrate(predictions, samples, 10.0, min_slices=MULTI_SLICE).validation_dice == pytest.approx(1.0)
    # without it neither threshold, minimum volume (up to 80 mm3) nor share (the 100 mm3 one is protected) helps
    assert calibrate(predictions, samples, 10.0, 0.0, 1).validation_dice < 0.9


def test_cross_calibration_scores_each_study_under_settings_chosen_without_it() -> None:
    """The experiments' measure of the job's calibration: under-confident lesions (0.45) are missed at the spec's
    threshold 0.5 and found under the settings the other half of the test studies chose (eight studies each, half
    with a lesion: enough for the gain to hold across them)."""
    spec = load_task_spec(None)
    pairs = [_study(f"s{i}", i % 2, lesion=i % 4 in (1, 2), speck=i % 3 == 0, score=0.5) for i in range(16)]
    samples, predictions = [p[0] for p in pairs], [p[1] for p in pairs]
    plain = sum((c for _, c in predictions_counts(samples, predictions, spec)), EvaluationCounts()).summary()
    calibrated = cross_calibrated(predictions, samples, spec, samples)
    assert plain["dice"] == 0.0 and calibrated["studies"] == plain["studies"] == 16
    assert calibrated["dice"] == pytest.approx(1.0)
    assert cross_calibrated(predictions[:1], samples[:1], spec, samples) == {}  # nothing to choose on


def _split(key: str, confident: bool) -> tuple[TrainingSample, Prediction]:
    """A 32-voxel lesion; ``confident``: at 0.9 beside a 40-voxel region at 0.45 that is not a lesion, else the
    lesion itself at 0.45 (under-confident)."""
    truth = np.zeros((4, 32, 32), np.uint8)
    truth[1:3, 8:12, 8:12] = 1
    probability = truth.astype(np.float32) * (0.9 if confident else 0.45)
    if confident:
        probability[1, 20:25, 20:28] = 0.45
    sample = TrainingSample(key, np.zeros((1, 4, 32, 32), np.float16), truth, 1, voxel_mm3=1.0)
    return sample, Prediction(probability, 0.9, 1)


def test_a_gain_that_few_studies_disagree_on_leaves_the_spec_settings() -> None:
    """A threshold under 0.45 finds the under-confident lesion (gain 1) and costs the confident study a false
    positive larger than its lesion (gain -0.38, at any minimum volume or share): two such studies cannot tell a
    real gain from chance; four of the first kind beside two of the second can."""
    two = [_split("a", confident=False), _split("b", confident=True)]
    kept = calibrate([p for _, p in two], [s for s, _ in two], default_min_volume_mm3=2.0)
    assert (kept.lesion_threshold, kept.min_lesion_volume_mm3, kept.min_lesion_fraction) == (0.5, 2.0, 0.0)
    assert kept.validation_dice == kept.reference_dice == pytest.approx(0.5) and kept.kept_reference
    six = [_split(f"s{i}", confident=i >= 4) for i in range(6)]
    chosen = calibrate([p for _, p in six], [s for s, _ in six], default_min_volume_mm3=2.0)
    assert chosen.lesion_threshold < 0.45 and not chosen.kept_reference
    assert chosen.validation_dice == pytest.approx((4 + 2 * 64 / 104) / 6)
    # a gain every study shares passes with two studies (no spread): the under-confident lesion twice
    same = [_split(f"u{i}", confident=False) for i in range(2)]
    assert calibrate([p for _, p in same], [s for s, _ in same], 2.0).lesion_threshold < 0.45
    # one study: no spread to judge any gain by
    assert calibrate([two[0][1]], [two[0][0]], 2.0).lesion_threshold == 0.5


def test_the_study_temperature_needs_more_than_a_few_separable_studies() -> None:
    def temperature(studies: int) -> float:
        scores = [0.95 if i % 2 else 0.05 for i in range(studies)]
        pairs = [_study(f"s{i}", i % 2, lesion=False, speck=False, score=s) for i, s in enumerate(scores)]
        return calibrate([p[1] for p in pairs], [p[0] for p in pairs], default_min_volume_mm3=1.0).study_temperature

    assert 0.7 <= temperature(2) <= 1.0  # two studies, perfectly separated: close to the model's own
    assert temperature(40) < 0.6  # forty: the scores' separation sharpens it


def test_the_model_card_names_the_sites_that_held_their_sums_back() -> None:
    pairs = [_study(f"s{i}", i % 2, lesion=True, speck=False, score=0.4 + 0.1 * i) for i in range(3)]
    chosen = calibrate([p[1] for p in pairs], [p[0] for p in pairs], default_min_volume_mm3=2.0)
    section = calibration_section(chosen, 0.5, ("hospital-3",), 2)
    assert "3 held-out studies" in section and "hospital-3 held out fewer than 2 studies" in section, section
    assert "held out fewer" not in calibration_section(chosen, 0.5, (), 2)
    nothing = calibration_section(None, 0.5, ("hospital-1", "hospital-2"), 2)
    assert "None: hospital-1, hospital-2 held out fewer than 2" in nothing and "settings stay" in nothing, nothing
    assert calibration_section(None, 0.5, (), 2) == ""  # calibration off: no section
