"""Output settings chosen on validation studies, never on the test set: the lesion probability threshold,
minimum lesion volume and minimum share of the study's largest lesion that give the best mean per-study Dice
(a study without reference lesions scores 1 when nothing is found, 0 otherwise), and a temperature for the
study probability (minimum negative log-likelihood of the known labels). Without validation studies the
share comes from the training masks alone (``reference_fraction``). They are stored in the artifact's
manifest and used by every node. A setting replaces the spec's only when its gain holds across the studies
(``gain_margins``), so a few studies change little. In a federation every site sends sums over its held-out
studies (``CalibrationSums``) and the coordinator chooses from their total."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from radfed.federation.learning.cohort import TrainingSample
from radfed.federation.learning.evaluation import lesion_components
from radfed.inference.model.taskspec import TaskSpec
from radfed.inference.model.windows import Prediction
from radfed.inference.pipeline.lesions import kept_components, protected_volume_mm3, slice_extents

# Lesion probability thresholds tried. Wide enough that a model that over-segments (the demo's DP fine-tuned one
# chose 0.7, then the grid's top) or under-segments finds its best setting inside the grid, not at its edge.
THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
# Minimum volumes tried, as multiples of the spec's own (0 keeps every component).
VOLUME_FACTORS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
TEMPERATURES = tuple(float(t) for t in np.geomspace(0.25, 16.0, 25))
# Shares of the study's largest component under which a component is dropped (nnU-Net's "largest component
# only" decision, graded).
FRACTIONS = (0.0, 0.02, 0.05, 0.1, 0.2)
# Without validation studies: the largest share that keeps this much of the reference lesion volume of a
# training study on average (a perfect prediction would lose ~1 % Dice).
KEPT_REFERENCE = 0.98
# The minimum slice extent tried from the reference masks: 2 drops "lesions" seen on one slice only (the
# single-slice specks a 2-D network scatters: on the brain set 94 % of its false-positive components, 35 % of
# its true ones, those mostly fragments). Chosen when the training masks keep KEPT_REFERENCE of their lesion
# volume with it, pooled over studies (one study's annotation fragments should not veto it for the rest).
MULTI_SLICE = 2
MIN_GAIN = 0.01  # mean validation Dice a setting must add over the spec's own to replace it
# A setting replaces the spec's only when its mean per-study gain exceeds this many standard errors of the
# studies' paired differences: the one-standard-error rule of model selection (Breiman et al., Classification
# and Regression Trees, 1984; Hastie et al., The Elements of Statistical Learning, 7.10), the spec's settings
# being the simplest model. Two studies that happen to favour a large minimum volume must not set it for every
# hospital, while a gain every study shares passes with few studies.
GAIN_STANDARD_ERRORS = 1.0
# Weight of a Gaussian prior on the log study temperature, centred on 1 (sigma ~0.7: a factor of 4 at two
# sigma), added to the summed negative log-likelihood: a handful of separable studies no longer drive the
# temperature to the grid's end; a few dozen outweigh it.
TEMPERATURE_PRIOR = 1.0

Setting = tuple[float, float, float]  # threshold, minimum volume, minimum share of the largest


@dataclass(frozen=True)
class Calibration:
    lesion_threshold: float
    min_lesion_volume_mm3: float
    min_lesion_fraction: float
    study_temperature: float
    validation_dice: float
    studies: int
    reference_dice: float  # mean validation Dice at the spec's threshold, minimum volume and share

    @property
    def kept_reference(self) -> bool:
        """The spec's lesion settings stayed (no setting's gain held across the studies)."""
        return self.validation_dice == self.reference_dice

    def applied_to(self, spec: TaskSpec) -> TaskSpec:
        """``spec`` with these output settings (what the artifact's manifest then carries)."""
        return spec.with_outputs(
            lesion_threshold=self.lesion_threshold,
            min_lesion_volume_mm3=self.min_lesion_volume_mm3,
            min_lesion_fraction=self.min_lesion_fraction,
            study_temperature=self.study_temperature,
        )

    def as_dict(self) -> dict[str, float | int]:
        return {
            "lesion_threshold": self.lesion_threshold,
            "min_lesion_volume_mm3": self.min_lesion_volume_mm3,
            "min_lesion_fraction": self.min_lesion_fraction,
            "study_temperature": self.study_temperature,
            "validation_dice": self.validation_dice,
            "validation_studies": self.studies,
            "reference_dice": self.reference_dice,
        }


def _component_dice(sizes: np.ndarray, overlaps: np.ndarray, reference_voxels: int) -> float:
    """A study's Dice when it keeps the components of ``sizes`` voxels, ``overlaps`` of them in the reference:
    the same figure as on the masks, without touching a voxel (a grid of settings re-scores each study often)."""
    predicted = int(sizes.sum())
    if reference_voxels == 0:
        return float(predicted == 0)
    return float(2 * overlaps.sum() / (predicted + reference_voxels))


@dataclass(frozen=True)
class TemperatureLosses:
    losses: tuple[float, ...]  # per temperature in TEMPERATURES, summed over labelled studies
    labelled: int
    positive: int

    def __add__(self, other: TemperatureLosses) -> TemperatureLosses:
        losses = tuple(a + b for a, b in zip(self.losses, other.losses, strict=True))
        return TemperatureLosses(losses, self.labelled + other.labelled, self.positive + other.positive)

    def best(self) -> float:
        """The temperature of least loss under ``TEMPERATURE_PRIOR``; 1 with one class only (nothing to
        calibrate against)."""
        if not 0 < self.positive < self.labelled:
            return 1.0
        losses = np.asarray(self.losses)
        if not np.isfinite(losses).all():
            return 1.0
        penalised = losses + TEMPERATURE_PRIOR * np.log(np.asarray(TEMPERATURES)) ** 2
        return TEMPERATURES[int(np.argmin(penalised))]


def temperature_losses(predictions: Sequence[Prediction], samples: Sequence[TrainingSample]) -> TemperatureLosses:
    """For each of ``TEMPERATURES``, the summed negative log-likelihood of the known study labels, with the
    counts of labelled and positive studies: sums that add up across sites."""
    pairs = [(p.study_probability, s.label) for p, s in zip(predictions, samples, strict=True) if s.label >= 0]
    if not pairs:
        return TemperatureLosses((0.0,) * len(TEMPERATURES), 0, 0)
    probabilities = np.clip(np.array([p for p, _ in pairs]), 1e-12, 1 - 1e-12)
    logits = np.log(probabilities / (1 - probabilities))
    y = np.array([label for _, label in pairs], dtype=np.float64)
    losses = tuple(float(np.sum(np.logaddexp(0, logits / t) - y * logits / t)) for t in TEMPERATURES)
    return TemperatureLosses(losses, len(pairs), int(y.sum()))


def setting_grid(default_min_volume_mm3: float, default_fraction: float) -> list[Setting]:
    """The settings tried, in a fixed order and number whatever the defaults (a site sends one score per
    entry): thresholds x minimum volumes (``VOLUME_FACTORS`` of the spec's) x shares (``FRACTIONS`` and the
    default; the default repeated when it is one of them)."""
    volumes = [f * default_min_volume_mm3 for f in VOLUME_FACTORS]
    fractions = sorted(set(FRACTIONS) | {default_fraction})
    fractions += [default_fraction] * (len(FRACTIONS) + 1 - len(fractions))
    return [(t, v, f) for t in THRESHOLDS for v in volumes for f in fractions]


def reference_setting(default_min_volume_mm3: float, default_fraction: float) -> Setting:
    """The setting a calibration must beat: threshold 0.5 and the spec's minimum volume and share."""
    return (0.5, default_min_volume_mm3, default_fraction)


GRID_LENGTH = len(THRESHOLDS) * len(VOLUME_FACTORS) * (len(FRACTIONS) + 1)


def setting_dice(
    predictions: Sequence[Prediction], samples: Sequence[TrainingSample], grid: Sequence[Setting], min_slices: int
) -> npt.NDArray[np.float64]:
    """Each study's Dice (rows) under each setting of ``grid`` (columns), made with temperature 1 and the
    minimum slice extent already chosen."""
    scores = np.zeros((len(samples), len(grid)))
    reference_voxels = [int(np.count_nonzero(s.lesions)) for s in samples]
    # per threshold and study: each component's voxels, voxels in the reference and slice extent
    components: dict[float, list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]]] = {}
    for j, (threshold, volume, fraction) in enumerate(grid):
        if threshold not in components:
            components[threshold] = []
            for prediction, sample in zip(predictions, samples, strict=True):
                labels = lesion_components(prediction.probability, threshold, 0.0, sample.voxel_mm3)
                sizes = np.bincount(labels.ravel())[1:]
                overlaps = np.bincount(labels[sample.lesions > 0], minlength=len(sizes) + 1)[1:]
                extents = slice_extents(labels, len(sizes))
                components[threshold].append((sizes, overlaps, extents))
        for i, ((sizes, overlaps, extents), sample) in enumerate(zip(components[threshold], samples, strict=True)):
            keep = kept_components(sizes, sample.voxel_mm3, volume, fraction, extents=extents, min_slices=min_slices)
            scores[i, j] = _component_dice(sizes[keep], overlaps[keep], reference_voxels[i])
    return scores


