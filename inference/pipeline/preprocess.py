"""Exactly one preprocessing for training and inference: load the planned series (:mod:`.input_plan`),
resample every channel onto the reference series' grid, then onto the model grid (same orientation, the spec's
spacing), and normalise intensities per channel (percentiles, z-score, or harmonised landmarks)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from radfed.inference.dicom.resample import resample_to
from radfed.inference.dicom.selection import SeriesSelection, frame_pick
from radfed.inference.dicom.series import volume_from_datasets
from radfed.inference.dicom.study_source import StudySource
from radfed.inference.dicom.volume import Volume
from radfed.inference.errors import DicomInputError
from radfed.inference.model.plan import ChannelStatistics, Normalization
from radfed.inference.model.taskspec import TaskSpec
from radfed.inference.pipeline.input_plan import InputPlan, plan_study
from radfed.inference.pipeline.landmarks import LANDMARK_PERCENTILES


@dataclass(frozen=True, eq=False)
class LoadedStudy:
    """The planned series as volumes; every channel already on the reference grid."""

    plan: InputPlan
    reference: Volume
    channels: dict[str, Volume]
    reference_datasets: tuple[object, ...]
    evidence_datasets: tuple[object, ...]

    @property
    def selection(self) -> SeriesSelection:
        return self.plan.selection

    @property
    def fingerprint(self) -> str:
        return self.plan.fingerprint


@dataclass(frozen=True, eq=False)
class PreparedStudy:
    """Model-space input: ``image`` is (channels, slices, rows, columns) on ``model_grid``."""

    loaded: LoadedStudy
    model_grid: Volume
    image: npt.NDArray[np.float32]


def load_study(source: StudySource, spec: TaskSpec, plan: InputPlan | None = None) -> LoadedStudy:
    """Load exactly the planned instances (planned here from the source's headers when no plan is given) and
    align every channel on the reference grid."""
    plan = plan if plan is not None else plan_study(source, spec)
    missing = [name for name in spec.channel_names if name not in {c.channel for c in plan.channels}]
    if missing:
        raise DicomInputError(f"the job's plan has no series for channel(s) {', '.join(missing)}")
    reference_name = spec.reference_channel.name
    datasets = {name: source.datasets_at(plan.channel(name).locations) for name in spec.channel_names}
    # Where a series holds several kinds of image at each position (b-values, image types), the rule picks one.
    rules = {rule.name: rule for rule in spec.channels}
    reference = volume_from_datasets(datasets[reference_name], pick=frame_pick(rules[reference_name]))
    channels = {}
    for name in spec.channel_names:
        if name == reference_name:
            volume = reference
        else:
            volume = volume_from_datasets(datasets[name], pick=frame_pick(rules[name]))
        channels[name] = volume if name == reference_name else resample_to(volume, reference)
    return LoadedStudy(
        plan=plan,
        reference=reference,
        channels=channels,
        reference_datasets=tuple(datasets[reference_name]),
        evidence_datasets=tuple(ds for name in spec.channel_names if name != reference_name for ds in datasets[name]),
    )


def model_grid_for(reference: Volume, spacing_mm: Sequence[float]) -> Volume:
    """A grid with the reference's orientation and centre, the given spacing, covering its extent."""
    directions = reference.affine[:3, :3] / np.linalg.norm(reference.affine[:3, :3], axis=0)
    extent = np.array(reference.shape, dtype=np.float64) * np.array(reference.spacing)
    shape = tuple(max(1, math.ceil(e / s - 1e-6)) for e, s in zip(extent, spacing_mm, strict=True))
    centre = reference.index_to_lps((np.array(reference.shape) - 1) / 2.0)
    affine = np.eye(4)
    affine[:3, :3] = directions * np.asarray(spacing_mm, dtype=np.float64)
    affine[:3, 3] = centre - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return Volume(np.zeros(shape, dtype=np.uint8), affine, reference.frame_of_reference_uid)


def foreground(values: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
    """Voxels above background (air): at least 5 % of the 99th percentile."""
    high = float(np.percentile(values, 99.0))
    selected = values[values > 0.05 * high]
    return selected if selected.size > 100 else values.ravel()


def landmarks_of(values: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    """The intensity landmarks (at :data:`LANDMARK_PERCENTILES`) of one channel's foreground."""
    return np.asarray(np.percentile(foreground(values), LANDMARK_PERCENTILES), dtype=np.float64)


def normalize(
    values: npt.NDArray[np.floating],
    method: Normalization,
    percentiles: tuple[float, float] = (1.0, 99.0),
    reference_landmarks: Sequence[float] | None = None,
    statistics: ChannelStatistics | None = None,
) -> npt.NDArray[np.float32]:
    """Intensity normalisation of one channel.

    ``percentile`` maps the foreground's low..high percentiles to 0..1; ``zscore`` standardises the
    foreground; ``ct`` clips to the training set's foreground 0.5 / 99.5 percentiles and standardises with
    its foreground mean and deviation (``statistics``, from the plan); ``landmarks`` maps this image's
    landmarks piecewise-linearly onto shared reference landmarks (federated harmonisation), then scales the
    reference range to 0..1.
    """
    values = values.astype(np.float32, copy=False)
    if method is Normalization.CT:
        if statistics is None:
            raise ValueError("CT normalisation needs the training set's intensity statistics (the plan's)")
        clipped = np.clip(values, statistics.percentile_00_5, statistics.percentile_99_5)
        return np.asarray((clipped - statistics.mean) / max(statistics.std, 1e-6), dtype=np.float32)
    if method is Normalization.PERCENTILE:
        low, high = np.percentile(foreground(values), percentiles)
        return np.asarray((values - low) / max(float(high - low), 1e-6), dtype=np.float32)
    if method is Normalization.ZSCORE:
        fg = foreground(values)
        return np.asarray((values - fg.mean()) / max(float(fg.std()), 1e-6), dtype=np.float32)
    if reference_landmarks is None:
        raise ValueError("landmark normalisation needs the federation's reference landmarks")
    own = landmarks_of(values)
    target = np.asarray(reference_landmarks, dtype=np.float64)
    own = np.maximum.accumulate(own + np.arange(len(own)) * 1e-6)  # strictly increasing for np.interp
    # np.interp clamps outside the first/last landmark. Beyond them the map continues with the slope of the
    # whole landmark range: the end segments' own slopes (90th..99th percentile) can be many times steeper
    # and stretched one site's brightest voxels to 4.5 on the 0..1 scale (kurtosis 11 -> 107, issue 17).
    mapped = np.interp(values, own, target)
    slope = (target[-1] - target[0]) / max(own[-1] - own[0], 1e-6)
    mapped = np.where(values < own[0], target[0] + (values - own[0]) * slope, mapped)
    mapped = np.where(values > own[-1], target[-1] + (values - own[-1]) * slope, mapped)
    scale = max(float(target[-1] - target[0]), 1e-6)
    return np.asarray((mapped - target[0]) / scale, dtype=np.float32)


def resample_channels(loaded: LoadedStudy, grid: Volume, spec: TaskSpec) -> npt.NDArray[np.float32]:
    """The spec's channels on the model grid, not yet normalised: (channels, slices, rows, columns)."""
    return np.stack([resample_to(loaded.channels[name], grid).array for name in spec.channel_names]).astype(np.float32)


def normalize_channels(
    raw: npt.NDArray[np.floating], spec: TaskSpec, harmonisation: Mapping[str, Sequence[float]] | None = None
) -> npt.NDArray[np.float32]:
    """The spec's normalisation of each channel of a resampled stack; with harmonisation landmarks, every
    channel is mapped onto the federation's shared scale instead (training and inference alike)."""
    intensity = spec.plan.intensity if spec.plan is not None else {}
    return np.stack(
        [
            normalize(
                raw[index],
                Normalization.LANDMARKS if harmonisation is not None else spec.normalization_of(name),
                spec.preprocessing.percentiles,
                harmonisation.get(name) if harmonisation is not None else None,
                intensity.get(name),
            )
            for index, name in enumerate(spec.channel_names)
        ]
    ).astype(np.float32)


def prepare(
    loaded: LoadedStudy, spec: TaskSpec, harmonisation: Mapping[str, Sequence[float]] | None = None
) -> PreparedStudy:
    """Channels on the model grid, normalised, stacked in the spec's channel order."""
    grid = model_grid_for(loaded.reference, spec.spacing_mm)
    return PreparedStudy(loaded, grid, normalize_channels(resample_channels(loaded, grid, spec), spec, harmonisation))


def labels_to_model_grid(labels: Volume, grid: Volume) -> npt.NDArray[np.uint8]:
    """A label volume on the reference grid, resampled (nearest) onto the model grid."""
    return np.asarray(resample_to(labels, grid, "nearest").array, dtype=np.uint8)
