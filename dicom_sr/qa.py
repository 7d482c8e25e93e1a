"""Quality assurance before storage: re-read what was encoded and compare it with what was meant.

The SEG is decoded independently of highdicom, which wrote it: first voxel for voxel in numpy
(:mod:`radfed.dicom_sr.seg_exact`); when that finds any difference, by radfed's general reader (placing frames
by geometry on the reference grid), and each segment's centroid and extent in patient coordinates (mm) must
match the mask it came from.
Flipped and shifted SEGs are the most reported AI-result bug; this is where they are stopped.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.sr.coding import Code

from radfed.dicom_sr.profile import SrVariant
from radfed.dicom_sr.seg_exact import exact_mismatch
from radfed.inference.dicom.seg_reader import read_segmentation_labels
from radfed.inference.dicom.volume import Volume
from radfed.inference.errors import ResultQualityError
from radfed.inference.pipeline.findings import InferenceResult


def encoded(ds: Dataset) -> Dataset:
    """The dataset as a receiver will see it: written to bytes and read back."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


@dataclass(frozen=True)
class _Placement:
    voxels: int
    centroid_lps: np.ndarray
    corners_lps: np.ndarray  # LPS of the index bounding box's two extreme corners


def _placements(labels: npt.NDArray[np.integer], grid: Volume) -> dict[int, _Placement]:
    """Voxel count, centroid and bounding box per label, from the labelled voxels only (lesions are a
    tiny fraction of a CT grid, so this stays fast where whole-volume reductions would not)."""
    flat = np.flatnonzero(labels)
    if not len(flat):
        return {}
    values = labels.ravel()[flat].astype(np.int64)
    index = np.stack(np.unravel_index(flat, labels.shape), axis=1)
    order = np.argsort(values, kind="stable")
    values, index = values[order], index[order]
    numbers, starts, counts = np.unique(values, return_index=True, return_counts=True)
    placements = {}
    for number, start, count in zip(numbers, starts, counts, strict=True):
        block = index[start : start + count]
        corners = np.array([block.min(axis=0), block.max(axis=0)], dtype=np.float64)
        placements[int(number)] = _Placement(
            int(count), grid.index_to_lps(block.mean(axis=0)), grid.index_to_lps(corners)
        )
    return placements


def verify_seg_geometry(
    seg: Dataset, expected_labels: npt.NDArray[np.integer], grid: Volume, *, tolerance_mm: float = 0.1
) -> None:
    """Raise :class:`ResultQualityError` unless every segment decodes to where it was computed.

    Parameters
    ----------
    seg
        The encoded SEG (as read back from bytes).
    expected_labels
        The label volume on ``grid`` the SEG was built from (value = segment number).
    grid
        The reference series' grid.
    tolerance_mm
        Allowed difference of centroid and bounding-box corners, in mm.
    """
    if exact_mismatch(seg, expected_labels, grid) is None:
        return  # voxel for voxel where it was computed (frames placed by numpy, not by the general reader)
    decoded_labels, _segments = read_segmentation_labels(seg, grid)
    if np.array_equal(decoded_labels, expected_labels):
        return  # only a difference needs the placements below
    expected = _placements(expected_labels, grid)
    decoded = _placements(decoded_labels, grid)
    for number, want in expected.items():
        got = decoded.get(number)
        if got is None:
            raise ResultQualityError(f"segment {number} is missing from the encoded SEG")
        if got.voxels != want.voxels:
            raise ResultQualityError(f"segment {number}: {got.voxels} voxels decoded, {want.voxels} expected")
        shift = float(np.linalg.norm(got.centroid_lps - want.centroid_lps))
        corners = float(np.abs(got.corners_lps - want.corners_lps).max())
        if shift > tolerance_mm or corners > tolerance_mm:
            raise ResultQualityError(
                f"segment {number} decodes {shift:.2f} mm from where it was computed (extent off by "
                f"{corners:.2f} mm): refusing to store a misplaced SEG"
            )
    extra = set(decoded) - set(expected)
    if extra:
        raise ResultQualityError(f"encoded SEG has unexpected segments {sorted(extra)}")


def _key(code: Code) -> tuple[str, str]:
    return (code.scheme_designator, code.value)


# The SR concepts the checks below read (compared as (scheme, value), as they are encoded).
_REPORT = _key(dcm_codes.cid7021.ImagingMeasurementReport)  # TID 1500 root
_IMAGING_MEASUREMENTS = _key(dcm_codes.DCM.ImagingMeasurements)
_MEASUREMENT_GROUP = _key(dcm_codes.DCM.MeasurementGroup)
_TRACKING_UID = _key(dcm_codes.DCM.TrackingUniqueIdentifier)
_REFERENCED_SEGMENT = _key(dcm_codes.DCM.ReferencedSegment)
_IMAGE_REGION = _key(dcm_codes.DCM.ImageRegion)


def _concept(item: Dataset) -> tuple[str, str]:
    names = item.get("ConceptNameCodeSequence")
    if not names:
        return ("", "")
    return (str(names[0].get("CodingSchemeDesignator", "")), str(names[0].get("CodeValue", "")))


def _typed(item: Dataset, value_type: str, what: str) -> Dataset:
    if item.get("ValueType") != value_type:
        raise ResultQualityError(f"SR {what} is a {item.get('ValueType')} item, not {value_type}")
    return item


