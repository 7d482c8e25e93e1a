"""``radfed viewer``: the OHIF v3 viewer for one Orthanc, served on 127.0.0.1 from one origin.

OHIF is the prebuilt ``dist/`` of npm's ``@ohif/app`` (fetched by deploy/ohif/fetch-ohif.sh, never
committed). Orthanc 1.10 sends no CORS headers, so the viewer, its configuration and a proxy of Orthanc's
``/dicom-web`` share one origin; the proxy adds Orthanc's credentials, which never reach the browser.
The configuration is the one deploy/ohif/app-config.js gives PACS admins: radfed's SEG loads without a
prompt and its SR opens without the tracking prompt."""

from __future__ import annotations

import mimetypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

OHIF_VERSION = "3.13.2"
PROXY_PREFIX = "/dicom-web"
_FORWARDED_HEADERS = ("Accept", "Content-Type", "Range")
_RETURNED_HEADERS = ("Content-Type", "Content-Length", "Content-Disposition", "ETag", "Last-Modified")


def default_dist(root: Path | None = None) -> Path:
    return (root or Path.cwd()) / ".cache" / "ohif" / OHIF_VERSION / "dist"


def app_config_js(title: str = "radfed") -> str:
    """OHIF's window.config: one DICOMweb source on this origin's proxy (see ../shared notes on each key)."""
    return f"""window.config = {{
  name: 'radfed',
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  disableConfirmationPrompts: true,
  measurementTrackingMode: 'simplified',
  maxNumberOfWebWorkers: 2,
  whiteLabeling: {{}},
  defaultDataSourceName: 'radfed',
  dataSources: [{{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'radfed',
    configuration: {{
      friendlyName: {title!r},
      name: 'radfed',
      wadoUriRoot: '{PROXY_PREFIX}',
      qidoRoot: '{PROXY_PREFIX}',
      wadoRoot: '{PROXY_PREFIX}',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      omitQuotationForMultipartRequest: true,
      bulkDataURI: {{ enabled: true, relativeResolution: 'studies' }},
    }},
  }}],
}};
"""


@dataclass(frozen=True)
class OrthancTarget:
    url: str  # http://host:port (its /dicom-web is proxied)
    username: str | None = None
    password: str | None = None


def _handler(dist: Path, target: OrthancTarget, config_js: bytes) -> type[BaseHTTPRequestHandler]:
    import requests

    session = requests.Session()
    if target.username:
        session.auth = (target.username, target.password or "")
    root = dist.resolve()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            return  # quiet: request paths name studies

        def _send(self, status: int, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _proxy(self) -> None:
            upstream = target.url.rstrip("/") + "/dicom-web" + self.path[len(PROXY_PREFIX) :]
            headers = {k: v for k in _FORWARDED_HEADERS if (v := self.headers.get(k))}
            try:
                answer = session.get(upstream, headers=headers, timeout=60)
            except requests.RequestException as exc:
                self._send(502, f"Orthanc unreachable: {type(exc).__name__}".encode(), "text/plain")
                return
            returned = {
                k: answer.headers[k] for k in _RETURNED_HEADERS if k in answer.headers and k != "Content-Length"
            }
            content_type = returned.pop("Content-Type", "application/octet-stream")
            self._send(answer.status_code, answer.content, content_type, returned)

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path.startswith(PROXY_PREFIX + "/") or path == PROXY_PREFIX:
                self._proxy()
                return
            if path == "/app-config.js":
                self._send(200, config_js, "application/javascript")
                return
            candidate = (root / path.lstrip("/")).resolve()
            if not candidate.is_relative_to(root) or not candidate.is_file():
                candidate = root / "index.html"  # OHIF's routes (/viewer?StudyInstanceUIDs=...) are client-side
            content_type = "application/wasm" if candidate.suffix == ".wasm" else None
            content_type = content_type or mimetypes.guess_type(candidate.name)[0] or "application/octet-stream"
            self._send(200, candidate.read_bytes(), content_type, {"Cache-Control": "no-cache"})

        do_HEAD = do_GET  # noqa: N815 - the stdlib's name

    return Handler


class ViewerServer:
    def __init__(self, dist: Path, target: OrthancTarget, *, host: str = "127.0.0.1", port: int = 0) -> None:
        if not (dist / "index.html").is_file():
            raise FileNotFoundError(
                f"OHIF is not at {dist}: run make install (deploy/ohif/fetch-ohif.sh {OHIF_VERSION} {dist.parent})"
            )
        self.server = ThreadingHTTPServer((host, port), _handler(dist, target, app_config_js().encode()))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="ohif-viewer", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    def study_url(self, study_instance_uid: str) -> str:
        return f"{self.url}/viewer?StudyInstanceUIDs={quote(study_instance_uid)}"

    def start(self) -> ViewerServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def serving(dist: Path, target: OrthancTarget, **kwargs: Any) -> Iterator[ViewerServer]:
    viewer = ViewerServer(dist, target, **kwargs).start()
    try:
        yield viewer
    finally:
        viewer.stop()


def cmd_viewer(args: Any) -> int:
    import os
    import time

    from radfed.inference.orthanc.client import OrthancEndpoint

    endpoint = OrthancEndpoint.from_url(args.orthanc)
    password = endpoint.password or os.environ.get("RADFED_ORTHANC_PASSWORD")
    target = OrthancTarget(endpoint.url, endpoint.username, password)
    viewer = ViewerServer(args.dist or default_dist(), target, port=args.port).start()
    print(f"OHIF {OHIF_VERSION} for {endpoint.url}: {viewer.url}/  (Ctrl-C stops it)", flush=True)
    if args.study:
        print(f"study: {viewer.study_url(args.study)}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        viewer.stop()
    return 0


def add_parser(commands: Any) -> None:
    viewer = commands.add_parser("viewer", help="serve the OHIF viewer for an Orthanc on 127.0.0.1 and print the link")
    viewer.add_argument("--orthanc", required=True, metavar="URL", help="http://user@host:port (password: env)")
    viewer.add_argument("--port", type=int, default=8701)
    viewer.add_argument("--study", metavar="STUDY_INSTANCE_UID", help="also print this study's link")
    viewer.add_argument("--dist", type=Path, help=f"OHIF dist folder (default .cache/ohif/{OHIF_VERSION}/dist)")
    viewer.set_defaults(handler=cmd_viewer)
