"""An instance's header from Orthanc's ``/instances/{id}/tags?short`` answer, as a pydicom dataset.

Orthanc answers every tag as ``"gggg,eeee": value``: text (multiple values joined by ``\\``), a list of
items for a sequence, or ``null`` for binary and over-long values (pixel data, a Siemens CSA header). That is
a few kilobytes where the instance file is the whole image; what it cannot carry (``null``) is left out, so
code that needs a binary element downloads the file instead. Reference: the Orthanc Book, REST API
("?short" since Orthanc 1.4.0).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

_INTEGER_VRS = frozenset({"US", "SS", "UL", "SL", "UV", "SV"})
_FLOAT_VRS = frozenset({"FL", "FD"})
# text VRs whose value may contain a backslash: never split into several values
_SINGLE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})


def _vr_of(tag: int, value: Any) -> str:
    if isinstance(value, list):
        return "SQ"
    if tag & 0xFFFF == 0:
        return "UL"  # a group length
    if tag >> 16 & 1:  # private: a creator is LO; Orthanc's dictionary gave a text value for the rest
        return "LO"
    if dictionary_has_tag(tag):
        return str(dictionary_VR(tag)).split(" or ")[0]
    return "UN"


def _value(vr: str, text: str) -> Any:
    parts = text.split("\\") if vr not in _SINGLE_TEXT_VRS else [text]
    if vr in _INTEGER_VRS or vr in _FLOAT_VRS:
        cast = int if vr in _INTEGER_VRS else float
        try:
            numbers = [cast(p) for p in parts if p.strip() != ""]
        except ValueError:
            return None
        return numbers[0] if len(numbers) == 1 else numbers
    return parts[0] if len(parts) == 1 else parts


def dataset_from_short_tags(tags: Mapping[str, Any]) -> Dataset:
    """The dataset an Orthanc ``?short`` tag answer describes (binary and over-long values left out).

    Raises ``ValueError`` naming the key when a key is not ``gggg,eeee``.
    """
    ds = Dataset()
    for key, value in tags.items():
        try:
            group, element = key.split(",")
            tag = int(group, 16) << 16 | int(element, 16)
        except ValueError:
            raise ValueError(f"not an Orthanc tag key: {key[:20]!r}") from None
        if value is None:
            continue
        vr = _vr_of(tag, value)
        if vr == "SQ":
            items = [dataset_from_short_tags(item) for item in value if isinstance(item, Mapping)]
            ds.add(DataElement(tag, "SQ", Sequence(items)))
            continue
        if not isinstance(value, str) or vr in ("UN", "AT", "OB", "OW", "OF", "OD", "OL", "OV"):
            continue
        converted = _value(vr, value)
        if converted is None:
            continue
        try:
            ds.add(DataElement(tag, vr, converted, validation_mode=config.IGNORE))  # kept as Orthanc has it
        except (TypeError, ValueError):
            continue  # a value pydicom cannot type (a malformed private or tag-valued element): left out
    return ds
