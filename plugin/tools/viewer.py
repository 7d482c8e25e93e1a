"""``radfed viewer``: the OHIF v3 viewer for one Orthanc, served on 127.0.0.1 from one origin.

OHIF is the prebuilt ``dist/`` of npm's ``@ohif/app`` (fetched by deploy/ohif/fetch-ohif.sh, never
committed). Orthanc 1.10 sends no CORS headers, so the viewer, its configuration and a proxy of Orthanc's
``/dicom-web`` share one origin; the proxy adds Orthanc's credentials, which never reach the browser.
The configuration is the one deploy/ohif/app-config.js gives PACS admins: radfed's SEG loads without a
prompt and its SR opens without the tracking prompt.

Only the holder of the link ``radfed viewer`` prints gets in: the link's token (random, made at start) is
exchanged for an HttpOnly, SameSite=Strict session cookie; anything else is answered 401. The Host header
must name this loopback address (a page on another site that rebinds its DNS name to 127.0.0.1 is refused),
and only plain DICOMweb resource paths are forwarded, so the proxy's credentials never reach the rest of
Orthanc's REST API."""

from __future__ import annotations

import hmac
import mimetypes
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, unquote_plus

OHIF_VERSION = "3.13.2"
PROXY_PREFIX = "/dicom-web"
_FORWARDED_HEADERS = ("Accept", "Content-Type", "Range")
_RETURNED_HEADERS = ("Content-Encoding", "Content-Disposition", "ETag", "Last-Modified")
# what OHIF asks for: QIDO studies?..., studies/{uid}/series, .../metadata, .../frames/N, .../rendered, and the
# bulk data Orthanc points to (.../instances/{uid}/bulk/{tag}); all sit under these roots
DICOMWEB_ROOTS = frozenset({"studies", "series", "instances"})
_SEGMENT = re.compile(r"[A-Za-z0-9_.,-]+")  # UIDs, resource names, frame lists, bulk data tag paths
_CHUNK = 64 * 1024
_NO_BODY = (204, 304)


def default_dist(root: Path | None = None) -> Path:
    """Where OHIF's ``dist/`` is looked for: under ``root`` when given, then this checkout, the working
    directory and the user's cache (``$XDG_CACHE_HOME/radfed``, else ``~/.cache/radfed``).

    OHIF (~50 MB) is not in the wheel; an installed node fetches it with the shipped script into the user's
    cache: ``bash "$(python -m radfed.deploy ohif-fetch)" VERSION ~/.cache/radfed/ohif/VERSION``. The first
    candidate holding ``index.html`` wins; when none does, the first candidate is returned (its absence is
    reported by :class:`ViewerServer`).
    """
    import os

    here = Path(__file__).resolve().parents[2]
    checkout = [here] if (here / "pyproject.toml").is_file() and (here / "plugin").is_dir() else []
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "radfed"
    roots = [*([root] if root else []), *checkout, Path.cwd()]
    candidates = [r / ".cache" / "ohif" / OHIF_VERSION / "dist" for r in roots]
    candidates.append(cache / "ohif" / OHIF_VERSION / "dist")
    found = next((c for c in candidates if (c / "index.html").is_file()), None)
    if found is not None:
        return found
    return candidates[0] if root or checkout else candidates[-1]


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


