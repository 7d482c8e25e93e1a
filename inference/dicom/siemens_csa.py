"""Just enough of the Siemens CSA header to unpack mosaic images.

Siemens stores EPI/DWI volumes as one "mosaic" image per time point, tiles of the real slices laid out
row by row. The tile count and the true slice normal live in the private CSA Image Header Info
(0029,xx10), a binary "SV10" block: a header of 16 bytes, then per element a 84-byte record (name 64,
vm int32, vr 4, syngodt int32, item count int32, marker int32) followed by its items, each four int32
(the second is the value length) and the value padded to 4 bytes. Layout as documented by the GDCM and
nibabel projects.
"""

from __future__ import annotations

import struct

from pydicom.dataset import Dataset

_CSA_IMAGE_HEADER_INFO = "SIEMENS CSA HEADER"


def _csa_image_bytes(ds: Dataset) -> bytes | None:
    for group_element in range(0x00290010, 0x002900FF + 1):
        creator = ds.get(group_element)
        if creator is not None and str(creator.value).strip() == _CSA_IMAGE_HEADER_INFO:
            block = (group_element & 0xFF) << 8
            element = ds.get(0x00290000 | block | 0x10)
            return bytes(element.value) if element is not None else None
    return None


def read_csa_image_header(ds: Dataset) -> dict[str, list[str]]:
    """Return the CSA image header's elements as ``name -> [values]`` (empty when absent)."""
    raw = _csa_image_bytes(ds)
    if not raw or raw[:4] != b"SV10":
        return {}
    (count,) = struct.unpack_from("<I", raw, 8)
    offset = 16
    fields: dict[str, list[str]] = {}
    for _ in range(count):
        name = raw[offset : offset + 64].split(b"\0", 1)[0].decode("latin-1")
        (n_items,) = struct.unpack_from("<i", raw, offset + 76)
        offset += 84
        values: list[str] = []
        for _ in range(n_items):
            item_len = struct.unpack_from("<4i", raw, offset)[1]
            offset += 16
            value = raw[offset : offset + item_len].split(b"\0", 1)[0].decode("latin-1").strip()
            if value:
                values.append(value)
            offset += (item_len + 3) // 4 * 4
        fields[name] = values
    return fields


def mosaic_tile_count(ds: Dataset) -> int | None:
    """Number of real slices in a mosaic image, from (0019,100A) or the CSA header."""
    for group_element in range(0x00190010, 0x001900FF + 1):
        creator = ds.get(group_element)
        if creator is not None and str(creator.value).strip() == "SIEMENS MR HEADER":
            element = ds.get(0x00190000 | ((group_element & 0xFF) << 8) | 0x0A)
            if element is not None and element.value:
                return int(element.value)
    values = read_csa_image_header(ds).get("NumberOfImagesInMosaic")
    return int(float(values[0])) if values else None


def slice_normal_vector(ds: Dataset) -> tuple[float, float, float] | None:
    """The CSA SliceNormalVector (its sign tells the slice order inside the mosaic)."""
    values = read_csa_image_header(ds).get("SliceNormalVector")
    if not values or len(values) != 3:
        return None
    x, y, z = (float(v) for v in values)
    return x, y, z
