"""A DICOM Storage SCP (pynetdicom) so that a PACS other than Orthanc can push studies to the node: every
received instance goes into the node's Orthanc, where the usual StableStudy flow picks it up, and results
go back by C-STORE to the configured destination."""

from __future__ import annotations

import logging
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from radfed.inference.errors import OrthancError
from radfed.inference.orthanc.client import OrthancClient

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # the sender retries later (Orthanc unreachable)
STATUS_CANNOT_UNDERSTAND = 0xC000


def _handle_store(event: Any, client: OrthancClient) -> int:
    """The one boundary where a store failure becomes a DICOM status instead of an exception."""
    try:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        answer = client.upload_dataset(dataset)
    except OrthancError as exc:
        logger.warning("C-STORE from %s not forwarded: %s", event.assoc.requestor.ae_title, exc)
        return STATUS_OUT_OF_RESOURCES
    except (ValueError, AttributeError, KeyError) as exc:
        logger.warning("C-STORE from %s unreadable: %s", event.assoc.requestor.ae_title, exc)
        return STATUS_CANNOT_UNDERSTAND
    return STATUS_SUCCESS if answer.get("Status") in ("Success", "AlreadyStored") else STATUS_CANNOT_UNDERSTAND


def start_storage_scp(
    client: OrthancClient, port: int, ae_title: str, host: str = "127.0.0.1"
) -> ThreadedAssociationServer:
    ae = AE(ae_title=ae_title)
    ae.supported_contexts = AllStoragePresentationContexts
    handlers: list[Any] = [(evt.EVT_C_STORE, _handle_store, [client])]
    server = ae.start_server((host, port), block=False, evt_handlers=handlers)
    if server is None:
        raise RuntimeError(f"Storage SCP did not start on {host}:{port}")
    logger.info("Storage SCP %s listening on %s:%d", ae_title, host, port)
    return server
