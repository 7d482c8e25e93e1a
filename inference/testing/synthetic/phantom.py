"""An analytic pelvis phantom in patient coordinates (LPS, mm).

The anatomy is defined once in millimetres, so every series of a study (T2W, ADC, DWI on different
grids, axial or oblique) samples the same body, and the reference segmentation agrees with all of
them. Shapes are ellipsoids whose surface is perturbed by a few low-frequency angular waves, which
gives lobulated, irregular outlines.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import numpy.typing as npt


class Tissue(IntEnum):
    """Tissue classes, painted in this order (later ones overwrite earlier ones)."""

    AIR = 0
    FAT = 1
    MUSCLE = 2
    BLADDER = 3
    RECTUM = 4
    TRANSITION_ZONE = 5
    PERIPHERAL_ZONE = 6
    LESION = 7


@dataclass(frozen=True)
class Blob:
    """An irregular ellipsoid: centre, radii (mm), rotation, and surface waves."""

    centre: tuple[float, float, float]
    radii: tuple[float, float, float]
    rotation: tuple[tuple[float, ...], ...]  # 3 x 3, columns are the blob's axes in LPS
    wave_directions: tuple[tuple[float, float, float], ...] = ()
    wave_amplitudes: tuple[float, ...] = ()
    wave_phases: tuple[float, ...] = ()

    def contains(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        """Which of the ``(n, 3)`` LPS points lie inside."""
        inside = np.zeros(len(points), dtype=bool)
        # Cheap bounding-box test first: most points are far from small structures.
        reach = max(self.radii) * (1.0 + sum(self.wave_amplitudes))
        offset = points - np.asarray(self.centre)
        candidates = np.flatnonzero(np.all(np.abs(offset) <= reach, axis=1))
        inside[candidates] = self._contains_local(offset[candidates])
        return inside

    def _contains_local(self, offset: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        local = offset @ np.asarray(self.rotation)
        scaled = local / np.asarray(self.radii)
        radius = np.linalg.norm(scaled, axis=1)
        surface = np.ones_like(radius)
        if self.wave_amplitudes:
            unit = scaled / np.maximum(radius, 1e-9)[:, None]
            for direction, amplitude, phase in zip(
                self.wave_directions, self.wave_amplitudes, self.wave_phases, strict=True
            ):
                surface += amplitude * np.cos(3.0 * (unit @ np.asarray(direction)) + phase)
        return np.asarray(radius <= surface)

    @property
    def volume_mm3(self) -> float:
        """Volume of the unperturbed ellipsoid (the waves average out to first order)."""
        a, b, c = self.radii
        return float(4.0 / 3.0 * np.pi * a * b * c)


@dataclass(frozen=True)
class Lesion:
    blob: Blob
    grade_group: int  # ISUP-like 1..5; >= 2 is clinically significant


@dataclass(frozen=True)
class Phantom:
    """One patient's pelvis."""

    body: Blob
    muscle: tuple[Blob, ...]
    bladder: Blob
    rectum: Blob
    gland: Blob
    transition_zone: Blob
    lesions: tuple[Lesion, ...]

    def tissue_at(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
        labels = np.zeros(len(points), dtype=np.uint8)
        labels[self.body.contains(points)] = Tissue.FAT
        for blob in self.muscle:
            labels[blob.contains(points)] = Tissue.MUSCLE
        labels[self.bladder.contains(points)] = Tissue.BLADDER
        labels[self.rectum.contains(points)] = Tissue.RECTUM
        labels[self.gland.contains(points)] = Tissue.PERIPHERAL_ZONE
        labels[self.transition_zone.contains(points) & (labels == Tissue.PERIPHERAL_ZONE)] = Tissue.TRANSITION_ZONE
        for lesion in self.lesions:
            labels[lesion.blob.contains(points)] = Tissue.LESION
        return labels

    def lesion_index_at(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
        """0 outside every lesion, else 1 + the index of the (last painted) lesion."""
        index = np.zeros(len(points), dtype=np.uint8)
        for number, lesion in enumerate(self.lesions, start=1):
            index[lesion.blob.contains(points)] = number
        return index

    def gland_at(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        return self.gland.contains(points)


def _rotation(rng: np.random.Generator, max_angle_deg: float) -> tuple[tuple[float, ...], ...]:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_angle_deg, max_angle_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    matrix = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)
    return tuple(tuple(float(v) for v in row) for row in matrix)


def _blob(
    rng: np.random.Generator,
    centre: npt.ArrayLike,
    radii: npt.ArrayLike,
    *,
    max_angle_deg: float = 15.0,
    irregularity: float = 0.0,
    waves: int = 3,
) -> Blob:
    directions = rng.normal(size=(waves, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return Blob(
        centre=tuple(float(v) for v in np.asarray(centre)),  # type: ignore[arg-type]
        radii=tuple(float(v) for v in np.asarray(radii)),  # type: ignore[arg-type]
        rotation=_rotation(rng, max_angle_deg),
        wave_directions=tuple(tuple(float(v) for v in d) for d in directions) if irregularity else (),  # type: ignore[misc]
        wave_amplitudes=tuple(float(a) for a in rng.uniform(0.3, 1.0, waves) * irregularity / waves)
        if irregularity
        else (),
        wave_phases=tuple(float(p) for p in rng.uniform(0, 2 * np.pi, waves)) if irregularity else (),
    )


def random_phantom(rng: np.random.Generator, centre: npt.ArrayLike, n_lesions: int) -> Phantom:
    """A plausible pelvis around the gland centre ``centre`` (LPS mm) with ``n_lesions`` lesions.

    Sizes follow adult anatomy: gland about 45 x 32 x 35 mm (LR x AP x SI), lesions 4-11 mm in radius,
    mostly in the peripheral zone as in most clinically significant cancers.
    """
    c = np.asarray(centre, dtype=np.float64)
    gland_radii = np.array([22.0, 16.0, 18.0]) * rng.uniform(0.85, 1.2)
    gland = _blob(rng, c, gland_radii, max_angle_deg=10, irregularity=0.12)
    # Transition zone: anterior-central part of the gland (anterior is -P in LPS).
    tz = _blob(rng, c + [0.0, -4.0, 2.0], gland_radii * [0.55, 0.5, 0.6], max_angle_deg=8, irregularity=0.1)
    body = _blob(rng, c + [0.0, -10.0, 0.0], [170.0, 115.0, 400.0], max_angle_deg=3, irregularity=0.03)
    muscle = (
        _blob(rng, c + [-60.0, 10.0, 10.0], [28.0, 45.0, 120.0], max_angle_deg=10, irregularity=0.08),
        _blob(rng, c + [60.0, 10.0, 10.0], [28.0, 45.0, 120.0], max_angle_deg=10, irregularity=0.08),
    )
    bladder = _blob(
        rng, c + [0.0, -15.0, 45.0], np.array([40.0, 32.0, 28.0]) * rng.uniform(0.7, 1.2), irregularity=0.05
    )
    rectum = _blob(rng, c + [0.0, gland_radii[1] + 14.0, -2.0], [16.0, 11.0, 60.0], irregularity=0.1)
    lesions: list[Lesion] = []
    for _ in range(n_lesions):
        radii = rng.uniform(4.0, 10.0) * rng.uniform(0.7, 1.0, 3)
        # Rejection-sample a centre inside the gland, favouring the peripheral zone, apart from the
        # other lesions (so that every lesion keeps its own voxels in the reference segmentation).
        for _attempt in range(500):
            offset = rng.uniform(-1, 1, 3) * gland_radii * 0.75
            point = (c + offset)[None, :]
            apart = all(
                np.linalg.norm(point[0] - np.asarray(other.blob.centre)) > 1.35 * (max(radii) + max(other.blob.radii))
                for other in lesions
            )
            if apart and gland.contains(point)[0] and (not tz.contains(point)[0] or rng.random() < 0.25):
                break
        grade = int(rng.choice([1, 2, 3, 4, 5], p=[0.3, 0.3, 0.2, 0.12, 0.08]))
        lesions.append(Lesion(_blob(rng, point[0], radii, max_angle_deg=45, irregularity=0.25), grade))
    return Phantom(body, muscle, bladder, rectum, gland, tz, tuple(lesions))
