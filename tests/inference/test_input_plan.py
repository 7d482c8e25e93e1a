"""The input plan: one decision per study, made from headers, stored as JSON and loaded exactly.

Headers from Orthanc (``/instances/{id}/tags?short``) must give the planner the same facts as the files
themselves, on real scanner series (dcm_qa_nih: a GE 4-D EPI, Siemens mosaics) and Enhanced MR objects.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from radfed.inference.dicom.selection import NoMatchingSeriesError
from radfed.inference.dicom.study_source import FolderStudy, OrthancStudy
from radfed.inference.model.taskspec import load_task_spec
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.orthanc.tags import dataset_from_short_tags
from radfed.inference.pipeline.findings import input_fingerprint
from radfed.inference.pipeline.input_plan import (
    InputPlan,
    SeriesInstances,
    image_fingerprint,
    plan_inputs,
    plan_study,
    study_series,
)
from radfed.inference.pipeline.preprocess import load_study
from radfed.inference.testing.synthetic.sites import Sequence
from radfed.inference.testing.synthetic.study import SyntheticStudy
from radfed.inference.testing.synthetic.writer import write_study
from tests.inference.test_vendor_series import enhanced_mr, raw_data_beside

SPEC = load_task_spec(None)


@pytest.fixture
def study_folder(tmp_path: Path, small_study: SyntheticStudy) -> Path:
    return write_study(small_study, tmp_path)


def test_short_tags_become_typed_elements() -> None:
    ds = dataset_from_short_tags(
        {
            "0008,0060": "MR",
            "0008,0008": "ORIGINAL\\PRIMARY\\M",
            "0020,0037": "1\\0\\0\\0\\1\\0",
            "0028,0010": "6",
            "0018,9087": "800",  # DiffusionBValue, FD
            "0008,103e": "a\\b",  # LO keeps the backslash split Orthanc made
            "7fe0,0010": None,  # pixel data: left out
            "5200,9230": [{"0020,9113": [{"0020,0032": "1\\2\\3"}]}],
        }
    )
    assert ds.Modality == "MR" and list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "M"]
    assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert ds.Rows == 6 and isinstance(ds.Rows, int)
    assert ds.DiffusionBValue == 800.0 and isinstance(ds.DiffusionBValue, float)
    assert "PixelData" not in ds
    position = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    assert [float(v) for v in position] == [1, 2, 3]
    with pytest.raises(ValueError, match="not an Orthanc tag key"):
        dataset_from_short_tags({"PatientName": "x"})


def test_the_plan_names_every_series_and_keys_the_chosen_instances(study_folder: Path) -> None:
    source = FolderStudy(study_folder)
    plan = plan_study(source, SPEC)
    assert [c.channel for c in plan.channels] == list(SPEC.channel_names)
    expected = [uid for c in plan.channels for uid in source.sop_instance_uids(c.series)]
    assert plan.fingerprint == input_fingerprint(expected)
    assert len(plan.describe()) == len(source.series())  # the SEG too, with why it was rejected
    assert any("SEG object, not an image series" in line for line in plan.describe())
    for channel in plan.channels:
        assert [pydicom.dcmread(p).SOPInstanceUID for p in channel.locations] == list(channel.sop_instance_uids)


def test_the_plan_survives_its_json_form(study_folder: Path) -> None:
    plan = plan_study(FolderStudy(study_folder), SPEC)
    stored = json.loads(json.dumps(plan.to_json()))
    assert InputPlan.from_json(stored) == plan
    assert InputPlan.from_json({}) is None  # a job of an older node: planned again
    assert InputPlan.from_json({**stored, "format": 0}) is None


def test_the_pipeline_loads_exactly_the_plan(study_folder: Path, small_study: SyntheticStudy) -> None:
    source = FolderStudy(study_folder)
    series = study_series(source)
    t2_uid = small_study.series[Sequence.T2W][0].SeriesInstanceUID
    # the plan made before the last T2 slice arrived: the loader must not pick up the slice now on disk
    shorter = [
        dataclasses.replace(s, locations=s.locations[:-1], sop_instance_uids=s.sop_instance_uids[:-1])
        if s.info.series_instance_uid == t2_uid
        else s
        for s in series
    ]
    full, partial = plan_inputs(source.study_instance_uid, series, SPEC), plan_inputs("x", shorter, SPEC)
    assert partial.fingerprint != full.fingerprint
    loaded = load_study(source, SPEC, partial)
    assert loaded.fingerprint == partial.fingerprint
    reference = SPEC.reference_channel.name
    assert [ds.SOPInstanceUID for ds in loaded.reference_datasets] == list(partial.channel(reference).sop_instance_uids)
    assert loaded.reference.shape[0] == len(small_study.series[Sequence.T2W]) - 1


def test_a_study_without_a_channel_fails_with_the_reason_and_a_key_of_its_images(study_folder: Path) -> None:
    series = [s for s in study_series(FolderStudy(study_folder)) if "dwi" not in s.info.series_description.lower()]
    series = [s for s in series if not (s.info.b_value or 0) > 0]
    with pytest.raises(NoMatchingSeriesError, match="no series matched rule"):
        plan_inputs("x", series, SPEC)
    with_seg = image_fingerprint(series)
    images = [s for s in series if s.info.modality != "SEG"]
    assert with_seg == image_fingerprint(images)  # our own (and others') SEG never changes the key
    assert with_seg == input_fingerprint(uid for s in images for uid in s.sop_instance_uids)


def _upload(client: OrthancClient, files: list[Path]) -> None:
    for path in files:
        client.upload(path.read_bytes())


def _by_uid(infos: list[SeriesInstances]) -> dict[str, SeriesInstances]:
    return {s.info.series_instance_uid: s for s in infos}


@pytest.mark.parametrize("folder", ["In/20180918GE/mr_0005", "In/20180918Si"], ids=["GE-4D-EPI", "Siemens-mosaic"])
def test_orthanc_headers_give_the_files_facts_on_real_series(
    orthanc_client: OrthancClient, shared_data: Path, folder: str
) -> None:
    root = shared_data / "dcm_qa_nih" / folder
    files = sorted(p for p in root.rglob("*.dcm"))
    _upload(orthanc_client, files)
    from_files = _by_uid(study_series(FolderStudy(root)))
    study_id = orthanc_client.find_study(str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID))
    assert study_id is not None
    source = OrthancStudy(orthanc_client, study_id)
    from_orthanc = _by_uid(study_series(source))
    assert from_orthanc.keys() == from_files.keys()
    for uid, series in from_orthanc.items():
        on_disk = from_files[uid]
        assert dataclasses.replace(series.info, handle="") == dataclasses.replace(on_disk.info, handle="")
        assert series.sop_instance_uids == on_disk.sop_instance_uids or set(series.sop_instance_uids) == set(
            on_disk.sop_instance_uids
        )
    if "Si" in folder:  # the mosaic's tile count came from (0019,100A) in the tags, not a downloaded file
        assert all(s.info.slices > 1 for s in from_orthanc.values())


def test_orthanc_headers_give_the_files_facts_and_the_same_plan(
    orthanc_client: OrthancClient, study_folder: Path, small_study: SyntheticStudy
) -> None:
    """A synthetic mp-MRI study with its reference SEG (a multi-frame object whose tags hold AT values)."""
    _upload(orthanc_client, sorted(study_folder.rglob("*.dcm")))
    study_id = orthanc_client.find_study(small_study.identity.study_instance_uid)
    assert study_id is not None
    source = OrthancStudy(orthanc_client, study_id)
    from_files, from_orthanc = _by_uid(study_series(FolderStudy(study_folder))), _by_uid(study_series(source))
    assert from_orthanc.keys() == from_files.keys()
    for uid, series in from_orthanc.items():
        assert dataclasses.replace(series.info, handle="") == dataclasses.replace(from_files[uid].info, handle="")
    plan = plan_study(source, SPEC)
    assert plan.fingerprint == plan_study(FolderStudy(study_folder), SPEC).fingerprint
    loaded = load_study(source, SPEC, plan)
    assert [ds.SOPInstanceUID for ds in loaded.reference_datasets] == list(
        plan.channel(SPEC.reference_channel.name).sop_instance_uids
    )


def test_orthanc_headers_give_the_files_facts_on_enhanced_mr(orthanc_client: OrthancClient, tmp_path: Path) -> None:
    image = enhanced_mr(slices=12)
    datasets: list[Dataset] = [image, raw_data_beside(image)]
    folder = tmp_path / "study"  # beside Orthanc's own storage folder
    folder.mkdir()
    for index, ds in enumerate(datasets):
        ds.save_as(folder / f"{index}.dcm", enforce_file_format=True)
    _upload(orthanc_client, sorted(folder.glob("*.dcm")))
    [on_disk] = study_series(FolderStudy(folder))
    study_id = orthanc_client.find_study(str(image.StudyInstanceUID))
    assert study_id is not None
    [from_orthanc] = study_series(OrthancStudy(orthanc_client, study_id))
    assert dataclasses.replace(from_orthanc.info, handle="") == dataclasses.replace(on_disk.info, handle="")
    assert from_orthanc.info.slices == 12 and from_orthanc.info.non_image_instances == ("Raw Data Storage object",)
    assert from_orthanc.sop_instance_uids == (image.SOPInstanceUID,)
