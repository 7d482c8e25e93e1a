"""Series as vendors export them: Enhanced MR with functional groups (Philips and Siemens layouts), a Raw
Data object beside the image, 4-D files, echoes, magnitude + phase, several b-values.

The Enhanced MR objects start from pydicom-data's Philips ``emri_small.dcm`` header (its functional groups
were stripped, so the groups are written here as the scanners write them).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from radfed.inference.dicom.selection import SeriesInfo, frame_pick
from radfed.inference.dicom.series import FramePick, volume_from_datasets
from radfed.inference.dicom.study_source import FolderStudy, OrthancStudy
from radfed.inference.errors import NotAVolumeError, VolumeErrorCause
from radfed.inference.model.taskspec import load_task_spec
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.redaction import uid_digest
from radfed.inference.testing.synthetic.sites import Sequence as MriSequence
from radfed.inference.testing.synthetic.study import SyntheticStudy

RAW_DATA_STORAGE = "1.2.840.10008.5.1.4.1.1.66"
ROWS, COLUMNS = 6, 5
PIXEL_SPACING = (0.8, 0.7)
SLICE_THICKNESS = 2.5
SLICE_SPACING = 3.0
# A slightly oblique axial plane (10 degrees about the x axis).
ROW_COSINE = np.array([1.0, 0.0, 0.0])
COLUMN_COSINE = np.array([0.0, np.cos(np.radians(10)), -np.sin(np.radians(10))])
NORMAL = np.cross(ROW_COSINE, COLUMN_COSINE)
ORIGIN = np.array([-2.0, -3.0, 40.0])


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _frame_group(volume: Mapping[str, object], slice_index: int, *, per_frame_geometry: bool) -> Dataset:
    group = Dataset()
    position = ORIGIN + NORMAL * SLICE_SPACING * slice_index
    group.PlanePositionSequence = Sequence([_item(ImagePositionPatient=[f"{v:.6f}" for v in position])])
    temporal = int(volume.get("temporal", 1))  # type: ignore[call-overload]
    group.FrameContentSequence = Sequence(
        [
            _item(
                StackID="1",
                InStackPositionNumber=slice_index + 1,
                TemporalPositionIndex=temporal,
                DimensionIndexValues=[temporal, slice_index + 1],
            )
        ]
    )
    group.MREchoSequence = Sequence([_item(EffectiveEchoTime=float(volume.get("echo", 90.0)))])  # type: ignore[arg-type]
    group.MRImageFrameTypeSequence = Sequence(
        [_item(FrameType=["ORIGINAL", "PRIMARY", str(volume.get("frame_type", "M")), "NONE"])]
    )
    if "b" in volume:
        group.MRDiffusionSequence = Sequence([_item(DiffusionBValue=float(volume["b"]))])  # type: ignore[arg-type]
    if per_frame_geometry:
        group.PlaneOrientationSequence = Sequence([_orientation_item()])
        group.PixelMeasuresSequence = Sequence([_measures_item()])
    return group


def _orientation_item() -> Dataset:
    return _item(ImageOrientationPatient=[f"{v:.8f}" for v in (*ROW_COSINE, *COLUMN_COSINE)])


def _measures_item() -> Dataset:
    return _item(PixelSpacing=list(PIXEL_SPACING), SliceThickness=SLICE_THICKNESS)


def pixel_value(volume: int, slice_index: int) -> int:
    return 1000 * (volume + 1) + 10 * slice_index


def enhanced_mr(
    *,
    slices: int,
    volumes: tuple[Mapping[str, object], ...] = ({},),
    per_frame_geometry: bool = True,
    study_uid: str | None = None,
    series_uid: str | None = None,
) -> Dataset:
    """An Enhanced MR object: ``volumes`` (one dict of frame attributes each) x ``slices`` frames.

    Philips writes orientation and pixel measures per frame (``per_frame_geometry``), Siemens shares
    them. Frames run slice by slice, volumes interleaved, the last slice first.
    """
    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))  # type: ignore[arg-type]
    ds.StudyInstanceUID = study_uid or hd.UID()
    ds.SeriesInstanceUID = series_uid or hd.UID()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = hd.UID()
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.10.511.3.1"
    ds.SeriesDescription = "t2_enhanced"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.Rows, ds.Columns = ROWS, COLUMNS
    order = [(v, s) for s in reversed(range(slices)) for v in range(len(volumes))]
    ds.NumberOfFrames = len(order)
    ds.PerFrameFunctionalGroupsSequence = Sequence(
        [_frame_group(volumes[v], s, per_frame_geometry=per_frame_geometry) for v, s in order]
    )
    shared = Dataset()
    if not per_frame_geometry:
        shared.PlaneOrientationSequence = Sequence([_orientation_item()])
        shared.PixelMeasuresSequence = Sequence([_measures_item()])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    pixels = np.stack([np.full((ROWS, COLUMNS), pixel_value(v, s), np.uint16) for v, s in order])
    pixels[:, 0, 1] += 1  # marks the first row, so that flips show
    ds.PixelData = pixels.tobytes()
    return ds


def raw_data_beside(image: Dataset) -> Dataset:
    """What Philips exports beside an image: Raw Data Storage, Modality MR, same series, no pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = RAW_DATA_STORAGE
    ds.SOPClassUID = RAW_DATA_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = hd.UID()
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SeriesNumber", "PatientID", "PatientName"):
        setattr(ds, keyword, image.get(keyword, ""))
    ds.Modality = "MR"
    ds.InstanceNumber = 2
    block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
    block.add_new(0x00, "OB", bytes(range(64)))
    return ds


