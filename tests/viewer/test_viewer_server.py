"""The viewer server on its own, against a real Orthanc: OHIF's files, radfed's configuration, client-side
routes; who gets in (the printed link's token, exchanged for a session cookie; the Host header); and the
same-origin proxy (credentials added by the proxy, only DICOMweb resources forwarded, answers streamed).

Orthanc sits behind a recording TCP relay, so a test can tell what reached it. Paths that ``requests`` would
normalise are sent with ``http.client``."""

from __future__ import annotations

import copy
import http.client
import json
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

import numpy as np
import pytest
import requests
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.testing.orthanc_server import OrthancProcess, start_orthanc
from radfed.inference.testing.synthetic.sites import Sequence
from radfed.inference.testing.synthetic.study import SyntheticStudy
from radfed.plugin.tools.viewer import OrthancTarget, ViewerServer, app_config_js, default_dist, serving

pytestmark = pytest.mark.orthanc

ROOT = Path(__file__).resolve().parents[2]
KEYS = (
    "disableConfirmationPrompts: true",
    "measurementTrackingMode: 'simplified'",
    "omitQuotationForMultipartRequest: true",
    "imageRendering: 'wadors'",
    "qidoSupportsIncludeField: false",
)
FRAMES = "multipart/related; type=application/octet-stream; transfer-syntax=*"
INSTANCES = 'multipart/related; type="application/dicom"'


