"""Seconds to fetch one 3-series mp-MRI study (3 x 24 x 256 x 256) from a real Orthanc and load it as
aligned arrays (ADC and DWI resampled onto the T2W grid), with MB/s of DICOM transferred."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench.report import table
from radfed.inference.dicom.resample import resample_to
from radfed.inference.dicom.series import volume_from_datasets
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.orthanc_server import OrthancOptions, start_orthanc
from radfed.inference.testing.synthetic.sites import Sequence, site_profile
from radfed.inference.testing.synthetic.study import render_study
from radfed.inference.testing.synthetic.writer import upload_study

REPEATS = 7


def main() -> None:
    study = render_study(site_profile(1), 1, seed=0)
    assert study.series[Sequence.T2W][0].Rows == 256 and len(study.series[Sequence.T2W]) == 24
    with tempfile.TemporaryDirectory() as tmp:
        orthanc = start_orthanc(Path(tmp) / "bench", OrthancOptions(name="bench"))
        try:
            with OrthancClient(orthanc.endpoint) as client:
                upload_study(study, client)
                study_id = client.find_study(study.identity.study_instance_uid)
                assert study_id is not None
                series_ids = [
                    sid for sid in client.study(study_id)["Series"]
                    if client.series(sid)["MainDicomTags"].get("Modality") == "MR"
                ]  # fmt: skip
                fetch_s, load_s, total_bytes = [], [], 0
                for _ in range(REPEATS):
                    t0 = time.perf_counter()
                    per_series = []
                    total_bytes = 0
                    for sid in series_ids:
                        ids = client.series_instance_ids(sid)
                        per_series.append(client.instance_datasets(ids))
                    t1 = time.perf_counter()
                    volumes = [volume_from_datasets(datasets) for datasets in per_series]
                    reference = max(volumes, key=lambda v: v.array.size)
                    aligned = [resample_to(v, reference) for v in volumes]
                    t2 = time.perf_counter()
                    assert all(a.shape == reference.shape for a in aligned)
                    total_bytes = sum(len(ds.PixelData) for datasets in per_series for ds in datasets)
                    fetch_s.append(t1 - t0)
                    load_s.append(t2 - t1)
        finally:
            orthanc.stop()
    fetch, load = statistics.median(fetch_s), statistics.median(load_s)
    mb = total_bytes / 1e6
    rows = [
        ["fetch (REST, 4 parallel GETs)", f"{fetch:.3f}", f"{mb / fetch:.1f}"],
        ["load + align (3 volumes)", f"{load:.3f}", f"{mb / load:.1f}"],
        ["total", f"{fetch + load:.3f}", f"{mb / (fetch + load):.1f}"],
    ]
    table(
        f"fetch one study 3 x 24 x 256 x 256 ({mb:.1f} MB pixel data), median of {REPEATS}",
        ["stage", "seconds", "MB/s"],
        rows,
        "make bench  (or: .ci/isolated .venv/bin/python -m bench fetch)",
    )