@dataclass
class _GroupRead:
    """What one TID 1410/1411 measurement group says, read straight from the content tree."""

    tracking_uids: list[str] = field(default_factory=list)
    segments: list[tuple[str, int]] = field(default_factory=list)  # (SEG SOP Instance UID, segment number)
    outlines: list[np.ndarray] = field(default_factory=list)  # SCOORD (column, row) points

    @property
    def volumetric(self) -> bool:  # highdicom's rule: a segment reference makes a group volumetric
        return bool(self.segments)

    @property
    def planar(self) -> bool:  # one image region and no segment (TID 1410)
        return len(self.outlines) == 1 and not self.segments


def _read_group(group: Dataset) -> _GroupRead:
    read = _GroupRead()
    for item in group.get("ContentSequence", []):
        concept = _concept(item)
        if concept == _TRACKING_UID:
            read.tracking_uids.append(str(_typed(item, "UIDREF", "Tracking Unique Identifier").UID))
        elif concept == _REFERENCED_SEGMENT:
            reference = _typed(item, "IMAGE", "Referenced Segment").ReferencedSOPSequence[0]
            uid = str(reference.ReferencedSOPInstanceUID)
            numbers = reference.get("ReferencedSegmentNumber")
            for number in numbers if isinstance(numbers, list | MultiValue) else [numbers]:
                if number is not None:
                    read.segments.append((uid, int(number)))
        elif concept == _IMAGE_REGION:
            region = _typed(item, "SCOORD", "Image Region")
            points = np.asarray(region.GraphicData, dtype=np.float64)
            if points.size % 2:
                raise ResultQualityError("SR Image Region has an odd number of coordinates")
            read.outlines.append(points.reshape(-1, 2))
    return read


def _referenced_instances(owner: Dataset) -> set[str]:
    """Every instance an IMAGE or COMPOSITE item anywhere in the tree references (highdicom's evidence rule)."""
    uids: set[str] = set()
    for item in owner.get("ContentSequence", []):
        if item.get("ValueType") in ("IMAGE", "COMPOSITE"):
            uids.update(str(ref.ReferencedSOPInstanceUID) for ref in item.get("ReferencedSOPSequence", []))
        if "ContentSequence" in item:
            uids |= _referenced_instances(item)
    return uids


def _evidence_uids(sr: Dataset) -> set[str]:
    uids: set[str] = set()
    for keyword in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
        for study in sr.get(keyword, []):
            for series in study.get("ReferencedSeriesSequence", []):
                uids.update(str(i.ReferencedSOPInstanceUID) for i in series.get("ReferencedSOPSequence", []))
    return uids


def _measurement_groups(sr: Dataset) -> list[Dataset]:
    if _concept(sr) != _REPORT or sr.get("ValueType") != "CONTAINER":
        raise ResultQualityError("SR root concept is not TID 1500 Imaging Measurement Report (DCM 126000)")
    templates = sr.get("ContentTemplateSequence") or [Dataset()]
    if str(templates[0].get("TemplateIdentifier", "")) != "1500":
        raise ResultQualityError("SR root does not name template TID 1500")
    groups = []
    for item in sr.get("ContentSequence", []):
        if _concept(item) == _IMAGING_MEASUREMENTS:
            for group in item.get("ContentSequence", []):
                if _concept(group) != _MEASUREMENT_GROUP:
                    raise ResultQualityError(f"SR Imaging Measurements holds {_concept(group)}, not a group")
                groups.append(_typed(group, "CONTAINER", "Measurement Group"))
    return groups


def verify_sr(sr: Dataset, result: InferenceResult, variant: SrVariant, seg: Dataset | None = None) -> None:
    """Re-read the encoded SR's content tree and check what viewers rely on.

    The tree is walked once with pydicom (independently of highdicom, which wrote it): TID 1500 at the root;
    per lesion one volumetric group referencing its segment of ``seg`` (when given) and, in the ``viewer``
    variant, one planar outline inside the image under the same Tracking UID; one group per lesion; every
    instance referenced anywhere in the tree listed in the evidence.
    """
    groups = [_read_group(group) for group in _measurement_groups(sr)]
    for read in groups:
        if len(read.tracking_uids) != 1:
            raise ResultQualityError(f"SR measurement group with {len(read.tracking_uids)} Tracking UIDs")
    volumetric: dict[int, list[str]] = {}
    outlines: dict[str, list[np.ndarray]] = {}
    for read in groups:
        if read.volumetric:
            for uid, number in read.segments:
                if seg is not None and uid != str(seg.SOPInstanceUID):
                    raise ResultQualityError(f"segment {number} is referenced in another instance than the SEG")
                volumetric.setdefault(number, []).append(read.tracking_uids[0])
        elif read.planar:
            outlines.setdefault(read.tracking_uids[0], []).append(read.outlines[0])
    rows, columns = result.grid.shape[1:]
    for lesion in result.lesions:
        uids = volumetric.get(lesion.number, [])
        if len(uids) != 1:
            raise ResultQualityError(f"lesion {lesion.number}: {len(uids)} volumetric groups reference its segment")
        if variant is SrVariant.VIEWER:
            twins = outlines.get(uids[0], [])
            if len(twins) != 1:
                raise ResultQualityError(f"lesion {lesion.number}: no planar outline sharing Tracking UID {uids[0]}")
            points = twins[0]
            if points.min() < 0 or points[:, 0].max() > columns or points[:, 1].max() > rows:
                raise ResultQualityError(f"lesion {lesion.number}: outline leaves the image")
    by_uid = {uid for uids in volumetric.values() for uid in uids}
    if len(by_uid) != len(result.lesions):
        raise ResultQualityError(f"{len(by_uid)} lesion groups for {len(result.lesions)} lesions")
    missing = _referenced_instances(sr) - _evidence_uids(sr)
    if missing:
        raise ResultQualityError(f"SR references {len(missing)} instances that its evidence does not list")
