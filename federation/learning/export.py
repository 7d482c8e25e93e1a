"""Export a trained model to ONNX with the standard tensor contract, checked against torch; optionally a float16
copy beside it (for GPU nodes), checked against the float32 model."""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from radfed.inference.model.artifact import (
    CLASSIFICATION_OUTPUT,
    INPUT_NAME,
    SEGMENTATION_OUTPUT,
    ArtifactError,
    ModelArtifact,
    attach_fp16,
    write_artifact,
)
from radfed.inference.model.taskspec import TaskSpec
from radfed.inference.pipeline.findings import ModelIdentity

PARITY_TOLERANCE = 1e-3  # max |torch - onnxruntime| on logits
# max |float32 - float16| on logits: half precision keeps ~3 significant digits, logits reach tens
FP16_PARITY_TOLERANCE = 0.05


def export_onnx(model: nn.Module, spec: TaskSpec, path: Path) -> None:
    model.eval()
    d, h, w = spec.patch_size
    example = torch.zeros(1, spec.input_channels, d, h, w)
    with warnings.catch_warnings():
        # The TorchScript exporter warns about itself, about shape checks it traces as constants, and that
        # instance norm always normalises with the input's statistics (as it does in eval mode too); parity
        # with torch is checked on the exported file below.
        warnings.simplefilter("ignore")
        _export(model, example, path)


def _export(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=[INPUT_NAME],
        output_names=[SEGMENTATION_OUTPUT, CLASSIFICATION_OUTPUT],
        dynamic_axes={
            INPUT_NAME: {0: "batch"},
            SEGMENTATION_OUTPUT: {0: "batch"},
            CLASSIFICATION_OUTPUT: {0: "batch"},
        },
        opset_version=17,
        dynamo=False,
    )


def _sample(spec: TaskSpec, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, spec.input_channels, *spec.patch_size)).astype(np.float32)


def _onnx_logits(onnx_path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    seg, cls = session.run([SEGMENTATION_OUTPUT, CLASSIFICATION_OUTPUT], {INPUT_NAME: x})
    return np.asarray(seg), np.asarray(cls)


def parity_error(model: nn.Module, spec: TaskSpec, onnx_path: Path, batch: int = 2, seed: int = 0) -> float:
    """Max absolute difference between torch and ONNX Runtime on the same random input."""
    x = _sample(spec, batch, seed)
    with torch.no_grad():
        seg, cls = model(torch.from_numpy(x))
    o_seg, o_cls = _onnx_logits(onnx_path, x)
    return float(max(np.abs(seg.numpy() - o_seg).max(), np.abs(cls.numpy() - o_cls).max()))


def export_fp16(onnx_path: Path, fp16_path: Path) -> None:
    """A float16 copy of an exported model; its input and outputs stay float32, so the tensor contract holds."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True), str(fp16_path))


def fp16_parity_error(spec: TaskSpec, onnx_path: Path, fp16_path: Path, batch: int = 2, seed: int = 0) -> float:
    """Max absolute difference between the float32 and float16 models' logits on the same random input
    (ONNX Runtime on the CPU, which runs float16 too)."""
    x = _sample(spec, batch, seed)
    (seg, cls), (half_seg, half_cls) = _onnx_logits(onnx_path, x), _onnx_logits(fp16_path, x)
    return float(max(np.abs(seg - half_seg).max(), np.abs(cls - half_cls).max()))


def add_fp16(artifact: ModelArtifact) -> ModelArtifact:
    """Give an artifact a float16 copy of its model (the float32 one stays); refused when the two differ by more
    than ``FP16_PARITY_TOLERANCE`` on a sample. The difference is kept as ``onnx_fp16_max_abs_error``."""
    with tempfile.TemporaryDirectory() as tmp:
        half = Path(tmp) / "model.fp16.onnx"
        export_fp16(artifact.onnx_path, half)
        error = fp16_parity_error(artifact.spec, artifact.onnx_path, half)
        if error > FP16_PARITY_TOLERANCE:
            raise ArtifactError(
                f"the float16 model differs from float32 by {error:.2e} (tolerance {FP16_PARITY_TOLERANCE:g})"
            )
        return attach_fp16(artifact.folder, half, error)


def export_artifact(
    model: nn.Module,
    spec: TaskSpec,
    folder: Path,
    identity: ModelIdentity,
    *,
    harmonisation: Mapping[str, Sequence[float]] | None = None,
    provenance: Mapping[str, Any] | None = None,
    fp16: bool = False,
) -> ModelArtifact:
    """ONNX export + parity check + manifest; refuses an export that drifts from torch. ``fp16``: also a float16
    copy, checked against the float32 model (:func:`add_fp16`)."""
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        export_onnx(model, spec, onnx_path)
        error = parity_error(model, spec, onnx_path)
        if error > PARITY_TOLERANCE:
            raise ArtifactError(f"ONNX export differs from torch by {error:.2e} (tolerance {PARITY_TOLERANCE:.0e})")
        details = dict(provenance or {})
        details["onnx_parity_max_abs_error"] = error
        weights = Path(tmp) / "weights.npz"
        np.savez(weights, *[t.detach().cpu().numpy() for t in model.state_dict().values()])
        artifact = write_artifact(
            folder, onnx_path, identity, spec, harmonisation=harmonisation, provenance=details, weights_file=weights
        )
    return add_fp16(artifact) if fp16 else artifact