def gain_margins(
    gains: npt.NDArray[np.float64], gain_squares: npt.NDArray[np.float64], studies: int
) -> npt.NDArray[np.float64]:
    """Per setting, ``GAIN_STANDARD_ERRORS`` standard errors of its mean per-study gain over the reference
    setting, from the summed gains and summed squared gains; infinite with one study (no spread to judge it by)."""
    if studies < 2:
        return np.full_like(gains, np.inf)
    mean = gains / studies
    variance = np.clip((gain_squares - studies * mean**2) / (studies - 1), 0.0, None)
    return GAIN_STANDARD_ERRORS * np.sqrt(variance / studies)


def choose_setting(scores: Mapping[Setting, float], default: Setting, margins: Mapping[Setting, float]) -> Setting:
    """The setting whose mean validation Dice, less its margin (``gain_margins``), is best. A few validation
    studies decide little: the default stays unless the best adds ``MIN_GAIN`` on average and its gain over the
    default is still positive less that margin; among equal bounds the setting nearest to the default wins (a
    minimum volume fitted to three studies would delete any smaller true lesion in the next)."""
    baseline = scores.get(default, -1.0)
    threshold_0, volume_0, fraction_0 = default

    def distance(setting: Setting) -> float:
        threshold, volume, fraction = setting
        return (
            abs(threshold - threshold_0)
            + abs(math.log((volume + 1.0) / (volume_0 + 1.0)))
            + abs(fraction - fraction_0) * 10
        )

    bounds = {s: v - margins.get(s, 0.0) for s, v in scores.items() if v >= baseline + MIN_GAIN}
    bounds = {s: b for s, b in bounds.items() if b > baseline}
    if not bounds:
        return default
    best_bound = max(bounds.values())
    return min((s for s, b in bounds.items() if b >= best_bound - 1e-9), key=distance)


