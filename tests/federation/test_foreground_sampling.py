"""Where a patch forced onto foreground lands (``[training] foreground_sampling``): ``voxel`` draws any lesion
voxel, so a study's large tumour takes nearly every forced patch; ``component`` draws a lesion first, so a
small lesion beside a large one is trained on as often."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from radfed.federation.learning.cohort import TrainingSample
from radfed.federation.learning.training import PatchSampler
from radfed.inference.model.recipe import ForegroundSampling
from radfed.inference.model.taskspec import TaskSpec, TaskSpecError, load_task_spec, parse_task_spec
from tests.small_model import small_spec

DRAWS = 400


def _spec(sampling: ForegroundSampling) -> TaskSpec:
    spec = small_spec()  # 32 x 32 patches
    return replace(spec, training=replace(spec.training, augmentations=(), foreground_sampling=sampling))


def _two_lesions() -> tuple[TrainingSample, np.ndarray]:
    """A 40 x 40 x 2 tumour and, far from it, a 3 x 3 x 1 lesion: no 32 x 32 patch holds both."""
    lesions = np.zeros((4, 96, 96), np.uint8)
    lesions[1:3, 5:45, 5:45] = 1
    lesions[2, 80:83, 80:83] = 1
    small = np.zeros_like(lesions)
    small[2, 80:83, 80:83] = 1
    return TrainingSample("two", np.zeros((3, 4, 96, 96), np.float16), lesions, 1), small


def _share_on_small_lesion(sampling: ForegroundSampling) -> float:
    sample, _ = _two_lesions()
    sampler = PatchSampler(_spec(sampling), _spec(sampling).training, seed=3)
    on_small = 0
    for _ in range(DRAWS):
        _, mask, _ = sampler.crop(sample, force_foreground=True)
        assert mask.any()  # every forced patch holds lesion voxels
        on_small += int(mask.sum() <= 9)  # the large tumour puts at least 8 x 8 voxels in any patch it is in
    return on_small / DRAWS


def test_component_sampling_trains_on_a_small_lesion_as_often_as_on_the_large_one() -> None:
    by_voxel = _share_on_small_lesion(ForegroundSampling.VOXEL)
    by_component = _share_on_small_lesion(ForegroundSampling.COMPONENT)
    assert by_voxel < 0.03  # 9 of 3209 lesion voxels
    assert 0.4 < by_component < 0.6  # one of two lesions


def test_component_sampling_on_a_study_smaller_than_the_patch_and_on_one_without_lesions() -> None:
    spec = _spec(ForegroundSampling.COMPONENT)
    sampler = PatchSampler(spec, spec.training, seed=0)
    lesions = np.zeros((2, 20, 20), np.uint8)  # padded up to the 32 x 32 patch: the lesion moves with the pad
    lesions[1, 2:4, 15:18] = 1
    small = TrainingSample("small", np.zeros((3, 2, 20, 20), np.float16), lesions, 1)
    for _ in range(20):
        _, mask, _ = sampler.crop(small, force_foreground=True)
        assert mask.sum() == 6
    empty = TrainingSample("empty", np.zeros((3, 2, 40, 40), np.float16), np.zeros((2, 40, 40), np.uint8), 0)
    _, mask, target = sampler.crop(empty, force_foreground=True)
    assert not mask.any() and target == 0.0


def test_the_spec_chooses_it_and_refuses_an_unknown_way() -> None:
    text = load_task_spec().source_text
    assert load_task_spec().training.foreground_sampling is ForegroundSampling.COMPONENT  # the default
    chosen = parse_task_spec(text.replace("[training]\n", '[training]\nforeground_sampling = "voxel"\n'), "t")
    assert chosen.training.foreground_sampling is ForegroundSampling.VOXEL
    with pytest.raises(TaskSpecError, match="foreground_sampling"):
        parse_task_spec(text.replace("[training]\n", '[training]\nforeground_sampling = "lesion"\n'), "t")
