"""Write synthetic studies to folders (one per study) or upload them to Orthanc."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.synthetic.sites import Sequence, SiteProfile, site_profile
from radfed.inference.testing.synthetic.study import SyntheticStudy, render_study

LABEL_COLUMNS = ("StudyInstanceUID", "AccessionNumber", "clinically_significant", "grade_group")
REFERENCE_SEG_FOLDER = "SEG"


def iter_site_studies(site: SiteProfile, count: int, seed: int) -> Iterator[SyntheticStudy]:
    for number in range(1, count + 1):
        yield render_study(site, number, seed)


def study_datasets(study: SyntheticStudy) -> Iterator[Dataset]:
    """Every instance of the study: the three series, then the reference SEG."""
    for sequence in Sequence:
        yield from study.series[sequence]
    yield study.reference_seg


def label_row(study: SyntheticStudy) -> dict[str, str]:
    return {
        "StudyInstanceUID": study.identity.study_instance_uid,
        "AccessionNumber": study.identity.accession_number,
        "clinically_significant": "1" if study.clinically_significant else "0",
        "grade_group": str(study.grade_group),
    }


def truth(study: SyntheticStudy) -> dict[str, object]:
    """What the generator knows (not a DICOM object; for evaluation and tests only)."""
    grid = study.t2w_grid
    lesions = []
    for number, lesion in enumerate(study.phantom.lesions, start=1):
        voxels = np.argwhere(study.lesion_masks == number)
        centroid = grid.index_to_lps(voxels.mean(axis=0)).tolist() if len(voxels) else None
        lesions.append(
            {
                "number": number,
                "grade_group": lesion.grade_group,
                "centre_lps": list(lesion.blob.centre),
                "t2w_voxels": len(voxels),
                "t2w_centroid_lps": centroid,
            }
        )
    return {
        "site": study.site.name,
        "study_instance_uid": study.identity.study_instance_uid,
        "oblique": study.oblique,
        "grade_group": study.grade_group,
        "lesions": lesions,
        "series": {seq.value: study.series[seq][0].SeriesInstanceUID for seq in Sequence},
    }


def write_study(study: SyntheticStudy, site_dir: Path) -> Path:
    folder = site_dir / study.folder_name
    for sequence in Sequence:
        series_dir = folder / sequence.value.upper()
        series_dir.mkdir(parents=True, exist_ok=True)
        for ds in study.series[sequence]:
            ds.save_as(series_dir / f"IM-{int(ds.InstanceNumber):04d}.dcm", enforce_file_format=True)
    seg_dir = folder / REFERENCE_SEG_FOLDER
    seg_dir.mkdir(parents=True, exist_ok=True)
    study.reference_seg.save_as(seg_dir / "SEG-0001.dcm", enforce_file_format=True)
    (folder / "truth.json").write_text(json.dumps(truth(study), indent=2))
    return folder


def write_labels(rows: list[dict[str, str]], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def synthesize_to_folder(
    out: Path, sites: int, studies_per_site: int, seed: int, *, small: bool = False, first_site: int = 1
) -> list[Path]:
    """Write ``out/site-<i>/study-<n>/`` folders and ``out/site-<i>/labels.csv`` for sites ``first_site`` ..
    (other first sites: other scanners, e.g. a public set that is not from the federation's hospitals);
    returns the site folders."""
    site_dirs = []
    for index in range(first_site, first_site + sites):
        site = site_profile(index, small=small)
        site_dir = out / site.name
        site_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for study in iter_site_studies(site, studies_per_site, seed):
            write_study(study, site_dir)
            rows.append(label_row(study))
        write_labels(rows, site_dir / "labels.csv")
        site_dirs.append(site_dir)
    return site_dirs


def upload_study(study: SyntheticStudy, client: OrthancClient) -> int:
    """Upload every instance of the study; returns how many Orthanc stored."""
    stored = 0
    for ds in study_datasets(study):
        answer = client.upload_dataset(ds)
        stored += answer.get("Status") in ("Success", "AlreadyStored")
    return stored