@dataclass(frozen=True)
class CalibrationSums:
    """Validation sums over studies from which the output settings are chosen: each study's Dice per entry of
    ``setting_grid``, the square of its gain over the reference setting (the spread ``gain_margins`` needs) and
    the study labels' losses per temperature, summed. A federation's sites each send theirs (aggregates, never a
    per-study value); added up, the choice equals the one made on all their studies together."""

    dice: tuple[float, ...]
    gain_squares: tuple[float, ...]
    studies: int
    temperature: TemperatureLosses

    @classmethod
    def of(
        cls,
        predictions: Sequence[Prediction],
        samples: Sequence[TrainingSample],
        default_min_volume_mm3: float,
        default_fraction: float,
        min_slices: int,
    ) -> CalibrationSums:
        grid = setting_grid(default_min_volume_mm3, default_fraction)
        scores = setting_dice(predictions, samples, grid, min_slices)
        gains = scores - scores[:, [grid.index(reference_setting(default_min_volume_mm3, default_fraction))]]
        return cls(
            tuple(float(d) for d in scores.sum(axis=0)),
            tuple(float(g) for g in (gains**2).sum(axis=0)),
            len(samples),
            temperature_losses(predictions, samples),
        )

    def __add__(self, other: CalibrationSums) -> CalibrationSums:
        def added(a: tuple[float, ...], b: tuple[float, ...]) -> tuple[float, ...]:
            return tuple(x + y for x, y in zip(a, b, strict=True))

        return CalibrationSums(
            added(self.dice, other.dice),
            added(self.gain_squares, other.gain_squares),
            self.studies + other.studies,
            self.temperature + other.temperature,
        )

    def shareable(self, min_studies: int) -> CalibrationSums | None:
        """What a site may send (``calibration-min-studies``): nothing under ``min_studies`` held-out studies,
        and the label losses as if no study were labelled under ``min_studies`` labelled ones. Fewer, and a sum
        would be one study's own Dice per setting, or its label and score."""
        if self.studies < min_studies:
            return None
        if self.temperature.labelled >= min_studies:
            return self
        return replace(self, temperature=TemperatureLosses((0.0,) * len(TEMPERATURES), 0, 0))

    def as_metrics(self) -> dict[str, int | list[float]]:
        """What a site sends (``messages.ALLOWED_VECTORS`` / ``ALLOWED_METRICS``)."""
        return {
            "calibration_dice": list(self.dice),
            "calibration_gain_sq": list(self.gain_squares),
            "calibration_studies": self.studies,
            "calibration_nll": list(self.temperature.losses),
            "calibration_labelled": self.temperature.labelled,
            "calibration_positive": self.temperature.positive,
        }

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, object]) -> CalibrationSums | None:
        """A site's sums from its reply (None when it sent none: no held-out study, or calibration off)."""
        vectors = [metrics.get(f"calibration_{k}") for k in ("dice", "gain_sq", "nll")]
        lengths = (GRID_LENGTH, GRID_LENGTH, len(TEMPERATURES))
        if not all(isinstance(v, list) and len(v) == n for v, n in zip(vectors, lengths, strict=True)):
            return None
        dice, squares, nll = (tuple(float(x) for x in v) for v in vectors if isinstance(v, list))
        counts = []
        for key in ("calibration_studies", "calibration_labelled", "calibration_positive"):
            value = metrics.get(key, 0)
            if not isinstance(value, int | float):
                return None
            counts.append(int(value))
        studies, labelled, positive = counts
        temperature = TemperatureLosses(nll, labelled, positive)
        return cls(dice, squares, studies, temperature)

    def calibration(self, default_min_volume_mm3: float, default_fraction: float) -> Calibration:
        """The chosen settings (``choose_setting``) and temperature."""
        if self.studies <= 0:
            raise ValueError("calibration needs validation studies")
        grid = setting_grid(default_min_volume_mm3, default_fraction)
        reference = reference_setting(default_min_volume_mm3, default_fraction)
        dice = np.asarray(self.dice)
        gains = dice - dice[grid.index(reference)]
        margins = gain_margins(gains, np.asarray(self.gain_squares), self.studies)
        scores: dict[Setting, float] = {}
        setting_margins: dict[Setting, float] = {}
        for setting, total, margin in zip(grid, self.dice, margins, strict=True):
            scores.setdefault(setting, total / self.studies)
            setting_margins.setdefault(setting, float(margin))
        chosen = choose_setting(scores, reference, setting_margins)
        return Calibration(*chosen, self.temperature.best(), scores[chosen], self.studies, scores[reference])


