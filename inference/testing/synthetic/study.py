"""Render synthetic prostate mp-MRI studies: DICOM series as a scanner sends them, plus the reference
segmentation and labels a radiologist leaves in the PACS.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from scipy import ndimage

from radfed.inference.dicom.volume import Volume
from radfed.inference.testing.synthetic.phantom import Phantom, Tissue, random_phantom
from radfed.inference.testing.synthetic.sites import Sequence, SeriesGrid, SiteProfile, tissue_signal

SERIES_NUMBERS = {Sequence.T2W: 3, Sequence.ADC: 7, Sequence.DWI: 6}
REFERENCE_SEG_SERIES_NUMBER = 100


@dataclass(frozen=True)
class StudyIdentity:
    """Synthetic identifiers (never real patients)."""

    patient_name: str
    patient_id: str
    patient_birth_date: str
    accession_number: str
    study_id: str
    study_instance_uid: str
    frame_of_reference_uid: str
    study_date: str
    study_time: str


@dataclass(frozen=True)
class SyntheticStudy:
    """One rendered study: series datasets per sequence, the reference SEG, truth and labels."""

    site: SiteProfile
    number: int
    identity: StudyIdentity
    phantom: Phantom
    oblique: bool
    series: dict[Sequence, list[Dataset]]
    reference_seg: Dataset
    lesion_masks: npt.NDArray[np.uint8]  # lesion index per voxel on the T2W grid (0 = none)
    t2w_grid: Volume

    @property
    def grade_group(self) -> int:
        return max((lesion.grade_group for lesion in self.phantom.lesions), default=0)

    @property
    def clinically_significant(self) -> bool:
        return self.grade_group >= 2

    @property
    def folder_name(self) -> str:
        return f"study-{self.number:04d}"


def _uid(*parts: object) -> UID:
    return generate_uid(entropy_srcs=["radfed-synth", *(str(p) for p in parts)])


def _orientation(rng: np.random.Generator, oblique: bool) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    row, col = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    if not oblique:
        return row, col
    # Prostate T2W is often angled about the left-right axis (perpendicular to the rectal wall),
    # sometimes with a little rotation about the anterior-posterior axis too.
    tilt, roll = np.deg2rad(rng.uniform(10, 25) * rng.choice([-1, 1])), np.deg2rad(rng.uniform(-8, 8))
    about_l = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    about_p = np.array([[np.cos(roll), 0, np.sin(roll)], [0, 1, 0], [-np.sin(roll), 0, np.cos(roll)]])
    rotation = about_p @ about_l
    return rotation @ row, rotation @ col


def grid_volume(grid: SeriesGrid, centre: npt.ArrayLike, row: npt.ArrayLike, col: npt.ArrayLike) -> Volume:
    """An empty volume for ``grid`` centred on ``centre`` with the given in-plane directions."""
    row, col = np.asarray(row, dtype=np.float64), np.asarray(col, dtype=np.float64)
    normal = np.cross(row, col)
    affine = np.eye(4)
    affine[:3, 0] = normal * grid.slice_thickness
    affine[:3, 1] = col * grid.pixel_spacing
    affine[:3, 2] = row * grid.pixel_spacing
    half = np.array([grid.slices - 1, grid.rows - 1, grid.columns - 1]) / 2
    affine[:3, 3] = np.asarray(centre, dtype=np.float64) - affine[:3, :3] @ half
    return Volume(np.zeros((grid.slices, grid.rows, grid.columns), dtype=np.uint8), affine)


def _voxel_centres(volume: Volume) -> npt.NDArray[np.float64]:
    s, r, c = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    return volume.index_to_lps(np.stack([s.ravel(), r.ravel(), c.ravel()], axis=1))


def _render_signal(
    phantom: Phantom, grid: Volume, sequence: Sequence, site: SiteProfile, rng: np.random.Generator
) -> npt.NDArray[np.float32]:
    points = _voxel_centres(grid)
    tissue = phantom.tissue_at(points)
    base = tissue_signal(sequence)
    lut = np.array([base[Tissue(t)] for t in range(len(Tissue))], dtype=np.float32)
    signal = lut[tissue]
    lesion_index = phantom.lesion_index_at(points)
    for number, lesion in enumerate(phantom.lesions, start=1):
        signal[lesion_index == number] = tissue_signal(sequence, lesion.grade_group)[Tissue.LESION]
    signal = signal.reshape(grid.shape)
    # Point-spread function: a little in-plane blur, more through the thick slices.
    signal = ndimage.gaussian_filter(signal, sigma=(0.35, 0.7, 0.7))
    gland_mean = float(base[Tissue.PERIPHERAL_ZONE])
    if sequence is not Sequence.ADC:
        centre = phantom.gland.centre
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        rel = (points - np.asarray(centre)) / 120.0
        bias = 1.0 + site.bias_strength * (rel @ direction + 0.5 * np.sum(rel**2, axis=1))
        signal = signal * bias.reshape(grid.shape).astype(np.float32)
        signal = signal * site.intensity_scale + site.intensity_offset * (signal > 1)
        gland_mean = gland_mean * site.intensity_scale
    sigma = site.noise_fraction * gland_mean
    noise_re = rng.normal(0, sigma, grid.shape).astype(np.float32)
    noise_im = rng.normal(0, sigma, grid.shape).astype(np.float32)
    return np.sqrt((signal + noise_re) ** 2 + noise_im**2).astype(np.float32)  # Rician magnitude


def _base_dataset(study: StudyIdentity, site: SiteProfile) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = "M"
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.ReferringPhysicianName = ""
    ds.StudyID = study.study_id
    ds.StudyDescription = "MRI PROSTATE MULTIPARAMETRIC"
    ds.Manufacturer = site.vendor.manufacturer
    ds.ManufacturerModelName = site.vendor.model_name
    ds.SoftwareVersions = site.vendor.software_version
    ds.InstitutionName = site.institution_name
    ds.DeviceSerialNumber = f"SYN{site.index:05d}"
    return ds


def _series_datasets(
    study: StudyIdentity,
    site: SiteProfile,
    sequence: Sequence,
    grid: Volume,
    signal: npt.NDArray[np.float32],
    number: int,
) -> list[Dataset]:
    naming = site.vendor.naming[sequence]
    series_uid = _uid(study.study_instance_uid, sequence.value, "series")
    if sequence is Sequence.ADC:
        slope, intercept = site.adc_rescale
    else:
        slope, intercept = 1.0, 0.0
    stored = np.clip(np.rint((signal - intercept) / slope), 0, 4095).astype(np.uint16)
    datasets = []
    n = grid.shape[0]
    window = np.percentile(signal[:: max(1, n // 6)], [1, 99.5])
    row_dir = grid.affine[:3, 2] / np.linalg.norm(grid.affine[:3, 2])
    col_dir = grid.affine[:3, 1] / np.linalg.norm(grid.affine[:3, 1])
    spacing = grid.spacing
    study_dt = dt.datetime.strptime(study.study_date + study.study_time[:6], "%Y%m%d%H%M%S")
    series_time = (study_dt + dt.timedelta(minutes=2 * number)).strftime("%H%M%S")
    for k in range(n):
        ds = _base_dataset(study, site)
        position = grid.index_to_lps([k, 0, 0])
        instance_number = n - k if site.vendor.instances_head_first else k + 1
        sop_uid = _uid(series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = list(naming.image_type)
        ds.SeriesDate = study.study_date
        ds.SeriesTime = series_time
        ds.ContentDate = study.study_date
        ds.ContentTime = series_time
        ds.Modality = "MR"
        ds.SeriesDescription = naming.description
        ds.ProtocolName = naming.description
        if naming.sequence_name:
            ds.SequenceName = naming.sequence_name
        ds.BodyPartExamined = "PROSTATE"
        ds.ScanningSequence = naming.scanning_sequence.split("\\")
        ds.SequenceVariant = naming.sequence_variant.split("\\")
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.SliceThickness = f"{spacing[0]:.4g}"
        ds.SpacingBetweenSlices = f"{spacing[0]:.4g}"
        ds.RepetitionTime = "4500" if sequence is Sequence.T2W else "5200"
        ds.EchoTime = "104" if sequence is Sequence.T2W else "63"
        ds.EchoTrainLength = 25 if sequence is Sequence.T2W else 1
        ds.MagneticFieldStrength = f"{site.field_strength_t:g}"
        ds.ImagingFrequency = f"{42.577 * site.field_strength_t:.4f}"
        ds.ImagedNucleus = "1H"
        if sequence is Sequence.DWI:
            ds.DiffusionBValue = 1400.0
        ds.PatientPosition = "HFS"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance_number
        ds.FrameOfReferenceUID = study.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        ds.SliceLocation = f"{float(position @ np.cross(row_dir, col_dir)):.6f}"
        ds.PixelSpacing = [f"{spacing[1]:.6g}", f"{spacing[2]:.6g}"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(grid.shape[1]), int(grid.shape[2])
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        if sequence is Sequence.ADC:
            ds.RescaleSlope = f"{slope:g}"
            ds.RescaleIntercept = f"{intercept:g}"
            ds.RescaleType = "US"
        ds.WindowCenter = f"{float(window.mean()):.0f}"
        ds.WindowWidth = f"{max(float(window[1] - window[0]), 1.0):.0f}"
        ds.PixelData = stored[k].tobytes()
        datasets.append(ds)
    return datasets


def _reference_seg(
    study: StudyIdentity,
    site: SiteProfile,
    t2w: list[Dataset],
    gland: npt.NDArray[np.bool_],
    lesion_index: npt.NDArray[np.uint8],
    n_lesions: int,
) -> Dataset:
    """The radiologist's segmentation: the gland plus one segment per lesion, drawn on T2W."""
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=1,
            segment_label="Prostate",
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Prostate,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
    ]
    masks = [gland]
    for number in range(1, n_lesions + 1):
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number + 1,
                segment_label=f"Lesion {number}",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Neoplasm,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
                tracking_id=f"Lesion {number}",
                tracking_uid=_uid(study.study_instance_uid, "lesion", number),
            )
        )
        masks.append(lesion_index == number)
    pixel_array = np.stack(masks, axis=-1)
    seg = hd.seg.Segmentation(
        source_images=t2w,
        pixel_array=pixel_array,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=_uid(study.study_instance_uid, "reference-seg"),
        series_number=REFERENCE_SEG_SERIES_NUMBER,
        sop_instance_uid=_uid(study.study_instance_uid, "reference-seg", "instance"),
        instance_number=1,
        manufacturer="Synthetic Radiology Workstation",
        manufacturer_model_name="radfed synth",
        software_versions="1",
        device_serial_number=f"WS{site.index:05d}",
        series_description="Reference segmentation (radiologist)",
        content_label="REFERENCE",
        content_creator_name="Reader^Synthetic",
    )
    return seg


