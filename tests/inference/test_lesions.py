"""From a probability map to lesion candidates: 26-connected components above a minimum volume, most
probable first, each with its peak probability and exactly its own voxels."""

from __future__ import annotations

import numpy as np

from radfed.inference.dicom.volume import Volume
from radfed.inference.pipeline.lesions import extract_lesions, kept_components


def test_components_are_kept_whole_ordered_by_peak_and_filtered_by_volume() -> None:
    grid = Volume(np.zeros((12, 64, 64), np.float32), np.diag([3.0, 0.5, 0.5, 1.0]))  # 0.75 mm3 voxels
    probability = np.full(grid.shape, 0.1, np.float32)
    probability[2:4, 5:15, 5:15] = 0.7  # 200 voxels = 150 mm3
    probability[3, 9, 9] = 0.8
    probability[6:9, 30:40, 30:40] = 0.9  # 300 voxels, the most probable
    probability[4, 15, 15] = 0.95  # touches the first lesion's corner diagonally: 26-connected, one lesion
    probability[10, 50:55, 50:55] = 0.99  # 25 voxels = 18.75 mm3: below the minimum volume
    lesions = extract_lesions(probability, grid, threshold=0.5, min_volume_mm3=40.0)
    assert [round(lesion.probability, 2) for lesion in lesions] == [0.95, 0.9]
    assert int(lesions[0].mask.sum()) == 201 and lesions[0].mask[4, 15, 15] and lesions[0].mask[2, 5, 5]
    assert int(lesions[1].mask.sum()) == 300 and not (lesions[0].mask & lesions[1].mask).any()
    assert len(extract_lesions(probability, grid, threshold=0.5, min_volume_mm3=40.0, max_lesions=1)) == 1
    assert extract_lesions(probability, grid, threshold=0.999, min_volume_mm3=0.0) == []


def test_specks_beside_a_large_lesion_are_dropped_by_their_share_of_it() -> None:
    grid = Volume(np.zeros((6, 64, 64), np.float32), np.eye(4))
    probability = np.zeros(grid.shape, np.float32)
    probability[1:4, 10:30, 10:30] = 0.9  # 1200 voxels
    probability[5, 50:54, 50:54] = 0.99  # 16 voxels: 1.3 % of the largest
    probability[5, 40:48, 5:15] = 0.8  # 80 voxels: 6.7 %, and 8 minimum volumes (a lesion the share rule protects)
    every = extract_lesions(probability, grid, threshold=0.5, min_volume_mm3=10.0)
    assert sorted(int(c.mask.sum()) for c in every) == [16, 80, 1200]
    shared = extract_lesions(probability, grid, threshold=0.5, min_volume_mm3=10.0, min_fraction=0.05)
    assert sorted(int(c.mask.sum()) for c in shared) == [80, 1200]
    higher = extract_lesions(probability, grid, threshold=0.5, min_volume_mm3=10.0, min_fraction=0.2)
    assert sorted(int(c.mask.sum()) for c in higher) == [80, 1200]  # protected whatever the share
    assert kept_components(np.array([]), 1.0, 0.0, 0.5).size == 0


def test_a_lesion_on_one_slice_is_dropped_when_the_task_asks_for_two() -> None:
    grid = Volume(np.zeros((8, 32, 32), np.float32), np.eye(4))
    probability = np.zeros(grid.shape, np.float32)
    probability[2:5, 4:12, 4:12] = 0.9  # 3 slices
    probability[6, 20:30, 20:30] = 0.9  # one slice, 100 voxels: the 2-D network's typical false positive
    every = extract_lesions(probability, grid, threshold=0.5, min_volume_mm3=10.0)
    assert sorted(int(c.mask.sum()) for c in every) == [100, 192]
    two = extract_lesions(probability, grid, threshold=0.5, min_volume_mm3=10.0, min_slices=2)
    assert [int(c.mask.sum()) for c in two] == [192]
    # counted in slices of the model grid: on a native grid of 1 mm slices, a model grid of 3 mm slices
    # makes the 3-slice component one model slice (dropped) and a 6-slice one two (kept)
    probability[2:5] = 0.0
    probability[0:6, 4:12, 4:12] = 0.9
    native = extract_lesions(probability, grid, threshold=0.5, min_volume_mm3=10.0, min_slices=2, model_slice_mm=3.0)
    assert [int(c.mask.sum()) for c in native] == [6 * 64]
    probability[0:3] = 0.0
    assert (
        extract_lesions(probability, grid, threshold=0.5, min_volume_mm3=10.0, min_slices=2, model_slice_mm=3.0) == []
    )
