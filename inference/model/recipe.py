"""The training recipe as data: loss, patch sampling, augmentation, optimiser, schedule, validation. The same
recipe drives ``radfed train --local``, every site's federated rounds and the experiments; it is read from the
task spec's ``[training]`` table and recorded in the model artifact. Defaults follow nnU-Net's published
recipe (Dice + cross-entropy, a third of the patches on foreground, rotation/scaling/elastic/intensity
augmentation), shortened to a CPU step budget."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Optimizer(StrEnum):
    SGD = "sgd"  # Nesterov momentum (nnU-Net)
    ADAMW = "adamw"
    ADAM = "adam"  # the first wave's optimiser


class Schedule(StrEnum):
    POLY = "poly"  # (1 - step / steps) ** 0.9 (nnU-Net)
    COSINE = "cosine"
    CONSTANT = "constant"


class ForegroundSampling(StrEnum):
    """How a patch forced onto foreground picks its lesion voxel."""

    VOXEL = "voxel"  # any lesion voxel of the study, uniformly: a large tumour is drawn in proportion to its size
    COMPONENT = "component"  # a lesion (connected component) first, uniformly, then a voxel in it: the small
    # lesions of multifocal disease are drawn as often as the large one (the default since session 18: ahead
    # on the synthetic prostate sites, ahead or level on the real brain set over two seeds, README)


class DiceOver(StrEnum):
    """What the Dice term of the segmentation loss is computed over."""

    BATCH = "batch"  # one Dice over the whole batch: a large tumour's voxels outweigh a small lesion's. The default:
    # on the real brain set (README, session 23) both gave mean Dice 0.66 (seed 0) and 0.61 (seed 1); patch found
    # more small tumours, segmented large ones worse, and left 0.90-1.40 false-positive components per study (0.04-0.18)
    PATCH = "patch"  # a Dice per patch holding lesion voxels, summed and divided by the batch size (empty patches
    # get cross-entropy only): a small lesion's patch weighs as much as a large one's, and each patch's loss
    # depends on that patch alone, as DP-SGD's per-study gradients require (DP jobs always use it)


class PasteInto(StrEnum):
    """Which patches lesion pasting (``lesion_paste``) may paste into."""

    ANY = "any"  # any patch: the share of patches holding a lesion rises from foreground_fraction towards
    # foreground_fraction + (1 - foreground_fraction) x lesion_paste (0.67 at the defaults)
    FORCED = "forced"  # only the patches forced onto foreground: such a patch is then cut anywhere in its study
    # and a lesion of another study pasted into it, in place of a cut around the study's own lesion, so the share
    # of patches holding a lesion stays foreground_fraction and pasting changes only where the lesions are seen.
    # Session 30 (README): short federated synthetic runs (240 steps per site) 0.68 against any's 0.58 (any
    # over-segmented twice the true volume; at 720 steps any led without pasting), the real brain set 0.60 against
    # 0.67: not the default


class Augmentation(StrEnum):
    ROTATE = "rotate"
    SCALE = "scale"
    ELASTIC = "elastic"
    FLIP = "flip"  # along the axes the task declares symmetric (flip_axes)
    GAMMA = "gamma"
    NOISE = "noise"
    BLUR = "blur"
    BRIGHTNESS = "brightness"
    CONTRAST = "contrast"
    LOWRES = "lowres"


ALL_AUGMENTATIONS = tuple(Augmentation)


@dataclass(frozen=True)
class TrainingRecipe:
    """How a network is trained. ``steps`` counts optimiser steps of a whole training run (a federated
    job's rounds share it: the schedule runs over rounds x local steps). Left open (None), a whole run takes
    as many steps as ``time_limit_minutes`` allows on this machine, its schedule fitted to them: the budget is
    time, and a step costs what the plan's network and patch cost here."""

    steps: int | None = None
    learning_rate: float = 1e-3
    optimizer: Optimizer = Optimizer.ADAMW
    schedule: Schedule = Schedule.COSINE
    weight_decay: float = 1e-4
    momentum: float = 0.99  # SGD only
    warmup_steps: int = 0
    dice_weight: float = 1.0
    ce_weight: float = 1.0
    ce_positive_weight: float = 1.0  # > 1 up-weights lesion voxels in the cross-entropy
    dice_over: DiceOver = DiceOver.BATCH
    classification_weight: float = 0.5
    foreground_fraction: float = 0.33  # share of each batch forced to contain lesion voxels
    foreground_jitter: float = 0.5  # where in the patch the forced lesion voxel may fall (0: centre, 1: anywhere)
    foreground_sampling: ForegroundSampling = ForegroundSampling.COMPONENT
    # Share of patches into which a lesion of another training study of the same site is pasted, carved out
    # with a margin of its surroundings (CarveMix); 0 pastes nothing. The default since session 24 (README):
    # real brain set +0.01 and +0.06 mean Dice (two seeds, 5 of 6 folds ahead), synthetic prostate sites +0.01.
    # Never under DP-SGD: a pasted patch would carry two studies, and clipping bounds one study's influence only.
    lesion_paste: float = 0.5
    paste_into: PasteInto = PasteInto.ANY
    augmentations: tuple[Augmentation, ...] = ALL_AUGMENTATIONS
    flip_axes: tuple[int, ...] = (2,)  # (slice, row, column) axes along which anatomy is symmetric
    rotation_deg: float = 15.0
    scale_range: tuple[float, float] = (0.85, 1.25)
    augmentation_probability: float = 0.2  # per transform and patch, as in nnU-Net
    validation_fraction: float = 0.2  # of the training studies, by study hash; 0 disables validation
    min_validation_cohort: int = 25  # fewer studies: train on every one, keep the spec's thresholds
    validate_every: int = 250  # least steps between validation passes (keeps the best checkpoint)
    # Most of the training time validation passes may take: the interval between passes grows past
    # validate_every to keep it. Unbounded, 17 validation studies every 250 steps took ~40 % of a CPU run.
    validation_share: float = 0.1
    time_limit_minutes: float = 40.0  # 0: none; training stops there and keeps the best checkpoint (CPU budget)
    # torch intra-op threads per training process; 0: the cores this process may use that are not busy at start
    # (brain set, this 2-core machine with other work paused: 0.56 s per step on 1 thread, 0.38 s on 2)
    threads: int = 0
    mixed_precision: bool = True  # bfloat16 autocast for training steps on CUDA
    # and on a CPU with native bf16 (AVX-512 BF16, AMX, Arm BF16): 1.65x faster steps on the real brain set here, but
    # mean Dice 0.61 and 0.61 against float32's 0.66 and 0.61 (two seeds, README): no gain at the same steps, and
    # none at the same time either (10 min per fold: 0.60 from 1474 steps against 0.60 from 888): opt-in
    cpu_mixed_precision: bool = False
    calibrate: bool = True  # lesion threshold, minimum size and study temperature from validation data
    extra: dict[str, float] = field(default_factory=dict)
