"""Training from a Medical Segmentation Decathlon / nnU-Net raw dataset folder (NIfTI), end to end."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radfed.federation.learning.cohort import cohort_from_sources
from radfed.federation.learning.datasets import DatasetLayoutError, read_dataset, volume_from_nifti
from radfed.federation.learning.train_local import train_local_artifact
from radfed.inference.model.artifact import load_artifact
from radfed.inference.model.taskspec import parse_task_spec

SPEC = """
[task]
name = "tiny-nifti"

[[channels]]
name = "flair"
reference = true
modality = "MR"

[[channels]]
name = "t1"
modality = "MR"

[labels.segmentation]
lesion_property_types = ["SCT:108369006"]

[labels.classification]
source = "csv"
key = "StudyInstanceUID"
column = "label"
positive_values = ["1"]

[preprocessing]

[model]

[training]
steps = 4
validate_every = 2
min_validation_cohort = 2   # validate and calibrate even on this tiny set

[outputs]
lesion_threshold = 0.5
min_lesion_volume_mm3 = 5.0
"""


def _write(path: Path, array: np.ndarray, spacing: tuple[float, float, float]) -> None:
    affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(array, affine), str(path))


def _dataset(root: Path, dialect: str, cases: int = 5) -> Path:
    """Bright blobs on a noisy background, 2 channels, 4 mm slices and 1 mm pixels (x, y, z order)."""
    rng = np.random.default_rng(3)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for case in range(cases):
        label = np.zeros((48, 40, 10), np.uint8)
        x, y = rng.integers(10, 30, size=2)
        label[x : x + 8, y : y + 6, 3:6] = 1
        channels = [rng.normal(100, 10, label.shape) + 80 * label * (c + 1) for c in range(2)]
        name = f"case_{case:03d}"
        if dialect == "nnunet":
            for c, image in enumerate(channels):
                _write(root / "imagesTr" / f"{name}_{c:04d}.nii.gz", image.astype(np.float32), (1.0, 1.0, 4.0))
        else:
            _write(root / "imagesTr" / f"{name}.nii.gz", np.stack(channels, axis=-1).astype(np.float32), (1, 1, 4))
        _write(root / "labelsTr" / f"{name}.nii.gz", label, (1.0, 1.0, 4.0))
    names = {"0": "FLAIR", "1": "T1"}
    description = {"channel_names": names} if dialect == "nnunet" else {"modality": names}
    (root / "dataset.json").write_text(json.dumps(description | {"labels": {"0": "background", "1": "lesion"}}))
    return root


@pytest.mark.parametrize("dialect", ["nnunet", "msd"])
def test_both_dialects_read_with_their_geometry(tmp_path: Path, dialect: str) -> None:
    root = _dataset(tmp_path / dialect, dialect, cases=2)
    cases = list(read_dataset(root, parse_task_spec(SPEC)))
    assert [c.case_id for c in cases] == ["case_000", "case_001"]
    case = cases[0]
    assert case.reference.shape == (10, 40, 48)  # radfed's (slice, row, column)
    assert case.reference.spacing == pytest.approx((4.0, 1.0, 1.0))
    assert set(case.channels) == {"flair", "t1"} and case.lesions.sum() == 8 * 6 * 3
    assert case.channels["t1"][case.lesions > 0].mean() > case.channels["flair"][case.lesions > 0].mean()


def test_nifti_geometry_goes_to_lps(tmp_path: Path) -> None:
    path = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 3.0, 4.0, 1.0])), str(path))
    array, affine = volume_from_nifti(path)
    assert array.shape == (6, 5, 4)
    # voxel (k=1, j=0, i=0) is 4 mm along +S; (0, 0, 1) is 2 mm along +R, i.e. -2 mm in LPS x
    assert affine[:3, :3] @ [1, 0, 0] == pytest.approx([0, 0, 4])
    assert affine[:3, :3] @ [0, 0, 1] == pytest.approx([-2, 0, 0])


def test_a_channel_count_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "d", "nnunet", cases=1)
    one_channel = SPEC.replace('[[channels]]\nname = "t1"\nmodality = "MR"\n', "")
    with pytest.raises(DatasetLayoutError, match="2 channel"):
        list(read_dataset(root, parse_task_spec(one_channel)))


def test_training_on_a_dataset_folder_makes_a_planned_artifact(tmp_path: Path) -> None:
    """``radfed train --local --data DATASET`` with a spec written only against the documented format."""
    root = _dataset(tmp_path / "Dataset001_Tiny", "nnunet")
    spec_file = tmp_path / "tiny.toml"
    spec_file.write_text(SPEC)
    outcome = train_local_artifact(task=str(spec_file), sources=[str(root)], out=tmp_path / "artifact")
    report = outcome.report
    assert (report.found, report.usable, report.unknown, report.positives) == (5, 5, 5, 0)
    artifact = load_artifact(tmp_path / "artifact")
    plan = artifact.spec.plan
    assert plan is not None and plan.network.spatial_dims == 2  # 4 mm slices, 1 mm pixels
    assert plan.spacing_mm == pytest.approx((4.0, 1.0, 1.0))
    assert artifact.provenance["steps"] == 4
    # checkpoints were scored on the validation studies; their calibrated settings are what inference uses
    assert [step for step, _ in artifact.provenance["validation"]] == [2, 4]
    calibration = artifact.provenance["calibration"]
    assert calibration is not None and calibration["validation_studies"] >= 1
    assert artifact.spec.outputs.lesion_threshold == calibration["lesion_threshold"]
    assert artifact.spec.outputs.min_lesion_volume_mm3 == calibration["min_lesion_volume_mm3"]
    assert artifact.spec.outputs.study_temperature == calibration["study_temperature"]
    # the report names what the chosen settings scored and what the spec's would have
    assert f"({calibration['reference_dice']:.3f} at the spec's; best step" in outcome.summary()
    assert calibration["reference_dice"] <= calibration["validation_dice"]
    assert artifact.provenance["fingerprint"]["studies"] == 5
    cohort = cohort_from_sources(artifact.spec, [str(root)])
    assert cohort.report.usable == 5 and cohort.samples[0].image.shape[0] == 2
