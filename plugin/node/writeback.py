"""Result storage: Orthanc REST (default), DICOMweb STOW-RS, or DICOM C-STORE (pynetdicom)."""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from typing import Protocol

import requests
from pydicom.dataset import Dataset

from radfed.inference.errors import OrthancRequestError, OrthancUnavailableError, RadfedError
from radfed.inference.orthanc.client import OrthancClient, OrthancEndpoint
from radfed.plugin.node.config import CStoreTarget


class StoreError(RadfedError, RuntimeError):
    """The destination refused a result object."""


class ResultStore(Protocol):
    def store(self, datasets: Sequence[Dataset]) -> None: ...


def _bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class OrthancRestStore:
    def __init__(self, client: OrthancClient) -> None:
        self.client = client

    def store(self, datasets: Sequence[Dataset]) -> None:
        for ds in datasets:
            answer = self.client.upload(_bytes(ds))
            if answer.get("Status") not in ("Success", "AlreadyStored"):
                raise StoreError(f"Orthanc refused {ds.Modality} {ds.SOPInstanceUID}: {answer.get('Status')}")


class StowRsStore:
    """PS3.18 STOW-RS: one multipart/related request per result."""

    def __init__(self, url: str, endpoint: OrthancEndpoint, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/") + "/studies"
        self.auth = (endpoint.username, endpoint.password or "") if endpoint.username else None
        self.timeout_s = timeout_s

    def store(self, datasets: Sequence[Dataset]) -> None:
        boundary = uuid.uuid4().hex
        body = b""
        for ds in datasets:
            body += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + _bytes(ds) + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        try:
            response = requests.post(self.url, data=body, headers=headers, auth=self.auth, timeout=self.timeout_s)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise OrthancUnavailableError(f"STOW-RS at {self.url} does not answer: {exc}") from exc
        if response.status_code >= 400:
            raise OrthancRequestError("POST", self.url, response.status_code, response.text[:300])
        failed = response.json().get("00081198", {}).get("Value", []) if response.content else []
        if failed:
            raise StoreError(f"STOW-RS refused {len(failed)} instance(s)")


class CStoreStore:
    """C-STORE SCU to a DICOM node (e.g. a PACS that is not Orthanc)."""

    def __init__(self, target: CStoreTarget) -> None:
        self.target = target

    def store(self, datasets: Sequence[Dataset]) -> None:
        from pynetdicom import AE

        ae = AE(ae_title=self.target.calling_aet)
        for ds in datasets:
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(self.target.host, self.target.port, ae_title=self.target.called_aet)
        if not assoc.is_established:
            raise OrthancUnavailableError(
                f"C-STORE association to {self.target.called_aet}@{self.target.host}:{self.target.port} "
                "refused or unreachable"
            )
        try:
            for ds in datasets:
                status = assoc.send_c_store(ds)
                code = int(getattr(status, "Status", -1)) if status else -1
                if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                    raise StoreError(f"C-STORE of {ds.Modality} {ds.SOPInstanceUID} failed with status 0x{code:04X}")
        finally:
            assoc.release()