@dataclass(frozen=True)
class PooledSums:
    """The sites' calibration sums added up (None when no site sent any) and the sites that sent none because
    they held out fewer than ``calibration-min-studies`` studies."""

    total: CalibrationSums | None
    withheld: tuple[str, ...]

    @classmethod
    def of(cls, site_metrics: Mapping[str, Mapping[str, object]]) -> PooledSums:
        sent = [sums for m in site_metrics.values() if (sums := CalibrationSums.from_metrics(m)) is not None]
        withheld = tuple(sorted(site for site, m in site_metrics.items() if m.get("calibration_withheld")))
        return cls(sum(sent[1:], sent[0]) if sent else None, withheld)


def reference_kept(samples: Sequence[TrainingSample], min_volume_mm3: float) -> tuple[list[float], int]:
    """For each share in ``FRACTIONS``: the sum over studies with reference lesions of the part of their
    lesion volume that the share-of-largest rule keeps (at the task's minimum lesion volume, whose multiple
    protects large components); and how many studies that is. Sums and a count: what a site may send
    (aggregates, additive across sites)."""
    kept = np.zeros(len(FRACTIONS))
    studies = 0
    protected = protected_volume_mm3(min_volume_mm3)
    for sample in samples:
        found, count = ndimage.label(sample.lesions > 0, structure=np.ones((3, 3, 3), dtype=bool))
        if not count:
            continue
        sizes = np.bincount(found.ravel())[1:]
        for i, fraction in enumerate(FRACTIONS):
            share = kept_components(sizes, sample.voxel_mm3, 0.0, fraction, protected_mm3=protected)
            kept[i] += float(sizes[share].sum() / sizes.sum())
        studies += 1
    return kept.tolist(), studies


