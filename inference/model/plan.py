"""Fingerprint -> plan, in the spirit of nnU-Net (Isensee et al., Nature Methods 2021): the model grid, the
2-D or 3-D network, its patch, batch and topology, and the intensity normalisation are derived from
statistics of the training data, not set by hand. The task spec may fix any part (its explicit values win).

Everything here is computed from summaries (spacings, shapes, foreground intensity statistics), so a
federation builds the same plan from what sites already share, never from images. A plan is recorded in
every model artifact; inference reads the grid, patch and normalisation back from it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np

from radfed.inference.errors import RadfedError

PLAN_FORMAT = "radfed-plan/1"

# A voxel spacing this many times coarser than the finest axis marks thick-slice data (nnU-Net uses 3).
ANISOTROPY_RATIO = 3.0
# Fewer slices than this share of the in-plane size: a stack of slabs that a 3-D patch cannot pool.
THIN_STACK_RATIO = 0.25
# The network pools an axis until the bottleneck is about this many voxels along it.
BOTTLENECK_VOXELS = 8
# Smallest batch a plan allows: nnU-Net's 2, so that a 2-D patch covers the whole slice before the batch grows
# (brain set, 3 folds x 10 min: whole 256 x 256 slices at batch 2 gave Dice 0.61 and 2.2 FP per study against 0.59
# and 3.1 for 128 x 128 at batch 8).
MIN_BATCH = {2: 2, 3: 2}
# DP-SGD adds noise of the clipping norm's scale to each step's summed gradient, so its share per patch falls with
# the batch: a differentially private job keeps batches of at least this many and shrinks the patch instead.
PRIVATE_MIN_BATCH = 8


class PlanError(RadfedError, ValueError):
    """A plan cannot be derived or read; the message says what is missing."""


class Architecture(StrEnum):
    DYNUNET = "dynunet"  # nnU-Net's topology (MONAI DynUNet)
    SEGRESNET = "segresnet"  # MONAI SegResNet
    UNET = "unet"  # MONAI UNet (residual units)
    UNET3D = "unet3d"  # radfed's first compact 3-D U-Net (kept as a choice)


class Normalization(StrEnum):
    PERCENTILE = "percentile"  # foreground low..high percentiles -> 0..1 (the first wave's default)
    ZSCORE = "zscore"  # per image, over the foreground (MR and other relative-intensity modalities)
    CT = "ct"  # clip to the training set's foreground 0.5 / 99.5 percentiles, then its global z-score
    LANDMARKS = "landmarks"  # federated harmonisation: piecewise-linear onto shared landmarks


class Device(StrEnum):
    CPU = "cpu"
    GPU = "gpu"


@dataclass(frozen=True)
class ComputeBudget:
    """How large a network and patch the plan may choose: voxels in one training batch and the features at
    the first stage. The CPU budget was sized so that one step takes ~1 s on one core (bench quality)."""

    device: Device
    batch_voxels: int
    base_features: int
    max_features: int

    @classmethod
    def for_device(cls, device: Device | str) -> ComputeBudget:
        device = Device(device)
        if device is Device.GPU:
            return cls(device, batch_voxels=2 * 128 * 128 * 128, base_features=32, max_features=320)
        return cls(device, batch_voxels=8 * 128 * 128, base_features=16, max_features=256)


@dataclass(frozen=True)
class ChannelStatistics:
    """Foreground intensities of one channel pooled over the training studies."""

    voxels: int
    mean: float
    std: float
    percentile_00_5: float
    percentile_99_5: float


@dataclass(frozen=True)
class StudyFingerprint:
    """What one study contributes to the fingerprint: its native reference grid and its channels'
    foreground intensity statistics (mean, sum of squares, and the 0.5 / 99.5 percentiles)."""

    spacing_mm: tuple[float, float, float]
    shape: tuple[int, int, int]
    channels: Mapping[str, ChannelStatistics]

    @classmethod
    def of(
        cls, spacing_mm: Sequence[float], shape: Sequence[int], channels: Mapping[str, np.ndarray]
    ) -> StudyFingerprint:
        """From a study's (native-grid) spacing and shape and its channels' foreground voxels."""
        stats = {}
        for name, values in channels.items():
            values = np.asarray(values, dtype=np.float64).ravel()
            if values.size == 0:
                values = np.zeros(1)
            low, high = np.percentile(values, [0.5, 99.5])
            stats[name] = ChannelStatistics(
                int(values.size), float(values.mean()), float(values.std()), float(low), float(high)
            )
        return cls(
            (float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2])),
            (int(shape[0]), int(shape[1]), int(shape[2])),
            stats,
        )


@dataclass(frozen=True)
class DatasetFingerprint:
    """Summary statistics of a training set: all a plan needs, and all a site shares for one."""

    studies: int
    median_spacing_mm: tuple[float, float, float]
    low_spacing_mm: tuple[float, float, float]  # the 10th percentile per axis (thick-slice target)
    median_shape: tuple[int, int, int]  # in voxels on the native grid
    channels: Mapping[str, ChannelStatistics]

    @classmethod
    def from_studies(cls, studies: Sequence[StudyFingerprint]) -> DatasetFingerprint:
        if not studies:
            raise PlanError("a fingerprint needs at least one study")
        spacings = np.array([s.spacing_mm for s in studies])
        shapes = np.array([s.shape for s in studies])
        names = list(studies[0].channels)
        return cls(
            studies=len(studies),
            median_spacing_mm=_triple(np.median(spacings, axis=0)),
            low_spacing_mm=_triple(np.percentile(spacings, 10, axis=0)),
            median_shape=_int_triple(np.median(shapes, axis=0)),
            channels={name: _pool([s.channels[name] for s in studies]) for name in names},
        )

    @classmethod
    def merge(cls, sites: Sequence[DatasetFingerprint]) -> DatasetFingerprint:
        """A federation's fingerprint from its sites' summaries: study-weighted means of the medians and
        percentiles (an approximation of the pooled median), exact pooled means and variances."""
        if not sites:
            raise PlanError("no site sent a fingerprint")
        weights = np.array([s.studies for s in sites], dtype=np.float64)
        weights /= weights.sum()

        def weighted(values: Sequence[Sequence[float]]) -> np.ndarray:
            return np.asarray(np.average(np.asarray(values, dtype=np.float64), axis=0, weights=weights))

        names = list(sites[0].channels)
        return cls(
            studies=int(sum(s.studies for s in sites)),
            median_spacing_mm=_triple(weighted([s.median_spacing_mm for s in sites])),
            low_spacing_mm=_triple(weighted([s.low_spacing_mm for s in sites])),
            median_shape=_int_triple(weighted([s.median_shape for s in sites])),
            channels={name: _pool([s.channels[name] for s in sites]) for name in names},
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetFingerprint:
        return cls(
            studies=int(data["studies"]),
            median_spacing_mm=_triple(data["median_spacing_mm"]),
            low_spacing_mm=_triple(data["low_spacing_mm"]),
            median_shape=_int_triple(data["median_shape"]),
            channels={k: ChannelStatistics(**v) for k, v in data["channels"].items()},
        )


def _triple(values: Any) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return (a, b, c)


def _int_triple(values: Any) -> tuple[int, int, int]:
    a, b, c = (round(float(v)) for v in values)
    return (a, b, c)


def _pool(parts: Sequence[ChannelStatistics]) -> ChannelStatistics:
    """Pooled mean and variance are exact from counts, means and variances; the percentiles are
    voxel-weighted means of the parts' percentiles."""
    counts = np.array([max(p.voxels, 1) for p in parts], dtype=np.float64)
    means = np.array([p.mean for p in parts])
    total = counts.sum()
    mean = float((counts * means).sum() / total)
    second = float((counts * (np.array([p.std for p in parts]) ** 2 + means**2)).sum() / total)
    return ChannelStatistics(
        voxels=int(total),
        mean=mean,
        std=math.sqrt(max(second - mean**2, 0.0)),
        percentile_00_5=float((counts * [p.percentile_00_5 for p in parts]).sum() / total),
        percentile_99_5=float((counts * [p.percentile_99_5 for p in parts]).sum() / total),
    )


