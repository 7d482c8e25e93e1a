"""Fingerprint -> plan on cohorts of known geometry: grid, 2-D vs 3-D, patch, topology, normalisation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from radfed.inference.model.plan import (
    MIN_BATCH,
    PRIVATE_MIN_BATCH,
    Architecture,
    ChannelStatistics,
    ComputeBudget,
    DatasetFingerprint,
    Device,
    Normalization,
    Plan,
    PlanError,
    PlanOverrides,
    StudyFingerprint,
    derive_plan,
)


def _cohort(
    spacings: list[tuple[float, float, float]], shape: tuple[int, int, int], channel: str = "mr"
) -> DatasetFingerprint:
    rng = np.random.default_rng(0)
    return DatasetFingerprint.from_studies(
        [StudyFingerprint.of(s, shape, {channel: rng.normal(100, 10, 5000)}) for s in spacings]
    )


def test_thick_slices_plan_a_2d_network_on_a_low_percentile_of_the_slice_spacing() -> None:
    spacings = [(5.0, 0.9, 0.9)] * 6 + [(4.0, 0.8, 0.8), (6.0, 1.0, 1.0), (3.6, 0.9, 0.9)]
    plan = derive_plan(PlanOverrides({"mr": "MR"}), _cohort(spacings, (24, 256, 256)))
    assert plan.network.spatial_dims == 2 and plan.patch_size[0] == 1
    assert plan.spacing_mm[1:] == (0.9, 0.9)
    assert 3.6 <= plan.spacing_mm[0] < 5.0  # the 10th percentile, not the median
    assert plan.normalization == {"mr": Normalization.ZSCORE}
    # a batch of at least MIN_BATCH patches fits the CPU budget; in-plane sides are multiples of 16
    assert plan.batch_size >= MIN_BATCH[2]
    assert plan.batch_size * np.prod(plan.patch_size) <= ComputeBudget.for_device(Device.CPU).batch_voxels
    assert all(p % 16 == 0 for p in plan.patch_size[1:])
    # pooling in-plane only, down to a bottleneck of about 8 voxels
    assert all(s[0] == 1 for s in plan.network.strides)
    bottleneck = np.array(plan.patch_size[1:]) // np.prod([s[1:] for s in plan.network.strides], axis=0)
    assert (bottleneck >= 4).all() and (bottleneck <= 8).all()


def test_near_isotropic_volumes_plan_a_3d_network() -> None:
    plan = derive_plan(PlanOverrides({"ct": "CT"}), _cohort([(1.5, 1.0, 1.0)] * 5, (120, 160, 160), "ct"))
    assert plan.network.spatial_dims == 3 and plan.patch_size[0] > 1
    assert plan.batch_size >= MIN_BATCH[3]
    assert plan.normalization == {"ct": Normalization.CT} and "ct" in plan.intensity
    assert plan.network.kernel_sizes[0] == (3, 3, 3)


def test_a_stack_of_few_slices_plans_2d_even_at_isotropic_spacing() -> None:
    plan = derive_plan(PlanOverrides({"mr": "MR"}), _cohort([(1.0, 1.0, 1.0)] * 4, (24, 256, 256)))
    assert plan.network.spatial_dims == 2
    assert any("stack of slabs" in r for r in plan.reasons)


def test_a_2d_patch_covers_the_whole_slice_unless_the_job_is_private() -> None:
    fingerprint = _cohort([(5.0, 0.9, 0.9)] * 4, (24, 256, 256))
    plan = derive_plan(PlanOverrides({"mr": "MR"}), fingerprint)
    assert plan.patch_size == (1, 256, 256) and plan.batch_size == MIN_BATCH[2]
    # DP-SGD: the batch stays large, the patch shrinks to fit the same budget
    private = derive_plan(PlanOverrides({"mr": "MR"}), fingerprint, private=True)
    assert private.batch_size >= PRIVATE_MIN_BATCH and private.patch_size[1] < 256
    assert private.batch_size * np.prod(private.patch_size) <= ComputeBudget.for_device(Device.CPU).batch_voxels
    # a batch the spec fixes is kept either way
    fixed = derive_plan(PlanOverrides({"mr": "MR"}, batch_size=4), fingerprint, private=True)
    assert fixed.batch_size == 4


@pytest.mark.parametrize("shape", [(24, 96, 96), (40, 90, 90), (32, 128, 128), (48, 64, 64)])
def test_a_private_3d_plan_keeps_the_private_batch_after_rounding_the_patch(shape: tuple[int, int, int]) -> None:
    # the patch is fitted for a batch of 8 and then rounded up to multiples of 16, which left room for only
    # 4-5 studies in the budget: the batch must stay at the minimum the patch was fitted for
    plan = derive_plan(PlanOverrides({"mr": "MR"}), _cohort([(1.0, 1.0, 1.0)] * 4, shape), private=True)
    assert plan.network.spatial_dims == 3
    assert plan.batch_size >= PRIVATE_MIN_BATCH
    assert derive_plan(PlanOverrides({"mr": "MR"}), _cohort([(1.0, 1.0, 1.0)] * 4, shape)).batch_size >= MIN_BATCH[3]


def test_the_gpu_budget_allows_larger_networks() -> None:
    fingerprint = _cohort([(1.0, 1.0, 1.0)] * 3, (128, 192, 192))
    cpu = derive_plan(PlanOverrides({"mr": "MR"}), fingerprint, ComputeBudget.for_device(Device.CPU))
    gpu = derive_plan(PlanOverrides({"mr": "MR"}), fingerprint, ComputeBudget.for_device(Device.GPU))
    assert np.prod(gpu.patch_size) > np.prod(cpu.patch_size) and gpu.network.filters[0] > cpu.network.filters[0]


def test_explicit_choices_win_and_need_no_data() -> None:
    overrides = PlanOverrides(
        {"t2w": "MR"},
        spacing_mm=(3.0, 1.0, 1.0),
        patch_size=(16, 64, 64),
        normalization=Normalization.PERCENTILE,
        architecture=Architecture.SEGRESNET,
        batch_size=3,
    )
    plan = derive_plan(overrides, None)
    assert plan.spacing_mm == (3.0, 1.0, 1.0) and plan.patch_size == (16, 64, 64) and plan.batch_size == 3
    assert plan.network.architecture is Architecture.SEGRESNET and plan.network.spatial_dims == 3
    # thick slices: the first stages pool and convolve in-plane only
    assert plan.network.kernel_sizes[0] == (1, 3, 3) and plan.network.strides[1] == (1, 2, 2)
    with pytest.raises(PlanError, match="fingerprint"):
        derive_plan(PlanOverrides({"t2w": "MR"}), None)


def test_site_fingerprints_merge_to_the_pooled_statistics() -> None:
    rng = np.random.default_rng(1)
    a_values, b_values = rng.normal(10, 2, 4000), rng.normal(20, 5, 12000)
    site_a = DatasetFingerprint.from_studies([StudyFingerprint.of((1, 1, 1), (10, 10, 10), {"c": a_values})])
    site_b = DatasetFingerprint.from_studies(
        [StudyFingerprint.of((3, 1, 1), (20, 10, 10), {"c": v}) for v in np.split(b_values, 3)]
    )
    merged = DatasetFingerprint.merge([site_a, site_b])
    everything = np.concatenate([a_values, b_values])
    assert merged.studies == 4
    assert merged.channels["c"].voxels == everything.size
    assert merged.channels["c"].mean == pytest.approx(everything.mean())
    assert merged.channels["c"].std == pytest.approx(everything.std())
    assert merged.median_spacing_mm[0] == pytest.approx(0.25 * 1 + 0.75 * 3)  # study-weighted
    assert DatasetFingerprint.from_dict(merged.as_dict()) == merged


def test_a_plan_round_trips_through_json() -> None:
    plan = derive_plan(PlanOverrides({"ct": "CT"}), _cohort([(1.0, 0.8, 0.8)] * 3, (90, 200, 200), "ct"))
    assert Plan.from_json(plan.to_json()) == plan
    with pytest.raises(PlanError):
        Plan.from_json('{"format": "something-else"}')


def test_residual_blocks_are_recorded_and_older_plans_read_as_plain() -> None:
    cohort = _cohort([(1.0, 0.8, 0.8)] * 3, (90, 200, 200), "ct")
    plan = derive_plan(PlanOverrides({"ct": "CT"}, residual=True), cohort)
    assert plan.network.residual and any("residual" in r for r in plan.reasons)
    assert Plan.from_json(plan.to_json()).network.residual
    older = json.loads(plan.to_json())
    del older["network"]["residual"]  # a plan written before the key existed
    assert not Plan.from_json(json.dumps(older)).network.residual


def test_statistics_of_an_empty_foreground_are_defined() -> None:
    stats = StudyFingerprint.of((1, 1, 1), (1, 1, 1), {"c": np.array([])}).channels["c"]
    assert stats == ChannelStatistics(1, 0.0, 0.0, 0.0, 0.0)
