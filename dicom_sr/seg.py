"""DICOM SEG of AI lesions, following the default profile of DICOM_OUTPUTS.md.

BINARY and uncompressed by default (LABELMAP + RLE as a setting), pixel-for-pixel on the one reference
series, its own series with one instance, one segment per lesion with Tracking ID/UID, a display
colour, codes from the task spec and AI algorithm identification (PS3.3 C.8.20.2, C.8.20.4).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from radfed.dicom_sr import codes, marking
from radfed.dicom_sr.profile import OutputProfile, SegEncoding
from radfed.dicom_sr.uids import ResultKey
from radfed.inference.coding import CodedTerm
from radfed.inference.pipeline.findings import InferenceResult

# Distinct colours (sRGB) for lesions 1, 2, ...; cycled beyond ten.
LESION_COLOURS_RGB: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (60, 180, 75), (250, 190, 212),
)  # fmt: skip


def concept(term: CodedTerm) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(term.value, term.scheme_designator, term.meaning)


def lesion_colour(number: int) -> tuple[int, int, int]:
    return LESION_COLOURS_RGB[(number - 1) % len(LESION_COLOURS_RGB)]


def result_key(result: InferenceResult) -> ResultKey:
    return ResultKey(result.study_instance_uid, result.model.name, result.model.version, result.input_fingerprint)


def ordered_sources(result: InferenceResult) -> tuple[list[Dataset], list[int]]:
    """Source datasets in the order highdicom pairs them with frames, and the grid slice of each frame.

    Classic series: one dataset per slice. Enhanced multi-frame: one dataset, frames in its own order.
    """
    by_uid = {str(ds.SOPInstanceUID): ds for ds in result.source_datasets}
    slices = {source: index for index, source in enumerate(result.grid.slice_sources)}
    if len(by_uid) == 1 and len(result.grid.slice_sources) > 1:
        ((uid, ds),) = by_uid.items()
        frames = int(ds.get("NumberOfFrames", 1))
        return [ds], [slices[(uid, frame)] for frame in range(1, frames + 1)]
    missing = {uid for uid, _ in result.grid.slice_sources} - by_uid.keys()
    if missing:
        raise ValueError(f"{len(missing)} slices of the grid have no source dataset")
    return [by_uid[uid] for uid, _ in result.grid.slice_sources], list(range(result.grid.shape[0]))


def lesion_labelmap(result: InferenceResult) -> npt.NDArray[np.unsignedinteger]:
    """The lesion labels in the smallest unsigned type (highdicom reads values as segment numbers)."""
    dtype = np.uint8 if len(result.lesions) < 256 else np.uint16
    return result.lesion_labels.astype(dtype, copy=False)


def segment_descriptions(result: InferenceResult, key: ResultKey) -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=result.model.name[:64], family=codes.ARTIFICIAL_INTELLIGENCE, version=result.model.version[:64]
    )
    site = [concept(result.codes.finding_site)] if result.codes.finding_site else None
    descriptions = []
    for lesion in result.lesions:
        label = f"{result.codes.lesion_label} {lesion.number}"
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=lesion.number,
                segment_label=label[:64],
                segmented_property_category=concept(result.codes.lesion_category),
                segmented_property_type=concept(result.codes.lesion_type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=key.tracking_uid(lesion.number),
                tracking_id=label[:64],
                anatomic_regions=site,
                display_color=hd.color.CIELabColor.from_rgb(*lesion_colour(lesion.number)),
            )
        )
    return descriptions


def build_seg(result: InferenceResult, profile: OutputProfile | None = None) -> Dataset | None:
    """The SEG for ``result``, or None when there is no lesion (then only the SR is written)."""
    profile = profile or OutputProfile()
    if not result.lesions:
        return None
    key = result_key(result)
    sources, frame_slices = ordered_sources(result)
    labels = lesion_labelmap(result)[frame_slices]
    keep_empty = len(frame_slices) * len(result.lesions) <= profile.max_frames_with_empty
    labelmap = profile.seg_encoding is SegEncoding.LABELMAP
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=labels,
        segmentation_type=hd.seg.SegmentationTypeValues(profile.seg_encoding.value),
        segment_descriptions=segment_descriptions(result, key),
        series_instance_uid=key.seg_series_uid,
        series_number=profile.series_number_base,
        sop_instance_uid=key.seg_instance_uid,
        instance_number=1,
        manufacturer=marking.RADFED_MANUFACTURER,
        manufacturer_model_name=result.model.name[:64],
        software_versions=marking.software_versions(result.model)[0],
        device_serial_number=marking.device_serial_number(result.model),
        transfer_syntax_uid=RLELossless if labelmap else ExplicitVRLittleEndian,
        omit_empty_frames=not keep_empty,
        content_label="AI_LESIONS",
        content_description="AI lesion segmentation - research use only"[:64],
        series_description=marking.series_description(result.model, "SEG"),
        contributing_equipment=marking.contributing_equipment(result.model),
        content_qualification=codes.CONTENT_QUALIFICATION,
    )
    seg.SoftwareVersions = marking.software_versions(result.model)  # type: ignore[assignment]
    return seg
