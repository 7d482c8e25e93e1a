"""The node's Storage SCP with DCMTK as the sender (loopback only): who is let in, which SOP classes are
accepted, and what its log lines say; the ``[scp]`` settings as read from the node's TOML."""

from __future__ import annotations

import ipaddress
import logging
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EncapsulatedPDFStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RawDataStorage,
    RTPlanStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    generate_uid,
)

from radfed.inference.orthanc.client import OrthancClient, OrthancEndpoint
from radfed.inference.redaction import uid_digest
from radfed.inference.testing.orthanc_server import OrthancProcess, free_port
from radfed.plugin.node.config import ConfigError, ScpSettings, load_config
from radfed.plugin.node.scp import STORAGE_CONTEXTS, peer_allowed, start_storage_scp

ScpFactory = Callable[..., int]


@pytest.fixture
def scp(orthanc: OrthancProcess) -> Iterator[ScpFactory]:
    """Start the SCP in front of the test Orthanc with the given settings; the port it listens on."""
    servers = []

    def start(endpoint: object = None, **settings: object) -> int:
        port = free_port()
        client = OrthancClient(endpoint or orthanc.endpoint)  # type: ignore[arg-type]
        servers.append((start_storage_scp(client, ScpSettings(port=port, **settings)), client))  # type: ignore[arg-type]
        return port

    yield start
    for server, client in servers:
        server.shutdown()
        client.close()


