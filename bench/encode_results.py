"""Encode time and size of radfed's SEG (and the whole SEG + SR + QA build) for
(a) a 24 x 256 x 256 mp-MRI grid with 3 lesions and (b) a 300 x 512 x 512 CT grid with 50 lesions,
in the default profile (BINARY) and LABELMAP (RLE).

``RADFED_BENCH_ENCODE_BASELINE=<git revision>`` (9f4c10e or later: before it, the modules had other paths) also times
the full build of case (b) with that revision's ``dicom_sr`` and ``inference`` (exported to a temporary folder and
imported first, in a subprocess), so that a change is compared with what it replaced in one run on one machine."""

from __future__ import annotations

import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from bench.report import table
from radfed.dicom_sr.outputs import build_results
from radfed.dicom_sr.profile import OutputProfile, SegEncoding
from radfed.dicom_sr.seg import build_seg
from radfed.inference.coding import CodedTerm
from radfed.inference.dicom.series import volume_from_datasets
from radfed.inference.pipeline.findings import (
    ClassCategory,
    InferenceResult,
    LesionFinding,
    ModelIdentity,
    StudyFinding,
    TaskCodes,
)
from radfed.inference.pipeline.lesions import measure_lesion
from radfed.inference.testing.synthetic.sites import Sequence, site_profile
from radfed.inference.testing.synthetic.study import render_study

CODES = TaskCodes(
    procedure=CodedTerm("BENCH", "99RADFED", "Benchmark procedure"),
    finding_site=None,
    lesion_label="Lesion",
    lesion_category=CodedTerm("49755003", "SCT", "Morphologically Abnormal Structure"),
    lesion_type=CodedTerm("108369006", "SCT", "Neoplasm"),
    lesion_finding_type=CodedTerm("108369006", "SCT", "Neoplasm"),
    study_finding_type=CodedTerm("404684003", "SCT", "Finding"),
    probability_concept=CodedTerm("111047", "DCM", "Probability of cancer"),
    classification_concept=CodedTerm("CLS", "99RADFED", "Classification"),
    categories=(ClassCategory(CodedTerm("LOW", "99RADFED", "Low"), 0.0),),
    no_finding=CodedTerm("111286", "DCM", "No abnormality"),
)
MODEL = ModelIdentity("bench-model", "1.0.0")
REPEATS = 5


def result_of(datasets: list[Dataset], labels: np.ndarray) -> InferenceResult:
    """The labels (value = lesion number) on the series as a result, each lesion measured."""
    grid = volume_from_datasets(datasets)
    n = int(labels.max())
    lesions = tuple(LesionFinding(i, 0.8, measure_lesion(labels == i, grid)) for i in range(1, n + 1))
    return InferenceResult(
        grid=grid,
        source_datasets=tuple(datasets),
        lesion_labels=labels,
        lesions=lesions,
        study_finding=StudyFinding(0.8, CODES.categories[0].code),
        model=MODEL,
        codes=CODES,
        input_fingerprint="bench",
    )


def mri_case() -> InferenceResult:
    study = render_study(site_profile(1), 1, seed=3, n_lesions=3)
    return result_of(study.series[Sequence.T2W], study.lesion_masks.astype(np.uint8))


def ct_series(slices: int, size: int) -> list[Dataset]:
    """Headers (and blank pixels) of an axial CT series, 0.7 x 0.7 x 1 mm."""
    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    pixels = np.zeros((size, size), dtype=np.uint16).tobytes()
    for k in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, for_uid
        ds.Modality, ds.PatientID, ds.PatientName = "CT", "BENCH", "BENCH^CT"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "B1", "1"
        ds.ReferringPhysicianName, ds.PatientBirthDate, ds.PatientSex = "", "", "O"
        ds.SeriesNumber, ds.InstanceNumber = 2, k + 1
        ds.ImagePositionPatient = [-180.0, -180.0, float(k)]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 1.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = pixels
        datasets.append(ds)
    return datasets


