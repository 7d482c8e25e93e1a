"""Export a trained model to ONNX with the standard tensor contract, checked against torch."""

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

from radfed.inference.artifact import (
    CLASSIFICATION_OUTPUT,
    INPUT_NAME,
    SEGMENTATION_OUTPUT,
    ArtifactError,
    ModelArtifact,
    write_artifact,
)
from radfed.inference.findings import ModelIdentity
from radfed.inference.taskspec import TaskSpec

PARITY_TOLERANCE = 1e-3  # max |torch - onnxruntime| on logits


def export_onnx(model: nn.Module, spec: TaskSpec, path: Path) -> None:
    model.eval()
    d, h, w = spec.patch_size
    example = torch.zeros(1, len(spec.channels), d, h, w)
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


def parity_error(model: nn.Module, spec: TaskSpec, onnx_path: Path, batch: int = 2, seed: int = 0) -> float:
    """Max absolute difference between torch and ONNX Runtime on the same random input."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    d, h, w = spec.patch_size
    x = rng.standard_normal((batch, len(spec.channels), d, h, w)).astype(np.float32)
    with torch.no_grad():
        seg, cls = model(torch.from_numpy(x))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    o_seg, o_cls = session.run([SEGMENTATION_OUTPUT, CLASSIFICATION_OUTPUT], {INPUT_NAME: x})
    return float(max(np.abs(seg.numpy() - o_seg).max(), np.abs(cls.numpy() - o_cls).max()))


def export_artifact(
    model: nn.Module,
    spec: TaskSpec,
    folder: Path,
    identity: ModelIdentity,
    *,
    harmonisation: Mapping[str, Sequence[float]] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> ModelArtifact:
    """ONNX export + parity check + manifest; refuses an export that drifts from torch."""
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
        return write_artifact(
            folder, onnx_path, identity, spec, harmonisation=harmonisation, provenance=details, weights_file=weights
        )