def _instance(folder: Path, sop_class_uid: str, modality: str) -> tuple[Path, Dataset]:
    """A small DICOM file of this SOP class (an image where the class is one)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "SCP-TEST", "Test^Scp", modality
    if modality == "MR":
        ds.Rows = ds.Columns = 4
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = bytes(4 * 4 * 2)
    path = folder / f"{modality}-{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def _storescu(port: int, calling: str, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["storescu", "--required", "--aetitle", calling, "--call", "RADFED", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "radfed.plugin.node.scp" and r.levelno >= logging.WARNING
    ]


def test_allowed_calling_ae_and_peer_store_into_orthanc(
    scp: ScpFactory, orthanc_client: OrthancClient, tmp_path: Path
) -> None:
    port = scp(allowed_aets=frozenset({"MODALITY"}), allowed_peers=(ipaddress.ip_network("127.0.0.0/8"),))
    path, ds = _instance(tmp_path, MRImageStorage, "MR")
    sent = _storescu(port, "MODALITY", path)
    assert sent.returncode == 0, sent.stderr[-2000:]
    assert orthanc_client.find_instance(ds.SOPInstanceUID) is not None
    echo = subprocess.run(["echoscu", "--aetitle", "MODALITY", "--call", "RADFED", "127.0.0.1", str(port)], check=False)
    assert echo.returncode == 0


def test_calling_ae_outside_the_allow_list_is_rejected(
    scp: ScpFactory, orthanc_client: OrthancClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="radfed.plugin.node.scp")
    port = scp(allowed_aets=frozenset({"MODALITY"}))
    path, ds = _instance(tmp_path, MRImageStorage, "MR")
    sent = _storescu(port, "INTRUDER", path)
    assert sent.returncode != 0 and "Association Rejected" in sent.stderr + sent.stdout
    assert "Calling AE Title Not Recognized" in sent.stderr + sent.stdout
    assert orthanc_client.find_instance(ds.SOPInstanceUID) is None
    assert _warnings(caplog) == [
        "association refused (calling AE title not in scp.allowed_aets): calling AE INTRUDER, peer 127.0.0.1"
    ]


def test_peer_outside_the_allowed_networks_is_rejected(
    scp: ScpFactory, orthanc_client: OrthancClient, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="radfed.plugin.node.scp")
    port = scp(allowed_aets=frozenset({"MODALITY"}), allowed_peers=(ipaddress.ip_network("10.0.0.0/8"),))
    path, ds = _instance(tmp_path, MRImageStorage, "MR")
    sent = _storescu(port, "MODALITY", path)
    assert sent.returncode != 0 and "Association Rejected" in sent.stderr + sent.stdout
    assert orthanc_client.find_instance(ds.SOPInstanceUID) is None
    assert _warnings(caplog) == [
        "association refused (peer not in scp.allowed_peers): calling AE MODALITY, peer 127.0.0.1"
    ]


@pytest.mark.parametrize(
    ("sop_class", "name"), [(RTPlanStorage, "RT Plan Storage"), (RawDataStorage, "Raw Data Storage")]
)
def test_storage_classes_the_node_does_not_use_are_refused(
    scp: ScpFactory,
    orthanc_client: OrthancClient,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    sop_class: str,
    name: str,
) -> None:
    caplog.set_level(logging.WARNING, logger="radfed.plugin.node.scp")
    port = scp()
    path, ds = _instance(tmp_path, sop_class, "OT")
    sent = _storescu(port, "MODALITY", path)
    assert sent.returncode != 0 and "No Acceptable Presentation Contexts" in sent.stderr, sent.stderr[-2000:]
    assert orthanc_client.find_instance(ds.SOPInstanceUID) is None
    (line,) = _warnings(caplog)
    assert line == (
        f"association from calling AE MODALITY, peer 127.0.0.1: refused SOP classes [{name}] "
        "(only image, SEG, SR and Secondary Capture storage)"
    )


def test_accepted_sop_classes() -> None:
    accepted = {str(cx.abstract_syntax) for cx in STORAGE_CONTEXTS}
    assert {MRImageStorage, SegmentationStorage, SecondaryCaptureImageStorage} <= accepted
    assert {BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage, Comprehensive3DSRStorage} <= accepted
    assert not {RTPlanStorage, RawDataStorage, EncapsulatedPDFStorage} & accepted


def test_peer_allowed() -> None:
    networks = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))
    assert peer_allowed("10.1.2.3", networks) and peer_allowed("::ffff:10.1.2.3", networks)
    assert peer_allowed("fd00::1%eth0", networks)
    assert not peer_allowed("127.0.0.1", networks) and not peer_allowed("not-an-address", networks)
    assert peer_allowed("192.0.2.1", ())


def test_a_store_that_fails_logs_no_uid(scp: ScpFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="radfed.plugin.node.scp")
    port = scp(OrthancEndpoint(f"http://127.0.0.1:{free_port()}"))  # nobody listens: Orthanc unreachable
    path, ds = _instance(tmp_path, MRImageStorage, "MR")
    _storescu(port, "MODALITY", path)
    (line,) = _warnings(caplog)
    assert line == (
        f"C-STORE of instance {uid_digest(ds.SOPInstanceUID)} from MODALITY not forwarded to Orthanc: "
        "OrthancUnavailableError"
    )


# -- the [scp] settings ------------------------------------------------------------------------------------------


def _load(tmp_path: Path, table: str) -> ScpSettings | None:
    path = tmp_path / "node.toml"
    path.write_text("[api]\ntoken = 't'\n\n[scp]\n" + table)
    return load_config(path, environ={}).scp


def test_scp_defaults(tmp_path: Path) -> None:
    assert _load(tmp_path, "enabled = false\nport = 11112\n") is None
    assert _load(tmp_path, "enabled = true\nport = 11112\n") == ScpSettings(port=11112)  # loopback, anyone


def test_scp_settings_are_read(tmp_path: Path) -> None:
    settings = _load(
        tmp_path,
        'enabled = true\nport = 104\naet = "NODE"\nhost = "0.0.0.0"\n'
        'allowed_aets = ["PACS", "CT1 "]\nallowed_peers = ["10.0.0.0/8", "192.168.1.20", "fd00::/8"]\n',
    )
    assert settings == ScpSettings(
        port=104,
        ae_title="NODE",
        host="0.0.0.0",
        allowed_aets=frozenset({"PACS", "CT1"}),
        allowed_peers=tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "192.168.1.20/32", "fd00::/8")),
    )


@pytest.mark.parametrize(
    ("table", "setting"),
    [
        ("enabled = true\n", "scp.port"),
        ("enabled = true\nport = 70000\n", "scp.port"),
        ('enabled = "yes"\nport = 104\n', "scp.enabled"),
        ('enabled = true\nport = 104\nhost = "pacs.example.org"\n', "scp.host"),
        ('enabled = true\nport = 104\naet = "A-TITLE-LONGER-THAN-16"\n', "scp.aet"),
        ('enabled = true\nport = 104\nallowed_aets = "PACS"\n', "scp.allowed_aets"),
        ('enabled = true\nport = 104\nallowed_aets = ["PACS", ""]\n', "scp.allowed_aets"),
        ('enabled = true\nport = 104\nallowed_aets = ["BACK\\\\SLASH"]\n', "scp.allowed_aets"),
        ('enabled = true\nport = 104\nallowed_peers = ["10.0.0.1/8"]\n', "scp.allowed_peers"),
        ('enabled = true\nport = 104\nallowed_peers = ["pacs.example.org"]\n', "scp.allowed_peers"),
        ("enabled = true\nport = 104\nallowed_peers = [10]\n", "scp.allowed_peers"),
    ],
)
def test_invalid_scp_settings_name_the_setting(tmp_path: Path, table: str, setting: str) -> None:
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        _load(tmp_path, table)
