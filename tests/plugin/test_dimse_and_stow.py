"""DICOM networking with real peers: DCMTK storescu pushes a study into the node's Storage SCP, and the
results come back by C-STORE to DCMTK storescp (standing in for a PACS that is not Orthanc); and results
written through DICOMweb STOW-RS."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.orthanc_server import OrthancProcess, free_port
from radfed.inference.testing.synthetic.sites import site_profile
from radfed.inference.testing.synthetic.study import render_study
from radfed.inference.testing.synthetic.writer import upload_study, write_study
from tests.plugin.node_harness import NodeProcess, wait_until


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    binary = shutil.which("storescp")
    assert binary is not None, "DCMTK storescp not installed (make install adds dcmtk)"
    port, out = free_port(), tmp_path / "other-pacs"
    out.mkdir()
    process = subprocess.Popen(
        [binary, "--promiscuous", "--aetitle", "OTHERPACS", "--output-directory", str(out), str(port)]
    )
    try:
        yield port, out
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_storage_scp_in_cstore_out(
    tmp_path: Path, orthanc: OrthancProcess, tiny_artifact: Path, storescp: tuple[int, Path]
) -> None:
    pacs_port, received = storescp
    scp_port = free_port()
    node = NodeProcess(
        tmp_path / "node", orthanc, tiny_artifact,
        extra=f"""
[output]
destination = "cstore"

[output.cstore]
host = "127.0.0.1"
port = {pacs_port}
called_aet = "OTHERPACS"

[scp]
enabled = true
port = {scp_port}
aet = "RADFED"
""",
    )  # fmt: skip
    node.start()
    try:
        study = render_study(site_profile(1, small=True), 2, 14, n_lesions=1)
        folder = write_study(study, tmp_path / "outgoing")
        (folder / "truth.json").unlink()  # storescu sends every file of the folder
        pushed = subprocess.run(
            ["storescu", "--required", "--aetitle", "OTHERPACS", "--call", "RADFED", "+sd", "+r",
             "127.0.0.1", str(scp_port), str(folder)],
            capture_output=True, text=True, check=False, timeout=120,
        )  # fmt: skip
        assert pushed.returncode == 0, pushed.stderr[-2000:]
        wait_until(
            lambda: bool(node.jobs("done")) or bool(node.jobs("failed")), 120, "the pushed study's job", node.log_tail
        )
        job = node.jobs()[0]
        assert job["state"] == "done", job["reason"]
        expected = {job["result"]["sr_sop_instance_uid"]: "SR"}
        if job["result"]["lesions"]:  # a tiny model may find nothing; then there is no SEG
            expected[job["result"]["seg_sop_instance_uid"]] = "SEG"
        wait_until(lambda: len(list(received.iterdir())) >= len(expected), 30, "results at the other PACS")
        back = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p).Modality for p in received.iterdir()}
        assert back == expected
        with OrthancClient(orthanc.endpoint) as client:
            assert client.find_study(study.identity.study_instance_uid) is not None  # ingested through the SCP
    finally:
        node.stop()


def test_stow_rs_destination(
    tmp_path: Path, orthanc: OrthancProcess, orthanc_client: OrthancClient, tiny_artifact: Path
) -> None:
    node = NodeProcess(tmp_path / "node", orthanc, tiny_artifact, extra='[output]\ndestination = "dicomweb"\n')
    node.start()
    try:
        study = render_study(site_profile(2, small=True), 3, 15, n_lesions=1)
        upload_study(study, orthanc_client)
        wait_until(lambda: bool(node.jobs("done")) or bool(node.jobs("failed")), 120, "the job", node.log_tail)
        job = node.jobs()[0]
        assert job["state"] == "done", job["reason"]
        assert orthanc_client.find_instance(job["result"]["sr_sop_instance_uid"]) is not None
        if job["result"]["lesions"]:
            assert orthanc_client.find_instance(job["result"]["seg_sop_instance_uid"]) is not None
    finally:
        node.stop()


def test_cstore_store_sends_seg_and_sr(storescp: tuple[int, Path]) -> None:
    """radfed's C-STORE SCU delivers a BINARY SEG and its SR to a DCMTK peer, byte-for-byte readable."""
    from radfed.dicom_sr.outputs import build_results
    from radfed.plugin.node.config import CStoreTarget
    from radfed.plugin.node.writeback import CStoreStore
    from tests.dicom_sr.conftest import result_from_study

    port, received = storescp
    study = render_study(site_profile(2, small=True), 4, 16, n_lesions=2)
    objects = build_results(result_from_study(study))
    assert objects.seg is not None
    CStoreStore(CStoreTarget("127.0.0.1", port, "OTHERPACS")).store(list(objects.datasets()))
    wait_until(lambda: len(list(received.iterdir())) == 2, 30, "two objects at the peer")
    got = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in received.iterdir()}
    assert got[objects.seg.SOPInstanceUID].NumberOfFrames == objects.seg.NumberOfFrames
    assert got[objects.sr.SOPInstanceUID].Modality == "SR"