class RecordingRelay:
    """A loopback TCP relay in front of Orthanc that keeps every byte the viewer sent through it."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.sent = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._pipe, args=(client,), daemon=True).start()

    def _pipe(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream_port)) as upstream:
            threading.Thread(target=self._copy, args=(upstream, client, False), daemon=True).start()
            self._copy(client, upstream, True)

    def _copy(self, source: socket.socket, sink: socket.socket, record: bool) -> None:
        try:
            while data := source.recv(65536):
                if record:
                    with self.lock:
                        self.sent += data
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            return

    def request_targets(self) -> list[str]:
        with self.lock:
            return re.findall(r"^GET (\S+) HTTP/1\.1\r$", self.sent.decode("latin-1"), flags=re.MULTILINE)

    def clear(self) -> None:
        with self.lock:
            self.sent.clear()

    def close(self) -> None:
        self.listener.close()


@dataclass(frozen=True)
class Pacs:
    orthanc: OrthancProcess
    relay: RecordingRelay
    viewer: ViewerServer
    cookie: str  # name=value, as the login link set it
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str  # the large instance
    large_series_instance_uid: str


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Message
    body: bytes


def large_instance(template: Dataset, rows: int = 2048, columns: int = 2048) -> Dataset:
    """One 8 MiB image in its own series of the same study (research test data, UIDs minted here)."""
    ds = copy.deepcopy(template)
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesNumber = 901
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.random.default_rng(5).integers(0, 4096, (rows, columns), dtype=np.uint16).tobytes()
    return ds


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, small_study: SyntheticStudy) -> Iterator[Pacs]:
    orthanc = start_orthanc(tmp_path_factory.mktemp("viewer-orthanc"))
    relay = RecordingRelay(orthanc.http_port)
    target = OrthancTarget(f"http://127.0.0.1:{relay.port}", orthanc.options.username, orthanc.options.password)
    t2w = small_study.series[Sequence.T2W]
    big = large_instance(t2w[0])
    with OrthancClient(orthanc.endpoint) as client:
        for ds in [*t2w, big]:
            client.upload_dataset(ds)
    try:
        with serving(default_dist(ROOT), target) as viewer:
            login = get(viewer, viewer.url.removeprefix(viewer.origin), cookie=None)
            assert login.status == 303, login.body
            cookie = login.headers["Set-Cookie"].split(";")[0]
            relay.clear()
            yield Pacs(
                orthanc, relay, viewer, cookie, small_study.identity.study_instance_uid,
                str(t2w[0].SeriesInstanceUID), str(big.SOPInstanceUID), str(big.SeriesInstanceUID),
            )  # fmt: skip
    finally:
        relay.close()
        orthanc.stop()


@pytest.fixture
def relay(pacs: Pacs) -> RecordingRelay:
    pacs.relay.clear()
    return pacs.relay


def get(
    viewer: ViewerServer,
    target: str,
    *,
    cookie: str | None,
    host: str | None = None,
    headers: dict[str, str] | None = None,
    version: str = "HTTP/1.1",
) -> Answer:
    """One GET with the request target exactly as given (no normalisation, no automatic headers)."""
    port = viewer.server.server_address[1]
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    if version == "HTTP/1.0":
        connection._http_vsn_str = version  # type: ignore[attr-defined]  # http.client has no public switch
    try:
        connection.putrequest("GET", target, skip_host=True, skip_accept_encoding=True)
        connection.putheader("Host", f"127.0.0.1:{port}" if host is None else host)
        if cookie:
            connection.putheader("Cookie", cookie)
        for key, value in (headers or {}).items():
            connection.putheader(key, value)
        connection.endheaders()
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


def orthanc_get(orthanc: OrthancProcess, path: str, accept: str | None = None) -> requests.Response:
    headers = {"Accept": accept} if accept else {}
    auth = (orthanc.options.username, orthanc.options.password)
    answer = requests.get(orthanc.url + path, headers=headers, auth=auth, timeout=60)
    answer.raise_for_status()
    return answer


def parts(content_type: str, body: bytes) -> list[bytes]:
    """The payloads of a multipart/related answer (Orthanc picks a new boundary for each answer)."""
    header = Message()
    header["Content-Type"] = content_type
    boundary = b"--" + str(header.get_param("boundary")).encode()
    sections = body.split(b"\r\n" + boundary)  # the first boundary has no CRLF before it
    assert sections[0].startswith(boundary) and sections[-1].startswith(b"--"), "not a closed multipart body"
    return [section.partition(b"\r\n\r\n")[2] for section in sections[:-1]]


# -- OHIF's files and radfed's configuration ----------------------------------------------------------------


def test_routes_config_and_proxy(pacs: Pacs) -> None:
    viewer = pacs.viewer
    with requests.Session() as browser:
        index = browser.get(viewer.url, timeout=10)  # the token buys a cookie, then the redirect lands on /
        assert index.status_code == 200 and "<html" in index.text.lower()
        assert index.url == viewer.origin + "/"
        route = browser.get(viewer.study_url("1.2.3"), timeout=10)  # a client-side route: index.html
        assert route.text == index.text and route.url == viewer.origin + "/viewer?StudyInstanceUIDs=1.2.3"
        config = browser.get(viewer.origin + "/app-config.js", timeout=10)
        assert config.headers["Content-Type"] == "application/javascript"
        assert all(key in config.text for key in KEYS)
        wasm = next(p.name for p in default_dist(ROOT).glob("*.wasm"))
        assert browser.get(f"{viewer.origin}/{wasm}", timeout=10).headers["Content-Type"] == "application/wasm"
        studies = browser.get(viewer.origin + "/dicom-web/studies", timeout=10)  # no credentials from us
        assert studies.status_code == 200, studies.text[:300]
    escape = get(viewer, "/../../../../etc/passwd", cookie=pacs.cookie)
    assert b"root:" not in escape.body


def test_the_admins_config_has_what_radfed_needs() -> None:
    shipped = (ROOT / "deploy" / "ohif" / "app-config.js").read_text()
    for key in KEYS:
        assert re.sub(r"\s+", " ", key) in re.sub(r"\s+", " ", shipped), key
    assert all(key in app_config_js() for key in KEYS)


# -- who gets in ----------------------------------------------------------------------------------------------


def test_the_link_sets_a_strict_httponly_cookie_and_drops_the_token(pacs: Pacs) -> None:
    link = pacs.viewer.study_url("1.2.3").removeprefix(pacs.viewer.origin)
    assert "token=" in link
    answer = get(pacs.viewer, link, cookie=None)
    assert answer.status == 303
    assert answer.headers["Location"] == "/viewer?StudyInstanceUIDs=1.2.3"
    attributes = [a.strip() for a in answer.headers["Set-Cookie"].split(";")]
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attributes[1:])
    assert attributes[0] == pacs.cookie  # one session for the whole server
    assert get(pacs.viewer, "/viewer?StudyInstanceUIDs=1.2.3", cookie=pacs.cookie).status == 200


def test_the_link_never_redirects_off_the_viewer(pacs: Pacs) -> None:
    token = pacs.viewer.url.partition("token=")[2]
    answer = get(pacs.viewer, f"//evil.example/?token={token}", cookie=None)
    assert answer.status == 303 and answer.headers["Location"] == "/evil.example/"


@pytest.mark.parametrize(
    "target", ["/", "/index.html", "/app-config.js", "/viewer?StudyInstanceUIDs=1.2.3", "/dicom-web/studies"]
)
@pytest.mark.parametrize("cookie", [None, "forged", "wrong-port"])
def test_without_a_session_everything_is_401(
    pacs: Pacs, relay: RecordingRelay, target: str, cookie: str | None
) -> None:
    name, _, value = pacs.cookie.partition("=")
    sent = {None: None, "forged": f"{name}={'A' * len(value)}", "wrong-port": f"radfed_viewer_1={value}"}[cookie]
    answer = get(pacs.viewer, target, cookie=sent)
    assert answer.status == 401 and answer.body.startswith(b"radfed viewer:")
    assert relay.request_targets() == []


def test_a_wrong_token_is_401(pacs: Pacs, relay: RecordingRelay) -> None:
    for target in ("/?token=wrong", "/?token=", "/dicom-web/studies?token=x"):
        answer = get(pacs.viewer, target, cookie=pacs.cookie)
        assert answer.status == 401 and "Set-Cookie" not in answer.headers, target
    assert relay.request_targets() == []


@pytest.mark.parametrize(
    "host", ["evil.example:{port}", "evil.example", "127.0.0.1:1", "localhost", "127.0.0.1.nip.io:{port}", ""]
)
def test_a_foreign_host_header_is_refused(pacs: Pacs, relay: RecordingRelay, host: str) -> None:
    port = pacs.viewer.server.server_address[1]
    for target in ("/", "/dicom-web/studies", pacs.viewer.url.removeprefix(pacs.viewer.origin)):
        answer = get(pacs.viewer, target, cookie=pacs.cookie, host=host.format(port=port))
        assert answer.status == 421 and "Set-Cookie" not in answer.headers, target
    assert relay.request_targets() == []


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "LOCALHOST:{port}", "[::1]:{port}"])
def test_the_loopback_names_are_accepted(pacs: Pacs, host: str) -> None:
    port = pacs.viewer.server.server_address[1]
    assert get(pacs.viewer, "/app-config.js", cookie=pacs.cookie, host=host.format(port=port)).status == 200


# -- the proxy: only DICOMweb resources -------------------------------------------------------------------------

ESCAPES = [
    "/dicom-web/../system",
    "/dicom-web/./../system",
    "/dicom-web/%2e%2e/system",
    "/dicom-web/%2E%2E/changes",
    "/dicom-web/.%2e/system",
    "/dicom-web/..%2fsystem",
    "/dicom-web/..%2Fsystem",
    "/dicom-web/..%5csystem",
    "/dicom-web/..\\system",
    "/dicom-web/studies/..%2f..%2fsystem",
    "/dicom-web/studies/../../system",
    "/dicom-web/studies/%2e%2e/%2e%2e/patients",
    "/dicom-web/studies%2f..%2f..%2fsystem",
    "/dicom-web/%252e%252e/system",
    "/dicom-web/studies/%252e%252e%252f%252e%252e%252fsystem",
    "/dicom-web/studies/%25252e%25252e/system",
    "/dicom-web//system",
    "/dicom-web/studies//",
    "/dicom-web/studies/",
    "/dicom-web/",
    "/dicom-web",
    "/dicom-web%2f..%2fsystem",
    "/dicom-web/system",
    "/dicom-web/servers",
    "/dicom-web/studies/1.2%00/series",
    "/dicom-web/studies/1.2;x=../../system",
    "/dicom-web/studies/...",
]


@pytest.mark.parametrize("target", ESCAPES)
def test_paths_outside_dicomweb_never_reach_orthanc(pacs: Pacs, relay: RecordingRelay, target: str) -> None:
    answer = get(pacs.viewer, target, cookie=pacs.cookie)
    assert answer.status in (400, 404), (answer.status, answer.body[:200])
    assert answer.body.startswith(b"radfed viewer:")
    assert relay.request_targets() == []


def test_qido_and_wado_rs_metadata_and_frames_pass_through(pacs: Pacs, relay: RecordingRelay) -> None:
    study, series = pacs.study_instance_uid, pacs.series_instance_uid
    query = f"StudyInstanceUID={study}&limit=101&offset=0&fuzzymatching=false&includefield=00081030%2C00080060"
    found = get(pacs.viewer, f"/dicom-web/studies?{query}", cookie=pacs.cookie)
    assert found.status == 200
    assert [s["0020000D"]["Value"] for s in json.loads(found.body)] == [[study]]
    assert relay.request_targets() == [f"/dicom-web/studies?{query}"]  # the query as OHIF wrote it
    in_study = get(pacs.viewer, f"/dicom-web/studies/{study}/series", cookie=pacs.cookie)
    assert {s["0020000E"]["Value"][0] for s in json.loads(in_study.body)} >= {series}
    path = f"/dicom-web/studies/{study}/series/{series}/metadata"
    metadata = get(pacs.viewer, path, cookie=pacs.cookie)
    # Orthanc writes bulk data links with the Host it was asked on (here the relay's)
    relayed = metadata.body.replace(
        f"127.0.0.1:{pacs.relay.port}".encode(), f"127.0.0.1:{pacs.orthanc.http_port}".encode()
    )
    assert json.loads(relayed) == orthanc_get(pacs.orthanc, path).json()
    sop = json.loads(metadata.body)[0]["00080018"]["Value"][0]
    path = f"/dicom-web/studies/{study}/series/{series}/instances/{sop}/frames/1"
    frame = get(pacs.viewer, path, cookie=pacs.cookie, headers={"Accept": FRAMES})
    assert frame.status == 200 and frame.headers["Content-Type"].startswith("multipart/related")
    direct = orthanc_get(pacs.orthanc, path, FRAMES)
    assert parts(frame.headers["Content-Type"], frame.body) == parts(direct.headers["Content-Type"], direct.content)
    # OHIF resolves bulk data links from "studies/" on against its wadoRoot (relativeResolution: 'studies')
    link = json.loads(metadata.body)[0]["7FE00010"]["BulkDataURI"]
    path = "/dicom-web/" + link[link.index("studies/") :]
    bulk = get(pacs.viewer, path, cookie=pacs.cookie, headers={"Accept": FRAMES})
    assert bulk.status == 200 and path.endswith("/bulk/7fe00010")
    direct = orthanc_get(pacs.orthanc, path, FRAMES)
    assert parts(bulk.headers["Content-Type"], bulk.body) == parts(direct.headers["Content-Type"], direct.content)


LARGE = [("instance", "HTTP/1.1"), ("instance", "HTTP/1.0"), ("study", "HTTP/1.1"), ("study", "HTTP/1.0")]


@pytest.mark.parametrize(("resource", "version"), LARGE, ids=[f"{r}-{v}" for r, v in LARGE])
def test_a_large_instance_streams_unchanged(pacs: Pacs, resource: str, version: str) -> None:
    """Orthanc sizes a one-instance answer (Content-Length is passed on) but not a many-instance one (chunked
    to an HTTP/1.1 client, to the end of the connection for HTTP/1.0)."""
    path = f"/dicom-web/studies/{pacs.study_instance_uid}"
    if resource == "instance":
        path += f"/series/{pacs.large_series_instance_uid}/instances/{pacs.sop_instance_uid}"
    answer = get(pacs.viewer, path, cookie=pacs.cookie, headers={"Accept": INSTANCES}, version=version)
    assert answer.status == 200
    with OrthancClient(pacs.orthanc.endpoint) as client:
        large = client.find_instance(pacs.sop_instance_uid)
        study = client.find_study(pacs.study_instance_uid)
        assert large is not None and study is not None
        ids = [large] if resource == "instance" else [i["ID"] for i in client.get_json(f"/studies/{study}/instances")]
        stored = [client.instance_bytes(i) for i in ids]
    assert max(len(blob) for blob in stored) > 8 * 2**20
    assert sorted(parts(answer.headers["Content-Type"], answer.body)) == sorted(stored)
    length, encoding = answer.headers.get("Content-Length"), answer.headers.get("Transfer-Encoding")
    if resource == "instance":
        assert (length, encoding) == (str(len(answer.body)), None)
    elif version == "HTTP/1.1":
        assert (length, encoding) == (None, "chunked")
    else:
        assert (length, encoding, answer.headers.get("Connection")) == (None, None, "close")
