"""Model artifacts: an ONNX file plus a manifest (identity, checksum, task spec, plan, tensor contract,
calibrated output settings, harmonisation landmarks, provenance). Loading verifies the model file's
checksum and the manifest's own: an edited threshold, spec, plan or harmonisation is refused, not used."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from radfed.inference.errors import RadfedError
from radfed.inference.model.plan import Plan, PlanError
from radfed.inference.model.taskspec import TaskSpec, parse_task_spec
from radfed.inference.pipeline.findings import ModelIdentity

MANIFEST = "manifest.json"
MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.npz"  # the network's tensors in state-dict order: a base for federated fine-tuning
FP16_MODEL_FILE = "model.fp16.onnx"  # optional half-precision copy beside the float32 model, for GPU nodes
FORMAT = "radfed-model/2"

# The tensor contract every radfed segmentation+classification model honours.
INPUT_NAME = "image"  # (batch, channels, slices, rows, columns) float32
SEGMENTATION_OUTPUT = "segmentation_logits"  # (batch, 1, slices, rows, columns) float32
CLASSIFICATION_OUTPUT = "classification_logit"  # (batch, 1) float32


class ArtifactError(RadfedError, ValueError):
    """A model artifact is missing, corrupt, or does not honour its contract."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int | None, ...]  # None: dynamic (the batch axis)
    dtype: str = "float32"


@dataclass(frozen=True, eq=False)
class ModelArtifact:
    folder: Path
    identity: ModelIdentity
    spec: TaskSpec
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    harmonisation: dict[str, list[float]] | None
    provenance: dict[str, Any] = field(default_factory=dict)
    fp16_sha256: str | None = None  # the half-precision copy, when the artifact carries one

    @property
    def onnx_path(self) -> Path:
        return self.folder / MODEL_FILE

    @property
    def fp16_path(self) -> Path | None:
        return self.folder / FP16_MODEL_FILE if self.fp16_sha256 is not None else None

    @property
    def weights_path(self) -> Path | None:
        """The torch weights (``.npz``, state-dict order), when the artifact carries them."""
        path = self.folder / WEIGHTS_FILE
        return path if path.is_file() else None

    @property
    def key(self) -> str:
        return f"{self.identity.name}:{self.identity.version}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON, its own ``manifest_sha256`` left out."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def standard_contract(spec: TaskSpec) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    d, h, w = spec.patch_size
    channels = spec.input_channels
    return (
        (TensorSpec(INPUT_NAME, (None, channels, d, h, w)),),
        (TensorSpec(SEGMENTATION_OUTPUT, (None, 1, d, h, w)), TensorSpec(CLASSIFICATION_OUTPUT, (None, 1))),
    )


