"""Training on one site's cohort with the task's recipe: the code ``radfed train --local`` runs, that each
federated site runs for its rounds, and that the experiments run. Knows nothing of Flower.

The recipe (``inference.recipe.TrainingRecipe``) decides the loss, the patch sampling, the augmentation, the
optimiser and its schedule, validation and checkpoint selection; the plan decides the network, patch and
batch. Nothing here is tuned to one data set."""

from __future__ import annotations

import copy
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from scipy import ndimage
from torch import nn
from torch.nn import functional as F  # noqa: N812 - the PyTorch idiom

from radfed.federation.learning.aggregation import DIRECTION_MIN_LEARNING_RATE
from radfed.federation.learning.augmentation import PatchAugmenter
from radfed.federation.learning.cohort import TrainingSample
from radfed.federation.learning.networks import build_network
from radfed.inference.model.arbiter import DeviceArbiter
from radfed.inference.model.plan import PlanError
from radfed.inference.model.recipe import DiceOver, ForegroundSampling, Optimizer, PasteInto, Schedule, TrainingRecipe
from radfed.inference.model.taskspec import TaskSpec

logger = logging.getLogger(__name__)


def device_turn(arbiter: DeviceArbiter | None) -> AbstractContextManager[list[float]]:
    """One training step's turn on the device: clinical work first where a node shares it."""
    return arbiter.training_step() if arbiter is not None else nullcontext([])


# CPU flags of native bfloat16 arithmetic (x86 AVX-512 BF16 or AMX; Arm's BF16 extension). Without them torch
# emulates bf16 and a step is no faster.
_NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes in bfloat16 natively (its flags, as Linux lists them)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in {"flags", "features"}:
            return bool(_NATIVE_BF16_FLAGS & set(value.split()))
    return False


def mixed_precision(device: torch.device, recipe: TrainingRecipe) -> bool:
    """bfloat16 autocast for the training steps: on CUDA, and with ``cpu_mixed_precision`` on a CPU with native
    bf16 (brain set, 2-D plan, this machine's AVX-512 BF16: a step's forward, backward and update 0.65 -> 0.38 s
    on one thread). The weights, the optimiser, the loss and every evaluation stay float32."""
    if not recipe.mixed_precision:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and recipe.cpu_mixed_precision and cpu_has_native_bf16()


FIT_FIRST = (5, 10, 20)  # early checks of the pace against the time limit (a slow machine shows at once)
FIT_EVERY = 50  # then every so many steps
TIME_MARGIN = 0.9  # of the time left, what the steps may use (validation and the last checkpoint need the rest)
# A recipe without ``steps`` fills its time limit, up to this many steps (nnU-Net's 1000 epochs x 250 steps).
FILL_STEPS_CAP = 250_000


@dataclass(frozen=True)
class TrainingSettings:
    """One training call: the recipe, this call's steps, and where they sit in the whole run's schedule
    (a federated round is a slice of the job's schedule: offset = steps already taken in earlier rounds)."""

    recipe: TrainingRecipe
    batch_size: int
    steps: int
    seed: int = 0
    proximal_mu: float = 0.0  # FedProx: pull towards the round's global model (0: plain FedAvg training)
    schedule_offset: int = 0
    schedule_total: int | None = None  # None: this call's steps
    fill_time_limit: bool = False  # ``steps`` is a cap: take as many as the recipe's time limit allows

    @classmethod
    def from_spec(cls, spec: TaskSpec, **overrides: Any) -> TrainingSettings:
        """The spec's recipe and planned batch; ``overrides`` (None values ignored) replace any field.
        A recipe that leaves ``steps`` open and no ``steps`` override: the run fills its time limit."""
        plan = spec.plan
        if plan is None:
            raise PlanError(f"task {spec.name!r} has no plan yet (derive it from the cohort first)")
        values: dict[str, Any] = {"recipe": spec.training, "batch_size": plan.batch_size, "steps": spec.training.steps}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["steps"] is None:
            if spec.training.time_limit_minutes <= 0:
                raise PlanError("training without steps needs a time limit to fill")
            values.update(steps=FILL_STEPS_CAP, fill_time_limit=True)
        return cls(**values)

    def learning_rate_factor(self, step: int) -> float:
        """The schedule's factor at this call's ``step`` (0-based)."""
        total = max(1, self.schedule_total or self.steps)
        position = min(self.schedule_offset + step, total)
        recipe = self.recipe
        if recipe.warmup_steps and position < recipe.warmup_steps:
            return (position + 1) / recipe.warmup_steps
        if recipe.schedule is Schedule.POLY:
            return float((1 - position / total) ** 0.9)
        if recipe.schedule is Schedule.COSINE:
            return 0.5 * (1 + math.cos(math.pi * position / total))
        return 1.0