def fraction_from_kept(kept: Sequence[float], studies: int) -> float:
    """The largest share whose mean kept reference volume is at least ``KEPT_REFERENCE`` (0 without lesions)."""
    if studies <= 0:
        return 0.0
    share = np.asarray(kept, dtype=np.float64) / studies
    return max(f for f, k in zip(FRACTIONS, share, strict=True) if k >= KEPT_REFERENCE)


def reference_fraction(samples: Sequence[TrainingSample], min_volume_mm3: float) -> float:
    """The largest share in ``FRACTIONS`` that, applied to the training studies' own reference masks, keeps
    on average ``KEPT_REFERENCE`` of their lesion voxels: one large lesion with specks around it allows a
    high share, several lesions of similar size a low one, lesions of every size none."""
    return fraction_from_kept(*reference_kept(samples, min_volume_mm3))


def reference_extent_kept(samples: Sequence[TrainingSample], min_volume_mm3: float) -> tuple[float, float]:
    """(volume of the reference lesions spanning at least MULTI_SLICE slices, volume of all reference
    lesions), in mm3 over the studies, lesions being components of at least the minimum volume: sums that
    add up across sites."""
    kept = total = 0.0
    for sample in samples:
        found, count = ndimage.label(sample.lesions > 0, structure=np.ones((3, 3, 3), dtype=bool))
        if not count:
            continue
        volumes = np.bincount(found.ravel())[1:] * sample.voxel_mm3
        lesions = volumes >= min_volume_mm3
        total += float(volumes[lesions].sum())
        kept += float(volumes[lesions & (slice_extents(found, count) >= MULTI_SLICE)].sum())
    return kept, total


def slices_from_kept(kept_mm3: float, total_mm3: float) -> int:
    """MULTI_SLICE when the reference lesions keep KEPT_REFERENCE of their volume with it, else 1 (no rule)."""
    return MULTI_SLICE if total_mm3 > 0 and kept_mm3 >= KEPT_REFERENCE * total_mm3 else 1


def reference_slices(samples: Sequence[TrainingSample], min_volume_mm3: float) -> int:
    """The minimum slice extent the training studies' own reference masks allow (see MULTI_SLICE)."""
    return slices_from_kept(*reference_extent_kept(samples, min_volume_mm3))


def calibrate(
    predictions: Sequence[Prediction],
    samples: Sequence[TrainingSample],
    default_min_volume_mm3: float,
    default_fraction: float = 0.0,
    min_slices: int = 1,
) -> Calibration:
    """The output settings that do best on these validation studies (made with temperature 1), under the
    minimum slice extent already chosen."""
    if not samples:
        raise ValueError("calibration needs validation studies")
    sums = CalibrationSums.of(predictions, samples, default_min_volume_mm3, default_fraction, min_slices)
    return sums.calibration(default_min_volume_mm3, default_fraction)
