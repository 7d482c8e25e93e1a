"""How radfed marks its results as research-use AI output, identically on every object."""

from __future__ import annotations

from importlib import metadata

import highdicom as hd

from radfed.dicom_sr import codes
from radfed.inference.pipeline.findings import ModelIdentity

RADFED_MANUFACTURER = "radfed"
_LO_MAX = 64  # VR LO holds at most 64 characters


def radfed_version() -> str:
    try:
        return metadata.version("radfed")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def series_description(model: ModelIdentity, kind: str) -> str:
    """E.g. ``AI prostate-lesions v1.2 SEG - RESEARCH USE ONLY`` (the model name is shortened to fit LO)."""
    suffix = f" v{model.version} {kind} - RESEARCH USE ONLY"
    name = model.name[: max(8, _LO_MAX - len(suffix) - 3)]
    return f"AI {name}{suffix}"[:_LO_MAX]


def software_versions(model: ModelIdentity) -> list[str]:
    """SoftwareVersions (LO, multi-valued): radfed's version, then the model's."""
    return [f"radfed {radfed_version()}"[:_LO_MAX], f"{model.name} {model.version}"[:_LO_MAX]]


def device_serial_number(model: ModelIdentity) -> str:
    return f"{model.name}-{model.version}"[:_LO_MAX]


def contributing_equipment(model: ModelIdentity) -> list[hd.ContributingEquipment]:
    return [
        hd.ContributingEquipment(
            manufacturer=RADFED_MANUFACTURER,
            purpose_of_reference=codes.PROCESSING_EQUIPMENT,
            manufacturer_model_name=model.name[:_LO_MAX],
            software_versions=f"radfed {radfed_version()}",
            contribution_description="AI result for research use only, not for diagnostic use",
        )
    ]
