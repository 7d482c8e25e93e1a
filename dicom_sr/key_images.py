"""Secondary Capture key images for viewers that show neither SEG nor SR (Orthanc's own viewers, old PACS):
one RGB image per lesion, its key slice with the outline burned in and a research-use banner."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

from radfed.dicom_sr import codes, marking
from radfed.dicom_sr.profile import OutputProfile
from radfed.dicom_sr.seg import lesion_colour, result_key
from radfed.inference.pipeline.findings import InferenceResult, LesionFinding

BANNER = "RESEARCH USE ONLY - NOT FOR DIAGNOSTIC USE"
_MIN_WIDTH = 512  # upscale small matrices so the banner text stays legible
_BANNER_HEIGHT = 36


def orientation_letters(direction: npt.ArrayLike) -> str:
    """PatientOrientation letters (PS3.3 C.7.6.1.1.1) for an LPS direction, major axis first."""
    vector = np.asarray(direction, dtype=np.float64)
    letters = (("L", "R"), ("P", "A"), ("H", "F"))
    order = np.argsort(-np.abs(vector))
    picked = [letters[axis][0 if vector[axis] > 0 else 1] for axis in order if abs(vector[axis]) > 1e-4]
    return "".join(picked[:3])


def _grey(slice_pixels: npt.NDArray[np.floating]) -> npt.NDArray[np.uint8]:
    low, high = np.percentile(slice_pixels, [1.0, 99.5])
    scaled = (slice_pixels - low) / max(float(high - low), 1e-6)
    return np.asarray(np.clip(scaled * 255.0, 0, 255), dtype=np.uint8)


def render_key_image(result: InferenceResult, lesion: LesionFinding) -> tuple[npt.NDArray[np.uint8], int]:
    """RGB pixels (rows, columns, 3) and the integer upscaling factor used."""
    m = lesion.measurements
    grey = _grey(result.grid.array[m.key_slice].astype(np.float32))
    factor = max(1, int(np.ceil(_MIN_WIDTH / grey.shape[1])))
    image = Image.fromarray(grey).resize((grey.shape[1] * factor, grey.shape[0] * factor), Image.Resampling.NEAREST)
    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    # Outline vertices are voxel centres; pixel (r, c) spans [c*f, (c+1)*f) after upscaling.
    points = [((c + 0.5) * factor, (r + 0.5) * factor) for r, c in m.outline_rc]
    draw.line(points, fill=lesion_colour(lesion.number), width=max(1, factor // 2 + 1))
    font = ImageFont.load_default()
    draw.rectangle([0, 0, canvas.width, _BANNER_HEIGHT], fill=(0, 0, 0))
    draw.text((6, 3), BANNER, fill=(255, 255, 0), font=font)
    summary = (
        f"AI {result.model.name} v{result.model.version}: {result.codes.lesion_label} {lesion.number}, "
        f"p={100 * lesion.probability:.0f}%, {m.long_axis_mm:.1f} x {m.short_axis_mm:.1f} mm"
    )
    draw.text((6, 19), summary, fill=(255, 255, 255), font=font)
    return np.asarray(canvas, dtype=np.uint8), factor


def build_key_images(result: InferenceResult, profile: OutputProfile | None = None) -> list[Dataset]:
    """One Secondary Capture per lesion (none when there is no lesion)."""
    profile = profile or OutputProfile()
    key = result_key(result)
    reference = result.source_datasets[0]
    images: list[Dataset] = []
    for lesion in result.lesions:
        pixels, factor = render_key_image(result, lesion)
        row_spacing, column_spacing = result.grid.spacing[1:]
        sc = hd.sc.SCImage(
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            study_instance_uid=reference.StudyInstanceUID,
            series_instance_uid=key.key_image_series_uid,
            series_number=profile.series_number_base + 2,
            sop_instance_uid=key.key_image_instance_uid(lesion.number),
            instance_number=lesion.number,
            manufacturer=marking.RADFED_MANUFACTURER,
            patient_id=reference.get("PatientID"),
            patient_name=reference.get("PatientName"),
            patient_birth_date=reference.get("PatientBirthDate"),
            patient_sex=reference.get("PatientSex") or None,
            accession_number=reference.get("AccessionNumber"),
            study_id=reference.get("StudyID"),
            study_date=reference.get("StudyDate"),
            study_time=reference.get("StudyTime"),
            referring_physician_name=reference.get("ReferringPhysicianName"),
            pixel_spacing=(row_spacing / factor, column_spacing / factor),
            patient_orientation=(
                # highdicom takes one letter per direction: the major axis (along a row, down a column)
                orientation_letters(result.grid.affine[:3, 2])[0],
                orientation_letters(result.grid.affine[:3, 1])[0],
            ),
            series_description=marking.series_description(result.model, "KEY"),
            content_qualification=codes.CONTENT_QUALIFICATION,
        )
        if "SpecificCharacterSet" in reference:  # the patient's name keeps its characters (PS3.3 C.12.1.1.2)
            sc.SpecificCharacterSet = reference.SpecificCharacterSet
        sc.BurnedInAnnotation = "YES"
        # Type 2C in General Series; empty means "unknown / not paired" (dciodvfy asks for it on SC).
        sc.Laterality = ""
        sc.ImageComments = f"{BANNER}. {result.codes.lesion_label} {lesion.number} outlined."
        images.append(sc)
    return images
