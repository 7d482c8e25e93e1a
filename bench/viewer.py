"""Results stored in Orthanc -> overlay visible in OHIF: the time a radiologist waits once radfed has
stored a SEG, opening the study in the real OHIF v3 (headless Debian Chromium) and loading the SEG.

    python -m bench viewer
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.report import table
from radfed.dicom_sr.outputs import build_results
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.orthanc_server import start_orthanc
from radfed.inference.testing.synthetic.sites import Sequence, site_profile
from radfed.inference.testing.synthetic.study import render_study
from radfed.plugin.tools.viewer import OrthancTarget, ViewerServer, default_dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.dicom_sr.conftest import result_from_study  # noqa: E402 - the test suite's result builder
from tests.viewer.ohif_driver import chromium_page  # noqa: E402

STUDIES = 5


def coloured(pixels: np.ndarray) -> bool:
    """Some canvas pixel carries a segment colour (the MR image itself is grey)."""
    return bool((np.abs(pixels[..., 0] - pixels[..., 1]) > 0.25).sum() > 20)


def main() -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        orthanc = start_orthanc(Path(tmp) / "orthanc")
        target = OrthancTarget(orthanc.url, orthanc.options.username, orthanc.options.password)
        server = ViewerServer(default_dist(ROOT), target).start()
        try:
            for number in range(1, STUDIES + 1):
                study = render_study(site_profile(2, small=False), 300 + number, 7, n_lesions=2)
                with OrthancClient(orthanc.endpoint) as client:
                    for sequence in Sequence:
                        for ds in study.series[sequence]:
                            client.upload_dataset(ds)
                    for ds in build_results(result_from_study(study)).datasets():
                        client.upload_dataset(ds)
                with chromium_page() as viewer:
                    stored = time.perf_counter()  # the SEG and SR are in Orthanc now
                    viewer.open_study(server.study_url(study.identity.study_instance_uid))
                    first_image = time.perf_counter() - stored
                    thumbnail = viewer.page.locator("[data-cy^='study-browser-thumbnail']").filter(has_text="SEG\n")
                    thumbnail.first.dblclick()
                    viewer.page.wait_for_function(
                        "() => window.services.segmentationService.getSegmentations().length > 0"
                    )
                    loaded = time.perf_counter() - stored
                    while not coloured(viewer.canvas_pixels()):  # the grey image has r == g == b
                        time.sleep(0.05)
                    visible = time.perf_counter() - stored
                rows.append((first_image, loaded, visible))
        finally:
            server.stop()
            orthanc.stop()
    medians = np.median(np.array(rows), axis=0)
    table(
        f"Stored in Orthanc -> visible in OHIF 3.13.2 (headless Chromium, software WebGL; {STUDIES} full-size studies)",
        ["study", "first image s", "SEG loaded s", "overlay visible s"],
        [[i + 1, *(f"{v:.2f}" for v in r)] for i, r in enumerate(rows)] + [["median", *(f"{v:.2f}" for v in medians)]],
        "python -m bench viewer",
    )
    print(f"median stored -> overlay visible: {statistics.median(r[2] for r in rows):.2f} s")


if __name__ == "__main__":
    main()
