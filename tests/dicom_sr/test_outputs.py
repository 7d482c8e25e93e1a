"""SEG and SR written for synthetic studies (axial and oblique; 0, 1 and 5 lesions) pass every validator
and land on the right voxels in dcmqi (3D Slicer) and OHIF's own SEG parser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from radfed.dicom_sr.outputs import ResultObjects, build_results
from radfed.dicom_sr.validation import ObjectKind, check_dciodvfy, check_strict_read, find_tool
from radfed.inference.pipeline.findings import InferenceResult
from tests.dicom_sr.conftest import ResultFactory

CASES = [(0, False), (1, False), (5, False), (0, True), (1, True), (5, True)]
IDS = [f"{n}-lesions-{'oblique' if o else 'axial'}" for n, o in CASES]
NODE_DIR = Path(__file__).resolve().parents[1] / "node"


def _write(objects: ResultObjects, folder: Path) -> tuple[Path | None, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    seg_path = None
    if objects.seg is not None:
        seg_path = folder / "seg.dcm"
        objects.seg.save_as(seg_path, enforce_file_format=True)
    sr_path = folder / "sr.dcm"
    objects.sr.save_as(sr_path, enforce_file_format=True)
    return seg_path, sr_path


@pytest.mark.validators
@pytest.mark.parametrize(("n_lesions", "oblique"), CASES, ids=IDS)
def test_objects_pass_dciodvfy_and_strict_reading(
    tmp_path: Path, make_result: ResultFactory, n_lesions: int, oblique: bool
) -> None:
    result, _ = make_result(n_lesions, oblique)
    objects = build_results(result)
    assert (objects.seg is None) == (n_lesions == 0)
    seg_path, sr_path = _write(objects, tmp_path)
    for path, kind in ((seg_path, ObjectKind.SEG), (sr_path, ObjectKind.SR)):
        if path is None:
            continue
        assert check_dciodvfy(path).passed, check_dciodvfy(path).detail
        outcome = check_strict_read(path, kind)
        assert outcome.passed, outcome.detail


def _nifti_mask_on_grid(path: Path, result: InferenceResult) -> np.ndarray:
    """A dcmqi NIfTI (RAS, column-row-slice) resampled by index onto radfed's grid (exact when aligned)."""
    image = nib.load(path)
    data = np.asarray(image.dataobj)
    grid = result.grid
    index = np.stack(np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij"), axis=-1).reshape(-1, 3)
    ras = grid.index_to_lps(index) * np.array([-1.0, -1.0, 1.0])
    ijk = (ras - image.affine[:3, 3]) @ np.linalg.inv(image.affine[:3, :3]).T
    rounded = np.rint(ijk).astype(int)
    assert np.abs(ijk - rounded).max() < 1e-3, "dcmqi's grid is not radfed's grid"
    inside = np.all((rounded >= 0) & (rounded < np.array(data.shape[:3])), axis=1)
    out = np.zeros(len(index), dtype=bool)
    out[inside] = data[rounded[inside, 0], rounded[inside, 1], rounded[inside, 2]] > 0
    return out.reshape(grid.shape)


@pytest.mark.parametrize(
    ("n_lesions", "oblique"),
    [c for c in CASES if c[0]],
    ids=[i for c, i in zip(CASES, IDS, strict=True) if c[0]],
)
@pytest.mark.validators
def test_dcmqi_round_trips_seg_and_reads_sr(
    tmp_path: Path, make_result: ResultFactory, n_lesions: int, oblique: bool
) -> None:
    result, _ = make_result(n_lesions, oblique)
    seg_path, sr_path = _write(build_results(result), tmp_path)
    assert seg_path is not None
    out = tmp_path / "dcmqi"
    out.mkdir()
    converted = subprocess.run(
        [find_tool("segimage2itkimage") or "segimage2itkimage", "--inputDICOM", str(seg_path),
         "--outputDirectory", str(out), "--outputType", "nifti"],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert converted.returncode == 0, converted.stderr[-2000:]
    meta = json.loads((out / "meta.json").read_text())
    labels = {a["labelID"]: a["SegmentLabel"] for group in meta["segmentAttributes"] for a in group}
    assert labels == {n: f"Lesion {n}" for n in range(1, n_lesions + 1)}
    for lesion in result.lesions:
        np.testing.assert_array_equal(
            _nifti_mask_on_grid(out / f"{lesion.number}.nii.gz", result), result.lesion_mask(lesion.number)
        )

    report_json = tmp_path / "sr.json"
    read = subprocess.run(
        [find_tool("tid1500reader") or "tid1500reader", "--inputDICOM", str(sr_path),
         "--outputMetadata", str(report_json)],
        capture_output=True, text=True, check=False, timeout=300,
    )  # fmt: skip
    assert read.returncode == 0, read.stderr[-2000:]
    measurements = json.loads(report_json.read_text())["Measurements"]
    # a volumetric and a planar group per lesion (the study finding is a qualitative evaluation by default)
    assert len(measurements) == 2 * n_lesions
    volumes = {
        m["TrackingIdentifier"]: float(item["value"])
        for m in measurements
        for item in m["measurementItems"]
        if item["quantity"]["CodeMeaning"] == "Volume"
    }
    for lesion in result.lesions:
        assert volumes[f"Lesion {lesion.number}"] == pytest.approx(lesion.measurements.volume_mm3, rel=1e-3)


def _node_sources(result: InferenceResult) -> list[dict[str, object]]:
    sources = []
    for uid, _frame in result.grid.slice_sources:
        ds = next(d for d in result.source_datasets if d.SOPInstanceUID == uid)
        sources.append(
            {
                "imageId": f"radfed:{uid}",
                "sopInstanceUID": uid,
                "sopClassUID": ds.SOPClassUID,
                "seriesInstanceUID": ds.SeriesInstanceUID,
                "frameOfReferenceUID": ds.FrameOfReferenceUID,
                "imagePositionPatient": [float(v) for v in ds.ImagePositionPatient],
                "rowCosines": [float(v) for v in ds.ImageOrientationPatient[:3]],
                "columnCosines": [float(v) for v in ds.ImageOrientationPatient[3:]],
                "rows": int(ds.Rows),
                "columns": int(ds.Columns),
                "pixelSpacing": [float(v) for v in ds.PixelSpacing],
                "sliceThickness": float(ds.SliceThickness),
                "instanceNumber": int(ds.InstanceNumber),
            }
        )
    return sources


def run_ohif_seg_parser(seg_path: Path, result: InferenceResult, tmp_path: Path) -> dict[str, object]:
    node = shutil.which("node")
    assert node is not None, "node is not installed (make install sets it up)"
    assert (NODE_DIR / "node_modules" / "@cornerstonejs" / "adapters").is_dir(), (
        "run make install (npm ci in tests/node)"
    )
    sources_path = tmp_path / "sources.json"
    sources_path.write_text(json.dumps(_node_sources(result)))
    run = subprocess.run(
        [node, str(NODE_DIR / "seg_contract.mjs"), str(sources_path), str(seg_path)],
        capture_output=True, text=True, check=False, timeout=120, cwd=NODE_DIR,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    parsed: dict[str, object] = json.loads(run.stdout)
    return parsed


@pytest.mark.parametrize(
    ("n_lesions", "oblique"), [(1, False), (5, False), (5, True)], ids=["1-axial", "5-axial", "5-oblique"]
)
def test_ohif_seg_parser_puts_every_voxel_on_the_right_image(
    tmp_path: Path, make_result: ResultFactory, n_lesions: int, oblique: bool
) -> None:
    result, _ = make_result(n_lesions, oblique)
    seg_path, _ = _write(build_results(result), tmp_path)
    assert seg_path is not None
    parsed = run_ohif_seg_parser(seg_path, result, tmp_path)
    per_image = parsed["perImage"]
    assert isinstance(per_image, dict)
    for lesion in result.lesions:
        for slice_index in np.flatnonzero(result.lesion_mask(lesion.number).any(axis=(1, 2))):
            uid = result.grid.slice_sources[slice_index][0]
            got = per_image[f"radfed:{uid}"][str(lesion.number)]
            rows, cols = np.nonzero(result.lesion_mask(lesion.number)[slice_index])
            assert got["count"] == len(rows)
            assert got["row"] == pytest.approx(rows.mean(), abs=1e-6)
            assert got["column"] == pytest.approx(cols.mean(), abs=1e-6)
    total = sum(stats["count"] for image in per_image.values() for stats in image.values())
    assert total == sum(int(result.lesion_mask(lesion.number).sum()) for lesion in result.lesions)
    segments = parsed["segments"]
    assert isinstance(segments, dict)
    assert {int(k) for k in segments} == set(range(1, n_lesions + 1))
