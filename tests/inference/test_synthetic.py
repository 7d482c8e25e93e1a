"""Synthetic studies: deterministic, valid DICOM, realistic contrast, non-IID across sites."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from radfed.inference.dicom.series import load_series_folder, volume_from_datasets
from radfed.inference.testing.synthetic.phantom import Tissue
from radfed.inference.testing.synthetic.sites import Sequence, site_profile
from radfed.inference.testing.synthetic.study import SyntheticStudy, render_study
from radfed.inference.testing.synthetic.writer import synthesize_to_folder
from radfed.plugin.commands.cli import main

DCIODVFY = shutil.which("dciodvfy") or str(Path(__file__).resolve().parents[2] / ".venv/bin/dciodvfy")


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, check=False, timeout=60)
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")]


def test_same_seed_same_study_other_seed_other_study() -> None:
    site = site_profile(1, small=True)
    a, b, c = render_study(site, 1, 3), render_study(site, 1, 3), render_study(site, 1, 4)
    assert a.identity == b.identity
    assert a.series[Sequence.T2W][5].PixelData == b.series[Sequence.T2W][5].PixelData
    assert a.identity.study_instance_uid != c.identity.study_instance_uid


@pytest.mark.validators
def test_every_object_passes_dciodvfy(tmp_path: Path) -> None:
    synthesize_to_folder(tmp_path, sites=3, studies_per_site=1, seed=2, small=True)
    files = sorted(tmp_path.rglob("*.dcm"))
    # All reference SEGs, and the first, middle and last instance of each series.
    picked = [f for f in files if f.parent.name == "SEG"]
    for series_dir in {f.parent for f in files if f.parent.name != "SEG"}:
        members = sorted(series_dir.glob("*.dcm"))
        picked += [members[0], members[len(members) // 2], members[-1]]
    assert len(picked) >= 3 * (1 + 9)
    failures = {str(p.relative_to(tmp_path)): dciodvfy_errors(p) for p in picked}
    assert {k: v for k, v in failures.items() if v} == {}


def test_folder_layout_labels_and_truth(tmp_path: Path) -> None:
    assert (
        main(
            [
                "synth",
                "--sites",
                "2",
                "--studies-per-site",
                "3",
                "--seed",
                "9",
                "--small",
                "-q",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    for site in ("site-1", "site-2"):
        with (tmp_path / site / "labels.csv").open() as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 3
        for number, row in enumerate(rows, start=1):
            study_dir = tmp_path / site / f"study-{number:04d}"
            assert {p.name for p in study_dir.iterdir()} == {"T2W", "ADC", "DWI", "SEG", "truth.json"}
            truth = json.loads((study_dir / "truth.json").read_text())
            assert truth["study_instance_uid"] == row["StudyInstanceUID"]
            assert int(row["grade_group"]) == max((les["grade_group"] for les in truth["lesions"]), default=0)
            assert row["clinically_significant"] == ("1" if int(row["grade_group"]) >= 2 else "0")
            t2 = pydicom.dcmread(next((study_dir / "T2W").iterdir()))
            assert t2.StudyInstanceUID == row["StudyInstanceUID"]
            assert t2.AccessionNumber == row["AccessionNumber"]
            assert t2.PatientName.family_name == "SYNTHETIC"
            seg = pydicom.dcmread(study_dir / "SEG" / "SEG-0001.dcm")
            assert seg.Modality == "SEG"
            assert len(seg.SegmentSequence) == 1 + len(truth["lesions"])
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == truth["series"]["t2w"]


def _mean_in(study: SyntheticStudy, sequence: Sequence, tissue: Tissue) -> float:
    volume = volume_from_datasets(study.series[sequence])
    s, r, c = np.meshgrid(*(np.arange(n) for n in volume.shape), indexing="ij")
    points = volume.index_to_lps(np.stack([s.ravel(), r.ravel(), c.ravel()], axis=1))
    labels = study.phantom.tissue_at(points)
    return float(volume.array.ravel()[labels == tissue].mean())


def test_lesions_have_their_contrast_in_each_sequence(small_study: SyntheticStudy) -> None:
    """Dark on T2W and ADC, bright on high-b DWI, relative to the peripheral zone."""
    for sequence, darker in ((Sequence.T2W, True), (Sequence.ADC, True), (Sequence.DWI, False)):
        lesion = _mean_in(small_study, sequence, Tissue.LESION)
        zone = _mean_in(small_study, sequence, Tissue.PERIPHERAL_ZONE)
        assert (lesion < 0.8 * zone) if darker else (lesion > 1.5 * zone), (sequence, lesion, zone)


def test_sites_differ_like_hospitals() -> None:
    profiles = [site_profile(i) for i in (1, 2, 3)]
    assert len({p.vendor.manufacturer for p in profiles}) == 3
    assert len({p.grids[Sequence.T2W].pixel_spacing for p in profiles}) >= 2
    descriptions = {p.vendor.naming[Sequence.T2W].description for p in profiles}
    assert len(descriptions) == 3
    # Intensity scale differs: the peripheral zone's T2W level differs by more than 20 % between sites.
    levels = [
        _mean_in(render_study(site_profile(i, small=True), 1, 0), Sequence.T2W, Tissue.PERIPHERAL_ZONE)
        for i in (1, 2, 3)
    ]
    assert max(levels) / min(levels) > 1.2


def test_reference_seg_is_on_the_t2w_grid(tmp_path: Path, small_study: SyntheticStudy) -> None:
    import highdicom as hd

    seg = hd.seg.Segmentation.from_dataset(small_study.reference_seg)
    t2 = volume_from_datasets(small_study.series[Sequence.T2W])
    source_uids = [uid for uid, _ in t2.slice_sources]
    for number in range(1, len(small_study.phantom.lesions) + 1):
        mask = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=source_uids,
            segment_numbers=[number + 1],
            ignore_spatial_locations=True,
            assert_missing_frames_are_empty=True,
        )[..., 0]
        np.testing.assert_array_equal(mask.astype(bool), small_study.lesion_masks == number)


@pytest.mark.parametrize("sequence", list(Sequence))
def test_written_series_load_back(tmp_path: Path, small_study: SyntheticStudy, sequence: Sequence) -> None:
    from radfed.inference.testing.synthetic.writer import write_study

    folder = write_study(small_study, tmp_path)
    volume = load_series_folder(folder / sequence.value.upper())
    assert volume.shape == volume_from_datasets(small_study.series[sequence]).shape