def write_artifact(
    folder: Path,
    onnx_file: Path,
    identity: ModelIdentity,
    spec: TaskSpec,
    *,
    harmonisation: Mapping[str, Sequence[float]] | None = None,
    provenance: Mapping[str, Any] | None = None,
    weights_file: Path | None = None,
) -> ModelArtifact:
    """Copy ``onnx_file`` (and the torch weights, when given) into ``folder`` and write its manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / MODEL_FILE
    if onnx_file.resolve() != target.resolve():
        shutil.copyfile(onnx_file, target)
    weights = None
    if weights_file is not None:
        shutil.copyfile(weights_file, folder / WEIGHTS_FILE)
        weights = {"file": WEIGHTS_FILE, "sha256": sha256_of(folder / WEIGHTS_FILE)}
    inputs, outputs = standard_contract(spec)
    manifest = {
        "format": FORMAT,
        "name": identity.name,
        "version": identity.version,
        "onnx": {"file": MODEL_FILE, "sha256": sha256_of(target), "bytes": target.stat().st_size},
        "weights": weights,
        "task_name": spec.name,
        "task_spec": spec.source_text,
        "plan": json.loads(spec.plan.to_json()) if spec.plan is not None else None,
        "contract": {
            "inputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in inputs],
            "outputs": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype} for t in outputs],
        },
        "thresholds": {
            "lesion_probability": spec.outputs.lesion_threshold,
            "min_lesion_volume_mm3": spec.outputs.min_lesion_volume_mm3,
            "min_lesion_fraction": spec.outputs.lesion_fraction,
            "min_lesion_slices": spec.outputs.lesion_slices,
            "study_temperature": spec.outputs.study_temperature,
            "categories": [
                {
                    "code": f"{c.code.scheme_designator}:{c.code.value}:{c.code.meaning}",
                    "min_probability": c.min_probability,
                }
                for c in spec.outputs.codes.categories
            ],
        },
        "harmonisation": {k: [float(v) for v in vs] for k, vs in harmonisation.items()} if harmonisation else None,
        "provenance": dict(provenance or {}),
    }
    manifest["manifest_sha256"] = manifest_digest(manifest)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return load_artifact(folder)


def attach_fp16(folder: Path, fp16_file: Path, max_abs_error: float) -> ModelArtifact:
    """Add a half-precision copy of the model to an artifact (the float32 model stays as it is): the file, its
    checksum and its measured difference from float32 (provenance ``onnx_fp16_max_abs_error``) in the manifest."""
    manifest_path = folder / MANIFEST
    load_artifact(folder)  # only a valid artifact gets a copy
    manifest = json.loads(manifest_path.read_text())
    target = folder / FP16_MODEL_FILE
    shutil.copyfile(fp16_file, target)
    manifest["onnx_fp16"] = {"file": FP16_MODEL_FILE, "sha256": sha256_of(target), "bytes": target.stat().st_size}
    manifest["provenance"] = {**(manifest.get("provenance") or {}), "onnx_fp16_max_abs_error": max_abs_error}
    manifest["manifest_sha256"] = manifest_digest(manifest)
    partial = manifest_path.with_suffix(".partial")
    partial.write_text(json.dumps(manifest, indent=2))
    partial.replace(manifest_path)
    return load_artifact(folder)


def _tensors(items: Any, where: str) -> tuple[TensorSpec, ...]:
    try:
        return tuple(TensorSpec(str(t["name"]), tuple(t["shape"]), str(t.get("dtype", "float32"))) for t in items)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"manifest {where} is malformed: {exc}") from exc


def load_artifact(folder: Path) -> ModelArtifact:
    """Read and verify an artifact folder (checksum, task spec, contract against the spec)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{folder} is not a model artifact: {MANIFEST} missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{manifest_path}: not JSON ({exc})") from exc
    if manifest.get("format") != FORMAT:
        raise ArtifactError(
            f"{manifest_path}: format {manifest.get('format')!r} is not {FORMAT}; "
            "artifacts from before the planned models must be trained again"
        )
    recorded = manifest.get("manifest_sha256")
    if recorded != manifest_digest(manifest):
        raise ArtifactError(
            f"{manifest_path} was changed after export (its checksum does not match its content): "
            "thresholds, task spec, plan and harmonisation are refused unless they are exactly as trained"
        )
    onnx_path = folder / str(manifest["onnx"]["file"])
    if not onnx_path.is_file():
        raise ArtifactError(f"{onnx_path} missing")
    actual = sha256_of(onnx_path)
    if actual != manifest["onnx"]["sha256"]:
        raise ArtifactError(
            f"{onnx_path} checksum {actual[:12]}... does not match the manifest's "
            f"{manifest['onnx']['sha256'][:12]}...: "
            "the model file was changed or corrupted"
        )
    weights = manifest.get("weights")
    # The weights are optional for inference (a rollout sends the ONNX model only); when present they must match.
    present = weights is not None and (folder / weights["file"]).is_file()
    if present and sha256_of(folder / weights["file"]) != weights["sha256"]:
        raise ArtifactError(f"{folder / weights['file']} does not match the manifest's checksum")
    half = manifest.get("onnx_fp16")
    # optional like the weights: a copy that is present must match
    if half is not None and not (folder / half["file"]).is_file():
        half = None
    if half is not None and sha256_of(folder / half["file"]) != half["sha256"]:
        raise ArtifactError(f"{folder / half['file']} does not match the manifest's checksum")
    spec = parse_task_spec(manifest["task_spec"], f"{manifest_path}:task_spec")
    try:
        spec = spec.planned(Plan.from_json(json.dumps(manifest["plan"])))
    except (KeyError, PlanError) as exc:
        raise ArtifactError(f"{manifest_path}: no valid plan ({exc})") from exc
    thresholds = manifest["thresholds"]
    spec = spec.with_outputs(
        lesion_threshold=float(thresholds["lesion_probability"]),
        min_lesion_volume_mm3=float(thresholds["min_lesion_volume_mm3"]),
        min_lesion_fraction=float(thresholds.get("min_lesion_fraction", 0.0)),
        min_lesion_slices=int(thresholds.get("min_lesion_slices", 1)),
        study_temperature=float(thresholds.get("study_temperature", 1.0)),
    )
    inputs = _tensors(manifest["contract"]["inputs"], "contract.inputs")
    outputs = _tensors(manifest["contract"]["outputs"], "contract.outputs")
    expected_inputs, expected_outputs = standard_contract(spec)
    if inputs != expected_inputs or outputs != expected_outputs:
        raise ArtifactError(f"{manifest_path}: tensor contract does not match the task spec's channels and patch size")
    harmonisation = manifest.get("harmonisation")
    if harmonisation is not None and set(harmonisation) != set(spec.channel_names):
        raise ArtifactError(
            f"{manifest_path}: harmonisation landmarks for {sorted(harmonisation)}, "
            f"channels are {list(spec.channel_names)}"
        )
    return ModelArtifact(
        folder=folder,
        identity=ModelIdentity(str(manifest["name"]), str(manifest["version"])),
        spec=spec,
        sha256=actual,
        inputs=inputs,
        outputs=outputs,
        harmonisation=harmonisation,
        provenance=dict(manifest.get("provenance") or {}),
        fp16_sha256=half["sha256"] if half is not None else None,
    )