class DicomWebPathError(ValueError):
    """A path under /dicom-web/ that is not a plain DICOMweb resource; ``status`` is the viewer's answer."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


def dicomweb_path(raw: str) -> str:
    """The DICOMweb resource that ``raw`` (the request path after ``/dicom-web/``, no query) names.

    Percent-escapes are decoded once; every segment must then be a plain name (letters, digits, ``.``, ``,``,
    ``-``, ``_``), so ``.``/``..``, empty segments, encoded slashes and backslashes and a second layer of
    escapes are refused, and the first segment must be one of DICOMweb's resource roots (PS3.18 10.3-10.4).

    Raises
    ------
    DicomWebPathError
        Naming why (status 400 for a malformed path, 404 for one outside DICOMweb's resources).
    """
    segments = [unquote(segment, errors="replace") for segment in raw.split("/")]
    for segment in segments:
        if not segment:
            raise DicomWebPathError("empty path segment")
        if set(segment) == {"."}:
            raise DicomWebPathError("dot segment")
        if not _SEGMENT.fullmatch(segment):
            raise DicomWebPathError("path segment with characters outside a DICOMweb resource name")
    if segments[0] not in DICOMWEB_ROOTS:
        raise DicomWebPathError("not a DICOMweb resource", 404)
    return "/".join(segments)


def _same(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


@dataclass(frozen=True)
class ViewerAccess:
    """Who may use one viewer: the link's token, the session cookie it buys, the Host names accepted."""

    token: str
    session: str
    cookie_name: str  # cookies are shared by every port of a host: the name carries the port
    hosts: frozenset[str]

    @classmethod
    def create(cls, host: str, port: int) -> ViewerAccess:
        bound = f"[{host}]" if ":" in host else host
        names = {f"{name}:{port}" for name in ("127.0.0.1", "localhost", "[::1]", bound)}
        return cls(secrets.token_urlsafe(32), secrets.token_urlsafe(32), f"radfed_viewer_{port}", frozenset(names))

    def host_allowed(self, host_headers: list[str]) -> bool:
        return len(host_headers) == 1 and host_headers[0].strip().lower() in self.hosts

    def session_valid(self, cookie_headers: list[str]) -> bool:
        for header in cookie_headers:
            for pair in header.split(";"):
                name, _, value = pair.strip().partition("=")
                if name == self.cookie_name and _same(value, self.session):
                    return True
        return False

    def set_cookie(self) -> str:
        return f"{self.cookie_name}={self.session}; Path=/; HttpOnly; SameSite=Strict"


def _without_token(query: str) -> str:
    return "&".join(part for part in query.split("&") if unquote_plus(part.partition("=")[0]) != "token")


def _handler(dist: Path, target: OrthancTarget, config_js: bytes, access: ViewerAccess) -> type[BaseHTTPRequestHandler]:
    import requests
    import urllib3

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

        def _refuse(self, status: int, reason: str) -> None:
            self._send(status, f"radfed viewer: {reason}\n".encode(), "text/plain; charset=utf-8")

        def _log_in(self, path: str, query: str) -> bool:
            """A request carrying ``token``: answered here (cookie + redirect, or 401)."""
            tokens = [value for key, value in parse_qsl(query, keep_blank_values=True) if key == "token"]
            if not tokens:
                return False
            if not all(_same(token, access.token) for token in tokens):
                self._refuse(401, "wrong token (open the link that radfed viewer printed)")
                return True
            rest = _without_token(query)
            location = "/" + path.lstrip("/") + (f"?{rest}" if rest else "")  # never //host
            headers = {"Location": location, "Set-Cookie": access.set_cookie(), "Cache-Control": "no-store"}
            self._send(303, b"", "text/plain", headers | {"Referrer-Policy": "no-referrer"})
            return True

        def _proxy(self, path: str, query: str) -> None:
            if not path.startswith(PROXY_PREFIX + "/"):
                self._refuse(404, "not a DICOMweb resource")
                return
            try:
                resource = dicomweb_path(path[len(PROXY_PREFIX) + 1 :])
            except DicomWebPathError as refused:
                self._refuse(refused.status, str(refused))
                return
            upstream = f"{target.url.rstrip('/')}/dicom-web/{resource}" + (f"?{query}" if query else "")
            headers = {k: v for k in _FORWARDED_HEADERS if (v := self.headers.get(k))}
            headers["Accept-Encoding"] = "identity"
            try:
                answer = session.get(upstream, headers=headers, timeout=60, stream=True)
            except requests.RequestException as exc:
                self._refuse(502, f"Orthanc unreachable: {type(exc).__name__}")
                return
            with answer:
                self._relay(answer)

        def _relay(self, answer: requests.Response) -> None:
            """Orthanc's answer, copied in chunks as it arrives (a multi-frame WADO-RS answer is large)."""
            self.send_response(answer.status_code)
            self.send_header("Content-Type", answer.headers.get("Content-Type", "application/octet-stream"))
            for key in _RETURNED_HEADERS:
                if key in answer.headers:
                    self.send_header(key, answer.headers[key])
            length = answer.headers.get("Content-Length", "")
            chunked = False
            if answer.status_code in _NO_BODY:
                pass
            elif length.isdigit():
                self.send_header("Content-Length", length)
            elif self.request_version == "HTTP/1.1":
                chunked = True
                self.send_header("Transfer-Encoding", "chunked")
            else:  # an HTTP/1.0 client: the end of the body is the end of the connection
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command == "HEAD" or answer.status_code in _NO_BODY:
                return
            try:
                for chunk in answer.raw.stream(_CHUNK, decode_content=False):
                    self.wfile.write(f"{len(chunk):X}\r\n".encode() + chunk + b"\r\n" if chunked else chunk)
                if chunked:
                    self.wfile.write(b"0\r\n\r\n")
            except (urllib3.exceptions.HTTPError, OSError):
                self.close_connection = True  # the browser sees a cut answer, never a short complete one

        def do_GET(self) -> None:
            if not access.host_allowed(self.headers.get_all("Host") or []):
                self._refuse(421, "this viewer answers only to its own loopback address")
                return
            path, _, query = self.path.partition("?")
            if not path.startswith("/"):
                self._refuse(400, "the request target must be a path")
                return
            if self._log_in(path, query):
                return
            if not access.session_valid(self.headers.get_all("Cookie") or []):
                self._refuse(401, "open the link that radfed viewer printed (it carries the access token)")
                return
            if path.startswith(PROXY_PREFIX):
                self._proxy(path, query)
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
        # bound first: the accepted Host names and the cookie's name carry the port
        self.server = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
        bound_host, bound_port = self.server.server_address[:2]
        self.access = ViewerAccess.create(str(bound_host), int(bound_port))
        self.server.RequestHandlerClass = _handler(dist, target, app_config_js().encode(), self.access)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="ohif-viewer", daemon=True)

    @property
    def origin(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}"

    @property
    def url(self) -> str:
        """The link to open: its token is exchanged for a session cookie (keep it private)."""
        return f"{self.origin}/?token={self.access.token}"

    def study_url(self, study_instance_uid: str) -> str:
        return f"{self.origin}/viewer?StudyInstanceUIDs={quote(study_instance_uid)}&token={self.access.token}"

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
    print(f"OHIF {OHIF_VERSION} for {endpoint.url}: {viewer.url}  (Ctrl-C stops it)", flush=True)
    print("the link carries this session's access token: do not share it", flush=True)
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
