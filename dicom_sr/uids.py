"""Every UID radfed mints for its results, derived deterministically.

A result is identified by (StudyInstanceUID, model name, model version, input fingerprint): the same
key gives the same Series/SOP Instance/Tracking UIDs, so a re-run replaces instead of duplicating; a
new model version or new input instances give new ones. UIDs use the ``2.25.`` root with a name-based
UUID (ISO/IEC 9834-8 / ITU-T X.667, as PS3.5 B.2 allows), so no registered root is needed.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from pydicom.uid import UID

# Fixed namespace for radfed's name-based UUIDs (itself a UUIDv5 of the product name).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_DNS, "radfed.results")


def name_based_uid(*parts: str) -> UID:
    """``2.25.<decimal of UUIDv5(parts)>``; at most 44 characters, always valid."""
    return UID(f"2.25.{uuid.uuid5(_NAMESPACE, '/'.join(parts)).int}")


@dataclass(frozen=True)
class ResultKey:
    """The identity of one result (what the job ledger keys on, too)."""

    study_instance_uid: str
    model_name: str
    model_version: str
    input_fingerprint: str

    def _uid(self, *role: str) -> UID:
        return name_based_uid(
            self.study_instance_uid, self.model_name, self.model_version, self.input_fingerprint, *role
        )

    @property
    def seg_series_uid(self) -> UID:
        return self._uid("seg", "series")

    @property
    def seg_instance_uid(self) -> UID:
        return self._uid("seg", "instance")

    @property
    def sr_series_uid(self) -> UID:
        return self._uid("sr", "series")

    @property
    def sr_instance_uid(self) -> UID:
        return self._uid("sr", "instance")

    @property
    def key_image_series_uid(self) -> UID:
        return self._uid("key-images", "series")

    def key_image_instance_uid(self, lesion_number: int) -> UID:
        return self._uid("key-images", "instance", str(lesion_number))

    def tracking_uid(self, lesion_number: int) -> UID:
        return self._uid("lesion", str(lesion_number))

    @property
    def study_tracking_uid(self) -> UID:
        return self._uid("study-finding")


def device_uid(model_name: str, model_version: str) -> UID:
    """The SR's device observer: one UID per model version."""
    return name_based_uid("device", model_name, model_version)