def expected_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, 0] = NORMAL * SLICE_SPACING
    affine[:3, 1] = COLUMN_COSINE * PIXEL_SPACING[0]
    affine[:3, 2] = ROW_COSINE * PIXEL_SPACING[1]
    affine[:3, 3] = ORIGIN
    return affine


def _expect(cause: VolumeErrorCause, datasets: list[Dataset], **kwargs: object) -> str:
    with pytest.raises(NotAVolumeError) as info:
        volume_from_datasets(datasets, **kwargs)  # type: ignore[arg-type]
    assert info.value.cause is cause, str(info.value)
    return str(info.value)


# -- item 10: instances without an image ---------------------------------------------------------


@pytest.mark.parametrize("per_frame_geometry", [True, False], ids=["philips", "siemens"])
def test_raw_data_beside_the_image_is_skipped(per_frame_geometry: bool) -> None:
    image = enhanced_mr(slices=7, per_frame_geometry=per_frame_geometry)
    volume = volume_from_datasets([raw_data_beside(image), image])
    np.testing.assert_allclose(volume.affine, expected_affine(), atol=1e-5)
    assert volume.array[:, 1, 1].tolist() == [pixel_value(0, s) for s in range(7)]
    assert volume.array[0, 0, 1] == pixel_value(0, 0) + 1
    assert {uid for uid, _ in volume.slice_sources} == {image.SOPInstanceUID}


def test_a_series_without_any_image_is_refused_by_name() -> None:
    raw = raw_data_beside(enhanced_mr(slices=2))
    message = _expect(VolumeErrorCause.NOT_AN_IMAGE, [raw])
    assert "Raw Data Storage" in message and uid_digest(raw.SOPInstanceUID) in message


def test_an_image_without_pixel_data_is_still_refused(small_study: SyntheticStudy) -> None:
    datasets = [copy.deepcopy(ds) for ds in small_study.series[MriSequence.T2W]]
    del datasets[2].PixelData
    _expect(VolumeErrorCause.NO_PIXEL_DATA, datasets)


