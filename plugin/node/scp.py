"""A DICOM Storage SCP (pynetdicom) so that a PACS other than Orthanc can push studies to the node: every
received instance goes into the node's Orthanc, where the usual StableStudy flow picks it up, and results
go back by C-STORE to the configured destination.

Whom it lets in is set in ``[scp]`` (:class:`~radfed.plugin.node.config.ScpSettings`): the interface it binds, the
calling AE titles and the peer networks allowed. It accepts only what the node reads or writes: image storage
classes (Secondary Capture among them), Segmentation, Basic Text / Enhanced / Comprehensive / Comprehensive 3D SR,
and C-ECHO. Log lines name the calling AE title, the peer address and SOP classes; an instance only by a short
hash of its UID (:func:`radfed.inference.redaction.uid_digest`).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from typing import Any

from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    SegmentationStorage,
)
from pynetdicom import AE, AllStoragePresentationContexts, VerificationPresentationContexts, build_context, evt
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from radfed.inference.dicom.frames import is_image_sop_class
from radfed.inference.errors import OrthancError
from radfed.inference.orthanc.client import OrthancClient
from radfed.inference.redaction import printable, uid_digest
from radfed.plugin.node.config import IPNetwork, ScpSettings

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # the sender retries later (Orthanc unreachable)
STATUS_CANNOT_UNDERSTAND = 0xC000

# A-ASSOCIATE-RJ (PS3.8 9.3.4): rejected permanent, by the service user, with this diagnostic.
_REJECTED_PERMANENT, _SERVICE_USER = 0x01, 0x01
_NO_REASON_GIVEN, _CALLING_AE_NOT_RECOGNISED = 0x01, 0x03
_ABSTRACT_SYNTAX_REFUSED = 0x03  # presentation context result (PS3.8 9.3.3.2); 0x04: transfer syntaxes

# Besides every image storage class (Secondary Capture among them): the objects the node reads or writes.
_NON_IMAGE_SOP_CLASSES = frozenset(
    {SegmentationStorage, ComprehensiveSRStorage, EnhancedSRStorage, BasicTextSRStorage, Comprehensive3DSRStorage}
)
STORAGE_CONTEXTS: list[PresentationContext] = [
    build_context(uid)
    for uid in (str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)
    if uid in _NON_IMAGE_SOP_CLASSES or is_image_sop_class(uid)
]


def peer_allowed(address: str, networks: Iterable[IPNetwork]) -> bool:
    """Whether ``address`` lies in one of ``networks`` (no network: every address)."""
    networks = tuple(networks)
    if not networks:
        return True
    try:
        peer = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope (fe80::1%eth0) is no part of it
    except ValueError:
        return False
    if isinstance(peer, ipaddress.IPv6Address) and peer.ipv4_mapped is not None:
        peer = peer.ipv4_mapped  # an IPv4 peer of a server bound to ::
    return any(peer in network for network in networks)


def _screen_association(event: Any, settings: ScpSettings) -> None:
    """Refuse an association from a peer or calling AE title outside the allow-lists (EVT_REQUESTED)."""
    assoc = event.assoc
    calling, peer = str(assoc.requestor.primitive.calling_ae_title).strip(), str(assoc.requestor.address)
    if not peer_allowed(peer, settings.allowed_peers):
        why, diagnostic = "peer not in scp.allowed_peers", _NO_REASON_GIVEN
    elif settings.allowed_aets and calling not in settings.allowed_aets:
        why, diagnostic = "calling AE title not in scp.allowed_aets", _CALLING_AE_NOT_RECOGNISED
    else:
        return
    logger.warning("association refused (%s): calling AE %s, peer %s", why, printable(calling, 16), printable(peer))
    assoc.acse.send_reject(_REJECTED_PERMANENT, _SERVICE_USER, diagnostic)
    assoc.kill()  # as pynetdicom after its own rejections: the A-ASSOCIATE-RJ goes out before the socket closes


def _report_refused_contexts(event: Any) -> None:
    """Say which proposed SOP classes were refused (EVT_ACCEPTED): the sender's C-STOREs of them will fail."""
    rejected = event.assoc.rejected_contexts
    classes = sorted({_sop_class_name(cx.abstract_syntax) for cx in rejected if cx.result == _ABSTRACT_SYNTAX_REFUSED})
    syntaxes = sorted({_sop_class_name(cx.abstract_syntax) for cx in rejected if cx.result != _ABSTRACT_SYNTAX_REFUSED})
    refused = []
    if classes:
        refused.append(f"SOP classes [{', '.join(classes)}] (only image, SEG, SR and Secondary Capture storage)")
    if syntaxes:
        refused.append(f"the transfer syntaxes proposed for [{', '.join(syntaxes)}] (only uncompressed)")
    if refused:
        requestor = event.assoc.requestor
        logger.warning(
            "association from calling AE %s, peer %s: refused %s",
            printable(str(requestor.ae_title).strip(), 16),
            printable(str(requestor.address)),
            "; ".join(refused),
        )


def _sop_class_name(uid: str | None) -> str:
    return printable(UID(uid).name if uid else "?", 80)


def _handle_store(event: Any, client: OrthancClient) -> int:
    """The one boundary where a store failure becomes a DICOM status instead of an exception."""
    calling = printable(str(event.assoc.requestor.ae_title).strip(), 16)
    instance = uid_digest(str(event.request.AffectedSOPInstanceUID or ""))
    try:
        dataset = event.dataset
        dataset.file_meta = event.file_meta
        answer = client.upload_dataset(dataset)
    except OrthancError as exc:  # the message may carry Orthanc's answer: only its kind and status
        status = getattr(exc, "status", None)
        why = type(exc).__name__ + (f" (HTTP {status})" if status is not None else "")
        logger.warning("C-STORE of instance %s from %s not forwarded to Orthanc: %s", instance, calling, why)
        return STATUS_OUT_OF_RESOURCES
    except (ValueError, AttributeError, KeyError) as exc:  # pydicom's messages may quote element values
        logger.warning("C-STORE of instance %s from %s unreadable: %s", instance, calling, type(exc).__name__)
        return STATUS_CANNOT_UNDERSTAND
    if answer.get("Status") in ("Success", "AlreadyStored"):
        return STATUS_SUCCESS
    logger.warning("C-STORE of instance %s from %s: Orthanc answered %s", instance, calling, answer.get("Status"))
    return STATUS_CANNOT_UNDERSTAND


def start_storage_scp(client: OrthancClient, settings: ScpSettings) -> ThreadedAssociationServer:
    """Listen for C-STORE as ``settings`` say, in a background thread; ``shutdown()`` the server to stop."""
    ae = AE(ae_title=settings.ae_title)
    ae.supported_contexts = STORAGE_CONTEXTS + VerificationPresentationContexts  # C-ECHO: the admin's first test
    handlers: list[Any] = [
        (evt.EVT_REQUESTED, _screen_association, [settings]),
        (evt.EVT_ACCEPTED, _report_refused_contexts),
        (evt.EVT_C_STORE, _handle_store, [client]),
    ]
    server = ae.start_server((settings.host, settings.port), block=False, evt_handlers=handlers)
    if server is None:
        raise RuntimeError(f"Storage SCP did not start on {settings.host}:{settings.port}")
    logger.info(
        "Storage SCP %s listening on %s:%d (calling AE titles: %s; peers: %s)",
        settings.ae_title,
        settings.host,
        settings.port,
        ", ".join(sorted(settings.allowed_aets)) or "any",
        ", ".join(str(network) for network in settings.allowed_peers) or "any",
    )
    return server