def direction_screened(recipe: TrainingRecipe, server_round: int, rounds: int, local_steps: int) -> bool:
    """Whether the coordinator's direction rule screens a federated round: not once the job's schedule, past
    any warmup, has decayed the round's first learning rate below ``DIRECTION_MIN_LEARNING_RATE`` of its peak
    (the last 3 of 24 rounds under a cosine schedule, the last 3 of 100 under poly; a constant one never)."""
    offset = (server_round - 1) * local_steps
    if offset < recipe.warmup_steps:
        return True
    settings = TrainingSettings(recipe, 1, local_steps, schedule_offset=offset, schedule_total=rounds * local_steps)
    return settings.learning_rate_factor(0) >= DIRECTION_MIN_LEARNING_RATE


# An optimiser's state between rounds (Adam's moments, SGD's momentum): torch's own state_dict.
OptimizerState = dict[str, Any]


@dataclass
class TrainingLog:
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    optimizer_state: OptimizerState | None = None  # to continue from in the site's next round
    validation: list[tuple[int, float]] = field(default_factory=list)  # (step, validation Dice)
    best_step: int | None = None
    stopped_by_time_limit: bool = False
    validation_seconds: float = 0.0  # spent in validation passes (bounded by the recipe's validation_share)
    paused_seconds: float = 0.0  # waiting for clinical work on the same device (inference/model/arbiter.py)
    fitted_steps: int | None = None  # steps the time limit set (shortened, or lengthened when filling it)


def validation_interval(recipe: TrainingRecipe, log: TrainingLog, elapsed: float) -> int:
    """Steps to the next validation pass: ``validate_every``, or more when the passes so far would take
    more than the recipe's ``validation_share`` of the run (a pass costs what the last ones cost, a step
    what the training steps have cost so far)."""
    if not log.validation or log.steps == 0:
        return recipe.validate_every
    per_pass = log.validation_seconds / len(log.validation)
    per_step = max(elapsed - log.validation_seconds, 1e-9) / log.steps
    share = recipe.validation_share
    # A pass every k steps costs per_pass / (per_pass + k * per_step) of the time: at most share when
    # k >= per_pass * (1 - share) / (share * per_step).
    return max(recipe.validate_every, math.ceil(per_pass * (1 - share) / (share * per_step)))


def new_model(spec: TaskSpec, seed: int | None = None) -> nn.Module:
    """The task's planned network; with ``seed``, its initial weights are a function of the seed alone
    (otherwise they depend on whatever used torch's global generator before)."""
    if spec.plan is None:
        raise PlanError(f"task {spec.name!r} has no plan yet (derive it from the cohort first)")
    network = spec.plan.network
    if seed is None:
        return build_network(network, spec.input_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_network(network, spec.input_channels)


def arrays_to_model(spec: TaskSpec, arrays: list[np.ndarray]) -> torch.nn.Module:
    model = new_model(spec)
    state = model.state_dict()
    if len(arrays) != len(state):
        raise ValueError(f"received {len(arrays)} arrays for a model with {len(state)} tensors")
    model.load_state_dict(
        {k: torch.from_numpy(np.asarray(a)).to(v.dtype) for (k, v), a in zip(state.items(), arrays, strict=True)}
    )
    return model


def model_to_arrays(model: torch.nn.Module) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in model.state_dict().values()]