@dataclass(frozen=True)
class NetworkPlan:
    """A network's topology. Kernel sizes and strides are given per stage in 3-D (slice, row, column)
    order; a 2-D network drops the slice entry."""

    architecture: Architecture
    spatial_dims: int
    filters: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, int, int], ...]
    strides: tuple[tuple[int, int, int], ...]
    norm: str = "instance"  # instance | group (DP-SGD forbids batch norm)
    deep_supervision: int = 2  # auxiliary outputs at lower resolutions (DynUNet), 0 for none
    groups: int = 8  # GroupNorm groups where norm = group
    # 2.5-D: a 2-D network also sees this many slices either side of its slice, as extra input channels
    context_slices: int = 0
    residual: bool = False  # DynUNet only: its encoder blocks (input, downsampling, bottleneck) made residual

    def input_channels(self, channels: int) -> int:
        """The network's input channels for a task of ``channels`` image channels."""
        return channels * (1 + 2 * self.context_slices)


@dataclass(frozen=True)
class Plan:
    """How data become model input and which network sees it."""

    spacing_mm: tuple[float, float, float]
    patch_size: tuple[int, int, int]  # (1, rows, columns) for a 2-D network
    batch_size: int
    normalization: Mapping[str, Normalization]
    intensity: Mapping[str, ChannelStatistics]  # used by CT normalisation
    network: NetworkPlan
    reasons: tuple[str, ...] = field(default=())  # why each choice was made, for the model card

    def to_json(self) -> str:
        data = asdict(self)
        data["format"] = PLAN_FORMAT
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
            if data.pop("format", None) != PLAN_FORMAT:
                raise PlanError(f"not a {PLAN_FORMAT} plan")
            net = data["network"]
            return cls(
                spacing_mm=_triple(data["spacing_mm"]),
                patch_size=_int_triple(data["patch_size"]),
                batch_size=int(data["batch_size"]),
                normalization={k: Normalization(v) for k, v in data["normalization"].items()},
                intensity={k: ChannelStatistics(**v) for k, v in data["intensity"].items()},
                network=NetworkPlan(
                    architecture=Architecture(net["architecture"]),
                    spatial_dims=int(net["spatial_dims"]),
                    filters=tuple(int(f) for f in net["filters"]),
                    kernel_sizes=tuple(_int_triple(k) for k in net["kernel_sizes"]),
                    strides=tuple(_int_triple(s) for s in net["strides"]),
                    norm=str(net["norm"]),
                    deep_supervision=int(net["deep_supervision"]),
                    groups=int(net["groups"]),
                    context_slices=int(net.get("context_slices", 0)),  # plans written before 2.5-D: none
                    residual=bool(net.get("residual", False)),  # plans written before session 36: plain blocks
                ),
                reasons=tuple(data.get("reasons", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"plan is malformed: {exc}") from exc


@dataclass(frozen=True)
class PlanOverrides:
    """What a task spec fixes; every ``None`` is derived from the fingerprint."""

    modalities: Mapping[str, str]  # channel -> DICOM modality (MR, CT, ...), in model order
    spacing_mm: tuple[float, float, float] | None = None
    patch_size: tuple[int, int, int] | None = None
    spatial_dims: int | None = None
    batch_size: int | None = None
    normalization: Normalization | None = None
    architecture: Architecture = Architecture.DYNUNET
    filters: tuple[int, ...] | None = None
    norm: str = "instance"
    groups: int = 8
    deep_supervision: int | None = None
    context_slices: int = 0  # 2-D networks only
    residual: bool = False  # DynUNet only


def _target_spacing(fp: DatasetFingerprint, reasons: list[str]) -> tuple[float, float, float]:
    median = np.array(fp.median_spacing_mm)
    target = median.copy()
    coarsest = int(np.argmax(median))
    if median[coarsest] > ANISOTROPY_RATIO * median.min():
        # Thick slices: a low percentile of that axis, so thin-slice studies are not blurred and thick
        # ones not interpolated into fake detail (nnU-Net's rule).
        target[coarsest] = max(fp.low_spacing_mm[coarsest], ANISOTROPY_RATIO * median.min() * 0.999)
        target[coarsest] = min(target[coarsest], median[coarsest])
        reasons.append(f"anisotropic spacing {median.round(2).tolist()}: axis {coarsest} target {target[coarsest]:.2f}")
    reasons.append(f"target spacing {target.round(3).tolist()} mm (median of {fp.studies} studies)")
    return _triple(target)


def _choose_dims(spacing: np.ndarray, shape: np.ndarray, reasons: list[str]) -> int:
    if spacing[0] > ANISOTROPY_RATIO * spacing[1:].min():
        reasons.append(f"2-D: slice spacing {spacing[0]:.2f} mm > {ANISOTROPY_RATIO:g} x in-plane")
        return 2
    if shape[0] < THIN_STACK_RATIO * shape[1:].min():
        reasons.append(f"2-D: {shape[0]} slices against {shape[1:].min()} in-plane voxels (a stack of slabs)")
        return 2
    reasons.append("3-D: near-isotropic spacing and enough slices")
    return 3


def _fit_patch(shape: np.ndarray, dims: int, budget: ComputeBudget, minimum_batch: int) -> tuple[int, int, int]:
    """The median image (after resampling) as patch, shrunk along its largest axis until a batch of at
    least ``minimum_batch`` fits the budget; each axis a multiple of 16 (8 for a short slice axis)."""

    def rounded(value: float, multiple: int) -> int:
        return max(multiple, math.ceil(value / multiple) * multiple)

    patch = np.array([1.0, shape[1], shape[2]]) if dims == 2 else shape.astype(np.float64).copy()
    while np.prod(patch) * minimum_batch > budget.batch_voxels:
        axis = int(np.argmax(patch[1:] if dims == 2 else patch)) + (1 if dims == 2 else 0)
        patch[axis] *= 0.9
    multiples = [1 if dims == 2 else (16 if patch[0] >= 24 else 8), 16, 16]
    return _int_triple([1 if dims == 2 else rounded(patch[0], multiples[0])] + [rounded(p, 16) for p in patch[1:]])


def _topology(
    patch: tuple[int, int, int], spacing: tuple[float, float, float], dims: int
) -> tuple[tuple[tuple[int, int, int], ...], tuple[tuple[int, int, int], ...]]:
    """Pool each axis while it stays >= BOTTLENECK_VOXELS and its spacing is not much coarser than the
    finest (in-plane-only kernels and pooling first on thick slices, as nnU-Net does)."""
    size = np.array(patch, dtype=np.float64)
    current = np.array(spacing, dtype=np.float64)
    kernels: list[tuple[int, int, int]] = []
    strides: list[tuple[int, int, int]] = [(1, 1, 1)]
    while True:
        axes_3d = range(3) if dims == 3 else range(1, 3)
        kernel = [1 if dims == 2 else 3, 3, 3]
        if dims == 3 and current[0] > 2 * current[1:].min():
            kernel[0] = 1
        kernels.append(_int_triple(kernel))
        stride = [1, 1, 1]
        for axis in axes_3d:
            comparable = current[axis] <= 2 * current[list(axes_3d)].min()
            if size[axis] / 2 >= BOTTLENECK_VOXELS and comparable:
                stride[axis] = 2
        if stride == [1, 1, 1] or len(kernels) >= 7:
            break
        strides.append(_int_triple(stride))
        size /= stride
        current *= stride
    kernels.append(kernels[-1])
    return tuple(kernels[: len(strides)]), tuple(strides)


def _minimum_batch(dims: int, private: bool) -> int:
    return max(MIN_BATCH[dims], PRIVATE_MIN_BATCH if private else 0)


def derive_plan(
    overrides: PlanOverrides,
    fingerprint: DatasetFingerprint | None,
    budget: ComputeBudget | None = None,
    *,
    private: bool = False,
) -> Plan:
    """The plan for a task: the spec's explicit choices, the rest derived from the fingerprint; ``private``:
    the job trains with differential privacy (larger batches, see PRIVATE_MIN_BATCH)."""
    budget = budget or ComputeBudget.for_device(Device.CPU)
    reasons: list[str] = []

    def needed(what: str) -> DatasetFingerprint:
        if fingerprint is None:
            raise PlanError(f"the task spec leaves {what} to the plan, which needs the training data's fingerprint")
        return fingerprint

    spacing = overrides.spacing_mm or _target_spacing(needed("the voxel spacing"), reasons)
    if overrides.patch_size is not None:
        patch = overrides.patch_size
        dims = overrides.spatial_dims or (2 if patch[0] == 1 else 3)
    else:
        fp = needed("the patch size")
        native = np.array(fp.median_spacing_mm) * np.array(fp.median_shape)
        shape = np.maximum(1, np.round(native / np.array(spacing)))
        dims = overrides.spatial_dims or _choose_dims(np.array(spacing), shape, reasons)
        patch = _fit_patch(shape, dims, budget, overrides.batch_size or _minimum_batch(dims, private))
        reasons.append(f"median shape {shape.astype(int).tolist()} at target spacing -> patch {list(patch)}")
    if dims == 2 and patch[0] != 1:
        raise PlanError(f"a 2-D network takes patches of one slice, got {list(patch)}")
    # at least the minimum the patch was fitted for: rounding the patch up to multiples of 16 can leave the
    # budget room for half as many (a 3-D DP job planned 4 where it needs 8)
    batch = overrides.batch_size or max(
        _minimum_batch(dims, private), int(np.clip(budget.batch_voxels // int(np.prod(patch)), 2, 16))
    )
    normalization: dict[str, Normalization] = {}
    for channel, modality in overrides.modalities.items():
        if overrides.normalization is not None:
            normalization[channel] = overrides.normalization
        else:
            normalization[channel] = Normalization.CT if modality.upper() == "CT" else Normalization.ZSCORE
    intensity: dict[str, ChannelStatistics] = {}
    if Normalization.CT in normalization.values():
        intensity = dict(needed("CT intensity statistics").channels)
    kernels, strides = _topology(patch, spacing, dims)
    if overrides.filters is not None:
        filters = tuple(overrides.filters)
        if overrides.architecture is Architecture.DYNUNET and len(filters) != len(strides):
            raise PlanError(f"model.features names {len(filters)} stages; the plan has {len(strides)}")
    else:
        filters = tuple(min(budget.base_features * 2**i, budget.max_features) for i in range(len(strides)))
    deep = overrides.deep_supervision
    if deep is None:
        deep = min(2, len(strides) - 2) if overrides.architecture is Architecture.DYNUNET else 0
    reasons.append(f"{dims}-D {overrides.architecture.value}, {len(strides)} stages, filters {list(filters)}")
    context = overrides.context_slices if dims == 2 else 0
    if context:
        reasons.append(f"2.5-D: {context} slice(s) either side of each slice as input channels")
    if overrides.residual:
        reasons.append("residual blocks in every stage (the spec's model.residual)")
    return Plan(
        spacing_mm=spacing,
        patch_size=patch,
        batch_size=batch,
        normalization=normalization,
        intensity=intensity,
        network=NetworkPlan(
            architecture=overrides.architecture,
            spatial_dims=dims,
            filters=filters,
            kernel_sizes=kernels,
            strides=strides,
            norm=overrides.norm,
            deep_supervision=max(0, deep),
            groups=overrides.groups,
            context_slices=context,
            residual=overrides.residual,
        ),
        reasons=tuple(reasons),
    )
