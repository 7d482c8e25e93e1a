"""Training data in the field's common layout: the Medical Segmentation Decathlon / nnU-Net raw dataset
(``dataset.json``, ``imagesTr/``, ``labelsTr/``, NIfTI), so a data scientist can train on a set they already
hold and deploy the model to the PACS.

Both dialects are read: MSD (``"modality"``, one 4-D image per case listed under ``"training"``) and nnU-Net v2
(``"channel_names"``, ``imagesTr/{case}_{XXXX}.nii.gz`` per channel). Channels follow ``dataset.json``'s order
and must match the task spec's channels in number; every non-zero label is lesion. Cases carry no class
label (they count as "unknown" in the readiness report)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from radfed.inference.dicom.volume import Volume
from radfed.inference.errors import RadfedError
from radfed.inference.model.taskspec import TaskSpec

DATASET_JSON = "dataset.json"
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


class DatasetLayoutError(RadfedError, ValueError):
    """The folder is not a readable MSD / nnU-Net dataset; the message names the file."""


def is_dataset_folder(path: Path) -> bool:
    return (path / DATASET_JSON).is_file() and (path / "imagesTr").is_dir()


@dataclass(frozen=True, eq=False)
class DatasetCase:
    """One training case on its own grid: channels in the spec's order, lesion mask."""

    case_id: str
    reference: Volume  # geometry (its array is the first channel)
    channels: dict[str, npt.NDArray[np.float32]]
    lesions: npt.NDArray[np.uint8]


def volume_from_nifti(path: Path) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    """(array in radfed's (channel?, slice, row, column) order, 4 x 4 affine to LPS)."""
    import nibabel as nib

    try:
        image: Any = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
    except (OSError, ValueError) as exc:
        raise DatasetLayoutError(f"{path.name}: not a readable NIfTI file ({exc})") from exc
    ras = np.asarray(image.affine, dtype=np.float64)
    affine = np.eye(4)
    affine[:3, :3] = _RAS_TO_LPS @ ras[:3, [2, 1, 0]]  # radfed's axes are (k, j, i)
    affine[:3, 3] = _RAS_TO_LPS @ ras[:3, 3]
    if data.ndim == 3:
        return np.ascontiguousarray(data.transpose(2, 1, 0)), affine
    if data.ndim == 4:
        return np.ascontiguousarray(data.transpose(3, 2, 1, 0)), affine
    raise DatasetLayoutError(f"{path.name}: expected a 3-D or 4-D image, got shape {data.shape}")


def _description(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / DATASET_JSON).read_text())
    except json.JSONDecodeError as exc:
        raise DatasetLayoutError(f"{root / DATASET_JSON}: not JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DatasetLayoutError(f"{root / DATASET_JSON}: expected an object")
    return data


def dataset_channels(description: Mapping[str, Any]) -> list[str]:
    """Channel names in order (``channel_names`` of nnU-Net v2, ``modality`` of MSD)."""
    names = description.get("channel_names") or description.get("modality")
    if not isinstance(names, dict) or not names:
        raise DatasetLayoutError("dataset.json names no channels (channel_names or modality)")
    return [str(names[k]) for k in sorted(names, key=int)]


def _case_files(root: Path, description: Mapping[str, Any], channels: int) -> Iterator[tuple[str, list[Path], Path]]:
    ending = str(description.get("file_ending", ".nii.gz"))
    labels = sorted((root / "labelsTr").glob(f"*{ending}"))
    if not labels:
        raise DatasetLayoutError(f"{root / 'labelsTr'} holds no *{ending} label")
    for label in labels:
        if label.name.startswith("._"):
            continue  # macOS resource forks shipped inside some MSD archives
        case = label.name[: -len(ending)]
        per_channel = [root / "imagesTr" / f"{case}_{i:04d}{ending}" for i in range(channels)]
        if all(p.is_file() for p in per_channel):
            yield case, per_channel, label
        elif (root / "imagesTr" / label.name).is_file():
            yield case, [root / "imagesTr" / label.name], label  # MSD: one 4-D image
        else:
            raise DatasetLayoutError(f"case {case}: no image in imagesTr for {label.name}")


def read_dataset(root: Path, spec: TaskSpec) -> Iterator[DatasetCase]:
    """The cases of a dataset folder, channels mapped onto the spec's channels by order."""
    description = _description(root)
    names = dataset_channels(description)
    if len(names) != len(spec.channels):
        raise DatasetLayoutError(
            f"dataset.json has {len(names)} channel(s) {names}; the task spec has {len(spec.channels)} "
            f"({', '.join(spec.channel_names)})"
        )
    for case, images, label_path in _case_files(root, description, len(names)):
        stacks: list[npt.NDArray[np.float32]] = []
        affine = None
        for path in images:
            array, affine_here = volume_from_nifti(path)
            stacks += list(array) if array.ndim == 4 else [array]
            affine = affine if affine is not None else affine_here
        if len(stacks) != len(names):
            raise DatasetLayoutError(f"case {case}: {len(stacks)} channel(s) in its image(s), expected {len(names)}")
        label, _ = volume_from_nifti(label_path)
        if label.shape != stacks[0].shape:
            raise DatasetLayoutError(
                f"case {case}: label shape {label.shape} differs from the image's {stacks[0].shape}"
            )
        assert affine is not None
        reference = Volume(stacks[0], affine)
        yield DatasetCase(
            case_id=case,
            reference=reference,
            channels=dict(zip(spec.channel_names, stacks, strict=True)),
            lesions=(label > 0.5).astype(np.uint8),
        )
