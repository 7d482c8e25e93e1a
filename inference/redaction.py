"""What of a DICOM object may appear in a log line or a job reason.

UIDs appear as a short hash (the first 12 hex digits of the SHA-256 of the UID, the form of the cohort's study
keys), which still tells two instances apart and lets the site's staff, who hold the UID, recognise it. Free text
from a DICOM object or from an error about one is reduced to printable ASCII and shortened.
"""

from __future__ import annotations

import hashlib

UID_DIGEST_LENGTH = 12
TEXT_LIMIT = 64
ERROR_TEXT_LIMIT = 160  # a decoder's message says which length or syntax was wrong; worth more room


def uid_digest(uid: str) -> str:
    """The first 12 hex digits of the SHA-256 of ``uid`` (``"?"`` for a missing UID)."""
    if not uid:
        return "?"
    return hashlib.sha256(uid.encode()).hexdigest()[:UID_DIGEST_LENGTH]


def printable(text: str, limit: int = TEXT_LIMIT) -> str:
    """``text`` as printable ASCII (anything else becomes ``?``), at most ``limit`` characters."""
    cleaned = "".join(c if " " <= c <= "~" else "?" for c in text)
    return cleaned if len(cleaned) <= limit else cleaned[: limit - 3] + "..."


def error_text(exc: BaseException) -> str:
    """``"Type: message"`` of an exception raised by a DICOM library, the message as :func:`printable`."""
    return f"{type(exc).__name__}: {printable(str(exc), ERROR_TEXT_LIMIT)}"