def render_study(
    site: SiteProfile, number: int, seed: int, *, n_lesions: int | None = None, oblique: bool | None = None
) -> SyntheticStudy:
    """Render study ``number`` (1-based) of ``site``; the same arguments give the same bytes.

    ``n_lesions`` and ``oblique`` override the random draw (for tests that need a given case).
    """
    rng = np.random.default_rng([seed, site.index, number])
    key = f"{seed}/{site.index}/{number}"
    date = dt.date(2025, 1, 6) + dt.timedelta(days=int(rng.integers(0, 600)))
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 35)))
    identity = StudyIdentity(
        patient_name=f"SYNTHETIC^S{site.index}P{number:04d}",
        patient_id=f"SYN-{site.index}-{number:04d}",
        patient_birth_date=birth.strftime("%Y%m%d"),
        accession_number=f"SYN{site.index:02d}{number:06d}",
        study_id=f"{number}",
        study_instance_uid=_uid(key, "study"),
        frame_of_reference_uid=_uid(key, "frame-of-reference"),
        study_date=date.strftime("%Y%m%d"),
        study_time=f"{int(rng.integers(7, 18)):02d}{int(rng.integers(0, 60)):02d}00",
    )
    drawn_lesions = int(rng.choice([0, 1, 2, 3], p=[0.35, 0.35, 0.2, 0.1]))
    n_lesions = drawn_lesions if n_lesions is None else n_lesions
    centre = np.array([rng.uniform(-8, 8), rng.uniform(-5, 25), rng.uniform(-90, -40)])
    phantom = random_phantom(rng, centre, n_lesions)
    drawn_oblique = bool(rng.random() < site.oblique_probability)
    oblique = drawn_oblique if oblique is None else oblique
    row, col = _orientation(rng, oblique)
    series: dict[Sequence, list[Dataset]] = {}
    grids: dict[Sequence, Volume] = {}
    for sequence in Sequence:
        shift = rng.uniform(-3, 3, 3) if sequence is not Sequence.T2W else np.zeros(3)
        grids[sequence] = grid_volume(site.grids[sequence], centre + shift, row, col)
    # DWI and ADC come from one acquisition: same grid.
    grids[Sequence.ADC] = grids[Sequence.DWI]
    for sequence in Sequence:
        signal = _render_signal(phantom, grids[sequence], sequence, site, rng)
        series[sequence] = _series_datasets(identity, site, sequence, grids[sequence], signal, SERIES_NUMBERS[sequence])
    t2w_points = _voxel_centres(grids[Sequence.T2W])
    lesion_index = phantom.lesion_index_at(t2w_points).reshape(grids[Sequence.T2W].shape)
    gland = phantom.gland_at(t2w_points).reshape(grids[Sequence.T2W].shape)
    seg = _reference_seg(identity, site, series[Sequence.T2W], gland, lesion_index, n_lesions)
    return SyntheticStudy(
        site=site,
        number=number,
        identity=identity,
        phantom=phantom,
        oblique=oblique,
        series=series,
        reference_seg=seg,
        lesion_masks=lesion_index,
        t2w_grid=grids[Sequence.T2W],
    )