def ct_case(slices: int = 300, size: int = 512, lesions: int = 50) -> InferenceResult:
    rng = np.random.default_rng(0)
    datasets = ct_series(slices, size)
    labels = np.zeros((slices, size, size), dtype=np.uint8)
    s, r, c = np.ogrid[:slices, :size, :size]
    for number in range(1, lesions + 1):
        centre = rng.uniform([20, 60, 60], [slices - 20, size - 60, size - 60])
        radius_mm = rng.uniform(4, 12)
        inside = ((s - centre[0]) * 1.0) ** 2 + ((r - centre[1]) * 0.7) ** 2 + (
            (c - centre[2]) * 0.7
        ) ** 2 <= radius_mm**2
        labels[inside & (labels == 0)] = number
    return result_of(datasets, labels)


def _size(ds: Dataset) -> int:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return len(buffer.getvalue())


def _time(fn, repeats: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Median wall and CPU seconds (CPU time says more on a machine others are loading)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


ENCODINGS = ("BINARY", "LABELMAP")
FULL_GOAL_S = {"(a)": 0.5, "(b)": 1.5}


def full_build_times(result: InferenceResult, repeats: int) -> dict[str, tuple[float, float]]:
    """Wall and CPU seconds of SEG + SR + QA per encoding, after one warm-up build."""
    times = {}
    for encoding in ENCODINGS:
        profile = OutputProfile(seg_encoding=SegEncoding(encoding))
        build_results(result, profile)
        times[encoding] = _time(lambda r=result, p=profile: build_results(r, p), repeats)
    return times


def baseline_times(revision: str, repeats: int) -> dict[str, tuple[float, float]]:
    """``full_build_times`` of case (b) with ``revision``'s result code, in a fresh interpreter."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as folder:
        for package in ("dicom_sr", "inference"):
            target = Path(folder) / "radfed" / package
            target.mkdir(parents=True)
            archive = subprocess.run(
                ["git", "-C", str(root), "archive", revision, package], capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", str(target), "--strip-components=1"], input=archive, check=True)
        script = (
            "import json, sys; import radfed.dicom_sr.outputs as o; "
            f"assert o.__file__.startswith({folder!r}), o.__file__; "
            "from bench.encode_results import ct_case, full_build_times; "
            f"print(json.dumps(full_build_times(ct_case(), {repeats})))"
        )
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([folder, str(root)])}
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, check=True
        )
    return {k: (v[0], v[1]) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def main() -> None:
    baseline = os.environ.get("RADFED_BENCH_ENCODE_BASELINE")
    rows = []
    for name, make, repeats in (
        ("(a) MR 24x256x256, 3 lesions", mri_case, REPEATS),
        ("(b) CT 300x512x512, 50 lesions", ct_case, 3),
    ):
        result = make()
        full = full_build_times(result, max(1, repeats - 2))
        for encoding in ENCODINGS:
            profile = OutputProfile(seg_encoding=SegEncoding(encoding))
            seg = build_seg(result, profile)
            assert seg is not None
            encode_s, _ = _time(lambda r=result, p=profile: build_seg(r, p), repeats)
            full_s, full_cpu_s = full[encoding]
            rows.append(
                [
                    name,
                    encoding,
                    int(seg.NumberOfFrames),
                    f"{encode_s:.3f}",
                    f"{full_s:.3f}",
                    f"{full_cpu_s:.3f}",
                    f"{FULL_GOAL_S[name[:3]]:.1f}",
                    f"{_size(seg) / 1e6:.2f}",
                ]
            )
        if baseline and name.startswith("(b)"):
            for encoding, (wall, cpu) in baseline_times(baseline, max(1, repeats - 2)).items():
                rows.append([f"{name} at {baseline}", encoding, "", "", f"{wall:.3f}", f"{cpu:.3f}", "", ""])
    table(
        "SEG encode (highdicom) and full result build (SEG + SR + re-read + geometry QA + SR QA), median",
        ["case", "encoding", "frames", "SEG encode s", "SEG+SR+QA s", "SEG+SR+QA CPU s", "goal s", "SEG MB"],
        rows,
        "make bench  (or: [RADFED_BENCH_ENCODE_BASELINE=<rev>] .ci/isolated .venv/bin/python -m bench encode)",
    )


if __name__ == "__main__":
    pydicom.config.settings.writing_validation_mode = pydicom.config.WARN
    main()