class PatchSampler:
    """Training patches: a share of each batch forced to hold lesion voxels (placed anywhere within the
    jitter of the patch), the rest anywhere in the study; then the recipe's augmentation."""

    def __init__(self, spec: TaskSpec, recipe: TrainingRecipe, seed: int) -> None:
        self.patch = spec.patch_size
        self.recipe = recipe
        self.rng = np.random.default_rng(seed)
        assert spec.plan is not None
        self.augment = PatchAugmenter(recipe, self.patch, spec.plan.network.spatial_dims, seed)
        self.context = spec.plan.network.context_slices
        self._components: dict[tuple[str, tuple[int, ...]], list[npt.NDArray[np.intp]]] = {}  # component sampling

    def crop(
        self, sample: TrainingSample, force_foreground: bool, donor: TrainingSample | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], float]:
        """(image patch, lesion patch, classification target); the target is the study label when the
        patch holds lesion voxels of a positive study, 0 otherwise, and -1 when the label is unknown.
        With a ``donor``, one of its lesions is carved out with a margin of its surroundings and pasted
        into the patch (the recipe's ``lesion_paste``; not with 2.5-D input); such a patch's target is -1."""
        size = self.augment.sample_shape()
        image, lesions = sample.image, sample.lesions
        spatial = image.shape[1:]
        pads = [max(0, p - s) for s, p in zip(spatial, size, strict=True)]
        if any(pads):
            image = np.pad(image, [(0, 0)] + [(p // 2, p - p // 2) for p in pads])
            lesions = np.pad(lesions, [(p // 2, p - p // 2) for p in pads])
            spatial = image.shape[1:]
        rng = self.rng
        start = [int(rng.integers(0, s - p + 1)) for p, s in zip(size, spatial, strict=True)]
        if force_foreground:
            foreground = self._lesion_voxels(sample, lesions)
            if len(foreground):
                voxel = foreground[rng.integers(len(foreground))]
                jitter = self.recipe.foreground_jitter
                offsets = [int(rng.integers(-int(p * jitter / 2), int(p * jitter / 2) + 1)) for p in size]
                start = [
                    int(np.clip(v - p // 2 + o, 0, s - p))
                    for v, p, o, s in zip(voxel, size, offsets, spatial, strict=True)
                ]
        window = tuple(slice(b, b + p) for b, p in zip(start, size, strict=True))
        if self.context:  # 2.5-D: the slice's neighbours as channels, stacked as inference stacks them
            depth = image.shape[1]
            nearby = np.clip(start[0] + np.arange(-self.context, self.context + 1), 0, depth - 1)
            stack = np.asarray(image[:, nearby][(slice(None), slice(None), *window[1:])], dtype=np.float32)
            crop_image = stack.transpose(1, 0, 2, 3).reshape(-1, 1, *stack.shape[2:])
        else:
            crop_image = np.array(image[(slice(None), *window)], dtype=np.float32)  # a copy: pasting writes
        crop_mask = np.array(lesions[window], dtype=np.float32)
        shift = [p // 2 for p in pads]  # where the study's own voxel (0, 0, 0) lies in the padded volume
        pasted = donor is not None and not self.context and self._paste(donor, start, shift, crop_image, crop_mask)
        crop_image, crop_mask = self.augment(crop_image, crop_mask)
        target = -1.0 if sample.label < 0 or pasted else float(sample.label == 1 and crop_mask.any())
        return np.ascontiguousarray(crop_image), np.ascontiguousarray(crop_mask), target

    def _paste(
        self,
        donor: TrainingSample,
        start: Sequence[int],
        shift: Sequence[int],
        image: npt.NDArray[np.float32],
        mask: npt.NDArray[np.float32],
    ) -> bool:
        """Carve one of the donor's lesions out with a margin of its surroundings (CarveMix, Zhang et al.,
        MICCAI 2021) and paste it into the patch, in place: where it lies in the donor when that is inside
        the patch, else moved into it. The margin, drawn per paste as a share of the lesion's in-plane extent,
        keeps the carved region's border off the lesion's, so the edge of a paste does not outline a lesion.
        Returns whether anything was pasted."""
        components = self._components_of(donor, donor.lesions)
        if not components:
            return False
        rng = self.rng
        lesion = components[int(rng.integers(len(components)))]
        low, high = lesion.min(axis=0), lesion.max(axis=0) + 1
        margin = max(1, round(float(rng.uniform(0.1, 0.5)) * int(max(high[1:] - low[1:]))))
        shape = donor.lesions.shape
        box_low = np.array([low[0], *(max(0, int(v) - margin) for v in low[1:])])
        box_high = np.array([high[0], *(min(s, int(v) + margin) for v, s in zip(high[1:], shape[1:], strict=True))])
        own = np.zeros(tuple(box_high - box_low), dtype=bool)
        own[tuple((lesion - box_low).T)] = True
        # in-plane distance only: slices may be thick, and the region keeps to the lesion's own slices
        region = ndimage.distance_transform_edt(~own, sampling=(1e6, 1.0, 1.0)) <= margin
        # the donor's voxel v goes to patch voxel v + offset: the anchor (one lesion voxel) stays where it lies in
        # the donor when that place (in this study's padded frame) is in the patch, else goes anywhere in it
        anchor = lesion[int(rng.integers(len(lesion)))]
        begin, size = np.asarray(start), np.asarray(image.shape[1:])
        place = anchor + np.asarray(shift)
        inside = (place >= begin) & (place < begin + size)
        offset = np.where(inside, place, begin + rng.integers(0, size)) - anchor - begin
        lo, hi = np.maximum(0, box_low + offset), np.minimum(size, box_high + offset)
        if np.any(hi <= lo):
            return False
        at = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        source = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(lo, hi, offset, strict=True))
        keep = region[tuple(slice(s.start - int(b), s.stop - int(b)) for s, b in zip(source, box_low, strict=True))]
        values = np.asarray(donor.image[(slice(None), *source)], dtype=np.float32)
        image[(slice(None), *at)] = np.where(keep, values, image[(slice(None), *at)])
        mask[at] = np.where(keep, donor.lesions[source] > 0, mask[at])
        return bool(keep.any())

    def _lesion_voxels(self, sample: TrainingSample, lesions: npt.NDArray[np.uint8]) -> npt.NDArray[np.intp]:
        """The voxels a forced patch may centre on: every lesion voxel, or those of one lesion drawn
        uniformly (the components of a study are found once and kept)."""
        if self.recipe.foreground_sampling is ForegroundSampling.VOXEL:
            return np.argwhere(lesions > 0)
        components = self._components_of(sample, lesions)
        if not components:
            return np.empty((0, lesions.ndim), dtype=np.intp)
        return components[int(self.rng.integers(len(components)))]

    def _components_of(self, sample: TrainingSample, lesions: npt.NDArray[np.uint8]) -> list[npt.NDArray[np.intp]]:
        """The voxels of each lesion (connected component) of a study, found once and kept."""
        key = (sample.key, lesions.shape)  # the shape tells a padded copy (small studies) from the original
        components = self._components.get(key)
        if components is None:
            found, count = ndimage.label(lesions > 0, structure=np.ones((3, 3, 3), dtype=bool))
            voxels = np.argwhere(found > 0)  # one pass over the volume, then grouped by component
            labels = found[tuple(voxels.T)]
            order = np.argsort(labels, kind="stable")
            components = np.split(voxels[order], np.cumsum(np.bincount(labels, minlength=count + 1)[1:])[:-1])
            self._components[key] = components
        return components

    def batch(self, samples: Sequence[TrainingSample], batch_size: int) -> tuple[torch.Tensor, ...]:
        positives = [s for s in samples if s.lesions.any()]
        forced = round(batch_size * self.recipe.foreground_fraction) if positives else 0
        crops = []
        paste = self.recipe.lesion_paste if positives else 0.0
        anywhere = self.recipe.paste_into is PasteInto.ANY
        for index in range(batch_size):
            force = index < forced
            pool = positives if force else samples
            sample = pool[int(self.rng.integers(len(pool)))]
            donor = None
            # no draw at 0, so seeds reproduce runs without pasting
            if paste and (force or anywhere) and self.rng.random() < paste:
                others = [s for s in positives if s is not sample] or positives
                donor = others[int(self.rng.integers(len(others)))]
            # into forced patches only: the pasted lesion is the patch's foreground, cut anywhere in the study
            crops.append(self.crop(sample, force and (anywhere or donor is None), donor))
        images = torch.from_numpy(np.stack([c[0] for c in crops]))
        masks = torch.from_numpy(np.stack([c[1] for c in crops]))[:, None]
        targets = torch.tensor([[c[2]] for c in crops], dtype=torch.float32)
        return images, masks, targets


def _dice_ce(logits: torch.Tensor, masks: torch.Tensor, recipe: TrainingRecipe) -> torch.Tensor:
    """Binary cross-entropy plus Dice, weighted by the recipe. ``dice_over = batch``: one Dice over the whole
    batch (per-patch Dice on the many empty patches would only push every probability down). ``patch``: a Dice
    per patch holding lesion voxels, summed over the batch and divided by its size, so that the loss is a mean
    of per-patch terms, as the cross-entropy's voxel mean already is."""
    loss = logits.new_zeros(())
    if recipe.ce_weight:
        weight = torch.tensor(recipe.ce_positive_weight) if recipe.ce_positive_weight != 1 else None
        loss = loss + recipe.ce_weight * F.binary_cross_entropy_with_logits(logits, masks, pos_weight=weight)
    if recipe.dice_weight:
        probs = torch.sigmoid(logits)
        if recipe.dice_over is DiceOver.PATCH:
            axes = tuple(range(1, probs.ndim))
            lesion = masks.sum(axes)
            per_patch = 1 - (2 * (probs * masks).sum(axes) + 1) / (probs.sum(axes) + lesion + 1)
            dice = torch.where(lesion > 0, per_patch, 0).sum() / probs.shape[0]
        else:
            dice = 1 - (2 * (probs * masks).sum() + 1) / (probs.sum() + masks.sum() + 1)
        loss = loss + recipe.dice_weight * dice
    return loss


def _downsampled(masks: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A lesion mask at a coarser resolution: a coarse voxel is lesion if any fine voxel under it is."""
    return F.adaptive_max_pool3d(masks, tuple(shape))


def loss_fn(
    model: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    targets: torch.Tensor,
    recipe: TrainingRecipe,
) -> torch.Tensor:
    """The recipe's segmentation loss (with deep supervision: the lower resolutions weigh 1/2, 1/4, ...,
    normalised) plus the classification loss on studies whose label is known."""
    outputs = [output.float() for output in model(images)]  # the loss in float32 under mixed precision
    seg_logits, cls_logits, aux = outputs[0], outputs[1], outputs[2:]
    weights = [1.0] + [0.5 ** (i + 1) for i in range(len(aux))]
    total = sum(weights)
    loss = (weights[0] / total) * _dice_ce(seg_logits, masks, recipe)
    for weight, logits in zip(weights[1:], aux, strict=True):
        loss = loss + (weight / total) * _dice_ce(logits, _downsampled(masks, logits.shape[2:]), recipe)
    known = targets >= 0
    if recipe.classification_weight and bool(known.any()):
        if recipe.dice_over is DiceOver.PATCH:  # a mean of per-patch terms here too: unknown labels count as zero
            terms = F.binary_cross_entropy_with_logits(cls_logits, targets.clamp(min=0), reduction="none")
            cls = torch.where(known, terms, 0).sum() / targets.shape[0]
        else:
            cls = F.binary_cross_entropy_with_logits(cls_logits[known], targets[known])
        loss = loss + recipe.classification_weight * cls
    return loss


def make_optimizer(model: nn.Module, settings: TrainingSettings) -> torch.optim.Optimizer:
    recipe = settings.recipe
    if recipe.optimizer is Optimizer.SGD:
        return torch.optim.SGD(
            model.parameters(),
            lr=recipe.learning_rate,
            momentum=recipe.momentum,
            nesterov=True,
            weight_decay=recipe.weight_decay,
        )
    if recipe.optimizer is Optimizer.ADAMW:
        return torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=recipe.learning_rate)


class ProximalTerm:
    """FedProx's proximal term, applied as a decoupled step after each optimiser step:
    w <- w - lr * mu * (w - w_global). It uses only the global model (public to the site) and the already
    updated weights, so under DP-SGD it is post-processing and costs no privacy (adding it to the loss
    would be dropped silently by per-sample gradient hooks)."""

    def __init__(self, model: nn.Module, mu: float, learning_rate: float) -> None:
        self.factor = learning_rate * mu
        self.anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else []

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        for parameter, anchor in zip(model.parameters(), self.anchor, strict=False):
            parameter.sub_(self.factor * (parameter - anchor))


Validator = Callable[[nn.Module], float]


def train_local(
    model: nn.Module,
    samples: Sequence[TrainingSample],
    spec: TaskSpec,
    settings: TrainingSettings,
    *,
    progress: Callable[[int, int, float], None] | None = None,
    optimizer_state: OptimizerState | None = None,
    validate: Validator | None = None,
    arbiter: DeviceArbiter | None = None,
) -> TrainingLog:
    """Plain (non-private) training of ``model`` on ``samples``; returns the loss history and the optimiser's
    state. A federated site passes the state of its previous round back in (see ``site.rounds.train_round``).

    With ``validate`` (a score to maximise, e.g. mean Dice on validation studies), the model is scored
    every ``validate_every`` steps and at the end, and the best-scoring weights are kept."""
    if not samples:
        raise ValueError("no training samples")
    recipe = settings.recipe
    torch.manual_seed(settings.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    sampler = PatchSampler(spec, recipe, settings.seed)
    optimizer = make_optimizer(model, settings)
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    # The schedule a time limit may shorten (see below): the scheduler reads the current one.
    schedule = settings
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: schedule.learning_rate_factor(step))
    proximal = ProximalTerm(model, settings.proximal_mu, recipe.learning_rate)
    autocast = mixed_precision(device, recipe)
    log = TrainingLog()
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    started = time.perf_counter()
    deadline = started + recipe.time_limit_minutes * 60 if recipe.time_limit_minutes > 0 else math.inf

    def checkpoint(step: int) -> None:
        nonlocal best
        if validate is None:
            return
        began = time.perf_counter()
        score = validate(model)
        model.train()
        log.validation.append((step, score))
        log.validation_seconds += time.perf_counter() - began
        if best is None or score > best[0]:
            best = (score, copy.deepcopy(model.state_dict()))
            log.best_step = step
        logger.info("step %d: validation score %.3f", step, score)

    model.train()
    planned = settings.steps
    next_validation = recipe.validate_every
    for step in range(settings.steps):
        if step >= planned:
            break
        images, masks, targets = (t.to(device) for t in sampler.batch(samples, settings.batch_size))
        with device_turn(arbiter) as paused:
            optimizer.zero_grad()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = loss_fn(model, images, masks, targets, recipe)
            loss.backward()
            if recipe.optimizer is Optimizer.SGD:
                nn.utils.clip_grad_norm_(model.parameters(), 12.0)  # nnU-Net clips SGD's gradients at 12
            optimizer.step()
        log.paused_seconds += sum(paused)
        scheduler.step()
        proximal.apply(model)
        log.losses.append(float(loss.detach()))
        log.steps = step + 1
        if progress is not None:
            progress(step + 1, planned, log.losses[-1])
        if validate is not None and step + 1 >= next_validation and step + 1 < planned:
            checkpoint(step + 1)
            next_validation = step + 1 + validation_interval(recipe, log, time.perf_counter() - started)
        # A whole run (not one federated round) that would overrun its time limit is shortened once the pace
        # is known, and its schedule with it, so that it still ends with the learning rate decayed instead of
        # being cut off at a high one (a slower machine trains fewer steps, not a worse schedule). A run that
        # fills its time limit is also lengthened while in its first half, as the pace settles (the first
        # steps pay for warm-up; later, validation passes slow it and it is shortened again).
        paced = step + 1 in FIT_FIRST or (step + 1) % FIT_EVERY == 0
        if paced and math.isfinite(deadline) and settings.schedule_total is None:
            now = time.perf_counter()
            pace = (now - started) / (step + 1)
            fits = min(settings.steps, step + 1 + int(TIME_MARGIN * (deadline - now) / pace))
            longer = settings.fill_time_limit and 2 * (step + 1) < planned and fits > planned * 1.02
            if fits < planned or longer:
                planned = max(step + 2, fits)
                schedule = replace(settings, steps=planned)
                log.fitted_steps = planned
                logger.info("at %.2f s per step the time limit allows %d steps", pace, planned)
        if time.perf_counter() > deadline and step + 1 < planned:
            log.stopped_by_time_limit = True
            logger.warning("training stopped by its time limit after %d of %d steps", step + 1, planned)
            break
    checkpoint(log.steps)
    if best is not None:
        model.load_state_dict(best[1])
    log.seconds = time.perf_counter() - started
    log.optimizer_state = optimizer.state_dict()
    model.to("cpu")
    model.eval()
    return log
