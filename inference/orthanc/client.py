"""A small, typed REST client for Orthanc (1.10+).

Every failure becomes :class:`OrthancUnavailableError` (nothing answered) or
:class:`OrthancRequestError` (Orthanc answered with an error), so callers handle exactly two cases.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import pydicom
import requests
from pydicom.dataset import Dataset
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from radfed.inference.errors import OrthancRequestError, OrthancUnavailableError
from radfed.inference.orthanc.tags import dataset_from_short_tags

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OrthancEndpoint:
    """Where an Orthanc answers and how to authenticate (the password is never logged)."""

    url: str
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:
        return f"OrthancEndpoint(url={self.url!r}, username={self.username!r}, password=***)"

    @classmethod
    def from_url(cls, url: str) -> OrthancEndpoint:
        """``http://user:password@host:port`` -> endpoint with the credentials taken out of the URL."""
        parts = urlsplit(url)
        netloc = parts.hostname or "127.0.0.1"
        if parts.port:
            netloc = f"{netloc}:{parts.port}"
        bare = urlunsplit((parts.scheme or "http", netloc, parts.path.rstrip("/"), "", ""))
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        return cls(bare, username, password)


@dataclass(frozen=True)
class Change:
    """One entry of Orthanc's ``/changes`` log."""

    seq: int
    change_type: str
    resource_type: str
    resource_id: str


class OrthancClient:
    """Blocking REST client; one ``requests.Session`` (keep-alive) per client."""

    def __init__(self, endpoint: OrthancEndpoint, *, timeout_s: float = 30.0, fetch_workers: int = 4) -> None:
        self.endpoint = endpoint
        self._timeout_s = timeout_s
        self._fetch_workers = fetch_workers
        self._session = requests.Session()
        # A keep-alive connection that Orthanc closes just as the client reuses it ends a request with "Remote end
        # closed connection without response" (seen under load: a training study rejected for it). Reads are
        # idempotent, so a GET goes again on a fresh connection; a POST or DELETE never does.
        retry = Retry(total=2, connect=2, read=1, status=0, allowed_methods=frozenset({"GET"}), backoff_factor=0.1)
        adapter = HTTPAdapter(max_retries=retry, pool_maxsize=max(10, fetch_workers))
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        if endpoint.username is not None:
            self._session.auth = (endpoint.username, endpoint.password or "")

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> OrthancClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ---------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        url = self.endpoint.url.rstrip("/") + path
        try:
            response = self._session.request(method, url, timeout=self._timeout_s, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise OrthancUnavailableError(f"Orthanc at {self.endpoint.url} does not answer: {exc}") from exc
        if response.status_code >= 400:
            detail = response.text[:300].replace("\n", " ")
            raise OrthancRequestError(method, path, response.status_code, detail)
        return response

    def get_json(self, path: str, params: dict[str, Any] | None = None) -> Any:
        return self._request("GET", path, params=params).json()

    def post_json(self, path: str, body: Any) -> Any:
        return self._request("POST", path, json=body).json()

    def delete(self, path: str) -> None:
        self._request("DELETE", path)

    # -- resources ---------------------------------------------------------------------------------

    def system(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json("/system")
        return result

    def upload(self, dicom_bytes: bytes) -> dict[str, Any]:
        """Store one instance (``POST /instances``); returns Orthanc's answer (ID, Status, ...)."""
        response = self._request("POST", "/instances", data=dicom_bytes, headers={"Content-Type": "application/dicom"})
        result: dict[str, Any] = response.json()
        return result

    def upload_dataset(self, ds: Dataset) -> dict[str, Any]:
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        return self.upload(buffer.getvalue())

    def studies(self) -> list[str]:
        result: list[str] = self.get_json("/studies")
        return result

    def study(self, study_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json(f"/studies/{study_id}")
        return result

    def series(self, series_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get_json(f"/series/{series_id}")
        return result

    def lookup(self, dicom_uid: str) -> list[dict[str, Any]]:
        """Orthanc resources carrying this DICOM UID (``/tools/lookup``)."""
        found: list[dict[str, Any]] = self._request("POST", "/tools/lookup", data=dicom_uid).json()
        return found

    def find_study(self, study_instance_uid: str) -> str | None:
        """Orthanc id of a study by its StudyInstanceUID, or None."""
        return next((str(i["ID"]) for i in self.lookup(study_instance_uid) if i.get("Type") == "Study"), None)

    def find_instance(self, sop_instance_uid: str) -> str | None:
        return next((str(i["ID"]) for i in self.lookup(sop_instance_uid) if i.get("Type") == "Instance"), None)

    def instance_header(self, instance_id: str) -> Dataset:
        """The instance's tags without pixel data or other binary values (``/tags?short``: kilobytes, not the
        file); see :mod:`radfed.inference.orthanc.tags`."""
        return dataset_from_short_tags(self.get_json(f"/instances/{instance_id}/tags", params={"short": ""}))

    def instance_bytes(self, instance_id: str) -> bytes:
        return self._request("GET", f"/instances/{instance_id}/file").content

    def series_instance_ids(self, series_id: str) -> list[str]:
        return [str(i["ID"]) for i in self.get_json(f"/series/{series_id}/instances")]

    def series_datasets(self, series_id: str) -> list[Dataset]:
        """Download every instance of a series (in parallel) and parse them."""
        ids = self.series_instance_ids(series_id)
        return self.instance_datasets(ids)

    def instance_datasets(self, instance_ids: Sequence[str]) -> list[Dataset]:
        with ThreadPoolExecutor(max_workers=self._fetch_workers) as pool:
            blobs = list(pool.map(self.instance_bytes, instance_ids))
        return [pydicom.dcmread(io.BytesIO(blob)) for blob in blobs]

    def changes(self, since: int, limit: int = 100) -> tuple[list[Change], int, bool]:
        """Entries after ``since``; returns (changes, last seq, done)."""
        answer = self.get_json("/changes", params={"since": since, "limit": limit})
        changes = [
            Change(int(c["Seq"]), str(c["ChangeType"]), str(c["ResourceType"]), str(c["ID"])) for c in answer["Changes"]
        ]
        return changes, int(answer["Last"]), bool(answer["Done"])

    def iter_changes(self, since: int) -> Iterator[Change]:
        while True:
            changes, last, done = self.changes(since)
            yield from changes
            since = last
            if done:
                return