def _write(folder: Path, datasets: list[Dataset]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, ds in enumerate(datasets):
        ds.save_as(folder / f"{index:03d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture
def philips_study() -> list[Dataset]:
    """One study: a 40-frame Enhanced MR with its Raw Data object, and a 4-D file of 13 x 40 frames."""
    image = enhanced_mr(slices=40)
    volumes = tuple({"temporal": t} for t in range(1, 14))
    four_d = enhanced_mr(slices=40, volumes=volumes, study_uid=image.StudyInstanceUID)
    four_d.SeriesDescription = "dyn_enhanced"
    return [image, raw_data_beside(image), four_d]


def _facts(infos: list[SeriesInfo], description: str) -> SeriesInfo:
    return next(info for info in infos if info.series_description == description)


def test_folder_study_facts_come_from_the_functional_groups(tmp_path: Path, philips_study: list[Dataset]) -> None:
    image = philips_study[0]
    study = FolderStudy(_write(tmp_path / "study", philips_study))
    infos = study.series()
    single, four_d = _facts(infos, "t2_enhanced"), _facts(infos, "dyn_enhanced")
    assert (single.slices, four_d.slices) == (40, 40)
    for info in (single, four_d):
        assert info.orientation == pytest.approx((*ROW_COSINE, *COLUMN_COSINE), abs=1e-7)
        assert info.slice_thickness_mm == SLICE_THICKNESS
    assert single.non_image_instances == ("Raw Data Storage object",)
    assert study.sop_instance_uids(single) == [image.SOPInstanceUID]
    assert [ds.SOPInstanceUID for ds in study.datasets(single)] == [image.SOPInstanceUID]


def test_a_series_without_images_is_read_whole(tmp_path: Path, small_study: SyntheticStudy) -> None:
    """A SEG series keeps its instances (the cohort reads reference masks through the same source)."""
    t2 = [copy.deepcopy(ds) for ds in small_study.series[MriSequence.T2W]]
    study = FolderStudy(_write(tmp_path / "study", [*t2, copy.deepcopy(small_study.reference_seg)]))
    seg = next(info for info in study.series() if info.modality == "SEG")
    assert (seg.slices, seg.non_image_instances) == (0, ("Segmentation Storage object",))
    assert [ds.SOPInstanceUID for ds in study.datasets(seg)] == [small_study.reference_seg.SOPInstanceUID]
    assert study.sop_instance_uids(seg) == [small_study.reference_seg.SOPInstanceUID]


def test_shared_orientation_and_thickness_are_read() -> None:
    info = SeriesInfo.from_header(enhanced_mr(slices=3, per_frame_geometry=False), 3, "siemens")
    assert info.orientation == pytest.approx((*ROW_COSINE, *COLUMN_COSINE), abs=1e-7)
    assert info.slice_thickness_mm == SLICE_THICKNESS


def test_orthanc_study_skips_the_raw_data_and_reads_the_same_facts(
    orthanc_client: OrthancClient, tmp_path: Path, philips_study: list[Dataset]
) -> None:
    image = philips_study[0]
    for ds in philips_study:
        orthanc_client.upload_dataset(ds)
    study_id = orthanc_client.find_study(image.StudyInstanceUID)
    assert study_id is not None
    source = OrthancStudy(orthanc_client, study_id)
    infos = source.series()
    single = _facts(infos, "t2_enhanced")
    assert (single.slices, _facts(infos, "dyn_enhanced").slices) == (40, 40)
    assert single.orientation == pytest.approx((*ROW_COSINE, *COLUMN_COSINE), abs=1e-7)
    assert single.slice_thickness_mm == SLICE_THICKNESS
    assert single.non_image_instances == ("Raw Data Storage object",)
    assert source.sop_instance_uids(single) == [image.SOPInstanceUID]
    datasets = source.datasets(single)
    assert [ds.SOPInstanceUID for ds in datasets] == [image.SOPInstanceUID]
    np.testing.assert_allclose(volume_from_datasets(datasets).affine, expected_affine(), atol=1e-5)


def test_orthanc_counts_classic_slices_per_volume(orthanc_client: OrthancClient, small_study: SyntheticStudy) -> None:
    """A classic series of two time points: one volume's slices, from Orthanc's main tags."""
    first = [copy.deepcopy(ds) for ds in small_study.series[MriSequence.T2W]]
    second = [copy.deepcopy(ds) for ds in first]
    for ds in second:
        ds.SOPInstanceUID = hd.UID()
        ds.TemporalPositionIdentifier = 2
    for ds in [*first, *second]:
        orthanc_client.upload_dataset(ds)
    study_id = orthanc_client.find_study(first[0].StudyInstanceUID)
    assert study_id is not None
    (info,) = OrthancStudy(orthanc_client, study_id).series()
    assert info.slices == len(first)
    assert info.non_image_instances == ()


# -- item 12: what repeats at each position ------------------------------------------------------


def test_enhanced_four_d_gives_the_first_time_point() -> None:
    four_d = enhanced_mr(slices=6, volumes=({"temporal": 2}, {"temporal": 1}, {"temporal": 3}))
    volume = volume_from_datasets([four_d])
    assert volume.shape == (6, ROWS, COLUMNS)
    assert volume.array[:, 1, 1].tolist() == [pixel_value(1, s) for s in range(6)]


def test_two_echoes_are_not_a_time_series() -> None:
    two_echoes = enhanced_mr(slices=5, volumes=({"echo": 12.0}, {"echo": 36.5}))
    message = _expect(VolumeErrorCause.MULTIPLE_ECHOES, [two_echoes])
    assert "12" in message and "36.5" in message
    second = volume_from_datasets([two_echoes], pick=FramePick(echo_time_ms=36.5))
    assert second.array[:, 1, 1].tolist() == [pixel_value(1, s) for s in range(5)]


def test_magnitude_and_phase_are_refused_unless_the_rule_picks_one() -> None:
    mixed = enhanced_mr(slices=5, volumes=({"frame_type": "P"}, {"frame_type": "M"}))
    _expect(VolumeErrorCause.MIXED_IMAGE_TYPES, [mixed])
    # A rule that names a value every frame has picks nothing.
    _expect(VolumeErrorCause.MIXED_IMAGE_TYPES, [mixed], pick=FramePick(image_type_any=("ORIGINAL",)))
    magnitude = volume_from_datasets([mixed], pick=FramePick(image_type_any=("M",)))
    assert magnitude.array[:, 1, 1].tolist() == [pixel_value(1, s) for s in range(5)]


def test_several_b_values_take_the_highest_a_dwi_rule_allows() -> None:
    dwi = enhanced_mr(slices=4, volumes=({"b": 0.0}, {"b": 1400.0}, {"b": 800.0}))
    _expect(VolumeErrorCause.MULTIPLE_B_VALUES, [dwi])
    rule = next(r for r in load_task_spec().channels if r.min_b_value is not None)
    volume = volume_from_datasets([dwi], pick=frame_pick(rule))
    assert volume.array[:, 1, 1].tolist() == [pixel_value(1, s) for s in range(4)]
    assert SeriesInfo.from_header(dwi, 4, "dwi").b_value == 1400.0


def _classic_pair(study: SyntheticStudy, **second: object) -> list[Dataset]:
    first = [copy.deepcopy(ds) for ds in study.series[MriSequence.T2W]]
    other = [copy.deepcopy(ds) for ds in first]
    for ds in other:
        ds.SOPInstanceUID = hd.UID()
        for keyword, value in second.items():
            setattr(ds, keyword, value)
    return [*first, *other]


def test_classic_echoes_and_field_maps_are_told_apart(small_study: SyntheticStudy) -> None:
    _expect(VolumeErrorCause.MULTIPLE_ECHOES, _classic_pair(small_study, EchoTime="180"))
    field_map = _classic_pair(small_study, ImageType=["ORIGINAL", "PRIMARY", "P", "ND"])
    _expect(VolumeErrorCause.MIXED_IMAGE_TYPES, field_map)
    picked = volume_from_datasets(field_map, pick=FramePick(image_type_any=("P",)))
    assert {uid for uid, _ in picked.slice_sources} == {ds.SOPInstanceUID for ds in field_map[len(field_map) // 2 :]}


def test_classic_time_series_still_gives_the_first_volume(small_study: SyntheticStudy) -> None:
    series = _classic_pair(small_study, TemporalPositionIdentifier=2)
    volume = volume_from_datasets(series)
    assert {uid for uid, _ in volume.slice_sources} == {ds.SOPInstanceUID for ds in series[: len(series) // 2]}
