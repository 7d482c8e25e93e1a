"""Lesion pasting (``[training] lesion_paste``, CarveMix): a lesion of another training study, carved out with a
margin of its surroundings, pasted into a patch; never under DP-SGD, whose privacy unit is one study."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from radfed.federation.learning.cohort import TrainingSample
from radfed.federation.learning.privacy import _StudyCrops
from radfed.federation.learning.training import PatchSampler, TrainingSettings
from radfed.inference.model.recipe import PasteInto
from radfed.inference.model.taskspec import TaskSpec, TaskSpecError, load_task_spec, parse_task_spec
from tests.small_model import small_spec

LESION, AROUND = 5.0, 2.0  # the donor's intensities: its lesion and the tissue around it


def _spec(paste: float = 0.0) -> TaskSpec:
    spec = small_spec()  # 2-D, 32 x 32 patches
    return replace(spec, training=replace(spec.training, augmentations=(), lesion_paste=paste))


def _donor() -> TrainingSample:
    """A 6 x 6 lesion on slice 1 of a 32 x 32 study, in tissue of another intensity."""
    image = np.full((3, 3, 32, 32), AROUND, np.float16)
    lesions = np.zeros((3, 32, 32), np.uint8)
    lesions[1, 10:16, 12:18] = 1
    image[:, lesions > 0] = LESION
    return TrainingSample("donor", image, lesions, 1)


def _blank(key: str = "blank", label: int = 0) -> TrainingSample:
    return TrainingSample(key, np.zeros((3, 3, 32, 32), np.float16), np.zeros((3, 32, 32), np.uint8), label)


def test_a_pasted_lesion_keeps_its_place_its_mask_and_a_margin_of_its_surroundings() -> None:
    sampler = PatchSampler(_spec(), _spec().training, seed=0)
    for _ in range(20):
        image, mask, target = sampler.crop(_blank(), force_foreground=False, donor=_donor())
        # the whole slice is the patch, so the lesion lands where it lies in the donor
        assert np.array_equal(mask[0] > 0, _donor().lesions[1] > 0)
        assert np.all(image[:, 0][:, mask[0] > 0] == LESION)
        carved = image[0, 0] == AROUND
        assert carved.any()  # some surrounding tissue came along, so the paste's edge is not the lesion's
        distance = ndimage.distance_transform_edt(mask[0] == 0)
        assert distance[carved].max() <= 0.5 * 6 + 1  # within the drawn margin (at most half the lesion's extent)
        assert np.all(image[0, 0][(image[0, 0] != LESION) & ~carved] == 0)  # the rest is the recipient's
        assert target == -1.0  # a pasted patch says nothing about the recipient study's label


def test_the_recipients_own_lesion_stays_and_a_lesion_off_the_patch_is_moved_into_it() -> None:
    spec = _spec()
    sampler = PatchSampler(spec, spec.training, seed=1)
    own = _blank("own", label=1)
    own.lesions[2, 25:28, 25:28] = 1
    for _ in range(20):
        _, mask, _ = sampler.crop(own, force_foreground=True, donor=_donor())
        assert mask[0, 25:28, 25:28].all()  # the forced slice is slice 2, the donor's lesion is on slice 1
        pasted = mask.sum() - 9
        assert 0 < pasted <= 36  # the donor's lesion came onto slice 2 (clipped where it left the patch)


def test_batches_paste_at_the_recipes_rate_and_not_at_zero() -> None:
    samples = [_donor(), _blank("a"), _blank("b")]

    def pasted_into_blanks(paste: float) -> int:
        spec = replace(_spec(paste), training=replace(_spec(paste).training, foreground_fraction=0.0))
        sampler = PatchSampler(spec, spec.training, seed=2)
        found = 0
        for _ in range(50):
            images, masks, targets = sampler.batch(samples, 2)
            carries = (images == LESION).flatten(1).any(1) & masks.flatten(1).any(1)
            found += int((carries & (targets[:, 0] == -1)).sum())
        return found

    assert pasted_into_blanks(0.0) == 0
    assert pasted_into_blanks(1.0) > 40  # of 100 patches, two thirds drawn from the blank studies


def test_pasting_into_forced_patches_only_keeps_the_share_of_lesion_patches() -> None:
    """paste_into = forced: the forced patch (one of two here) is the one pasted into; the other never is."""
    samples = [_donor(), _blank("a"), _blank("b")]

    def pasted_by_position(into: PasteInto) -> list[int]:
        training = replace(_spec(1.0).training, foreground_fraction=0.5, paste_into=into)
        sampler = PatchSampler(_spec(), training, seed=3)
        counts = [0, 0]
        for _ in range(40):
            _, masks, targets = sampler.batch(samples, 2)
            for position in (0, 1):
                counts[position] += int(targets[position, 0] == -1 and bool(masks[position].any()))
        return counts

    assert pasted_by_position(PasteInto.FORCED) == [40, 0]
    assert pasted_by_position(PasteInto.ANY)[1] > 0  # the default pastes into the unforced patch too


def test_dp_sgd_never_pastes() -> None:
    spec = _spec(1.0)
    crops = _StudyCrops([_blank(), _donor()], spec, TrainingSettings.from_spec(spec))
    for _ in range(20):
        _, mask, _ = crops[0]
        assert not mask.any()  # the privacy unit's patch holds that study alone


def test_the_spec_sets_it_and_refuses_a_share_outside_0_1() -> None:
    text = load_task_spec().source_text
    assert load_task_spec().training.lesion_paste == 0.5  # the default
    assert (
        parse_task_spec(text.replace("[training]\n", "[training]\nlesion_paste = 0.3\n"), "t").training.lesion_paste
        == 0.3
    )
    with pytest.raises(TaskSpecError, match="lesion_paste"):
        parse_task_spec(text.replace("[training]\n", "[training]\nlesion_paste = 1.5\n"), "t")
    assert load_task_spec().training.paste_into is PasteInto.ANY
    forced = parse_task_spec(text.replace("[training]\n", '[training]\npaste_into = "forced"\n'), "t")
    assert forced.training.paste_into is PasteInto.FORCED
    with pytest.raises(TaskSpecError, match="paste_into"):
        parse_task_spec(text.replace("[training]\n", '[training]\npaste_into = "everywhere"\n'), "t")
