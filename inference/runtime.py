"""ONNX Runtime execution of a model artifact, GPU when present, with the provider actually used reported.

``onnxruntime-gpu`` lists CUDA even on a machine without a GPU and then silently runs on the CPU, so the
provider is read back from the session, never assumed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from radfed.inference.artifact import (
    CLASSIFICATION_OUTPUT,
    INPUT_NAME,
    SEGMENTATION_OUTPUT,
    ArtifactError,
    ModelArtifact,
)
from radfed.inference.windows import pad_to, windows

logger = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass(frozen=True)
class Prediction:
    probability: npt.NDArray[np.float32]  # lesion probability on the model grid (slices, rows, columns)
    study_probability: float  # the most suspicious window's classification probability
    windows: int


def _sigmoid(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(x, -60, 60))), dtype=np.float32)


class OnnxModel:
    """An ONNX Runtime session over an artifact's model, checked against its tensor contract."""

    def __init__(
        self,
        artifact: ModelArtifact,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        batch_size: int = 4,
        overlap: float = 0.25,
    ) -> None:
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import onnxruntime as ort

        self.artifact = artifact
        self.batch_size = batch_size
        self.overlap = overlap
        available = ort.get_available_providers()
        wanted = [p for p in (providers or PREFERRED_PROVIDERS) if p in available]
        if not wanted:
            raise ArtifactError(
                f"none of the providers {list(providers or PREFERRED_PROVIDERS)} is available ({available})"
            )
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(artifact.onnx_path), sess_options=options, providers=wanted)
        self.provider = self.session.get_providers()[0]
        self._check_contract()
        logger.info("model %s runs on %s", artifact.key, self.provider)

    def _check_contract(self) -> None:
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        expected_in = self.artifact.inputs[0]
        if INPUT_NAME not in inputs or {SEGMENTATION_OUTPUT, CLASSIFICATION_OUTPUT} - outputs:
            raise ArtifactError(
                f"ONNX model tensors {sorted(inputs)} -> {sorted(outputs)} do not match the contract "
                f"{INPUT_NAME} -> {SEGMENTATION_OUTPUT}, {CLASSIFICATION_OUTPUT}"
            )
        shape = inputs[INPUT_NAME].shape
        if [d if isinstance(d, int) else None for d in shape[1:]] != list(expected_in.shape[1:]):
            raise ArtifactError(f"ONNX input shape {shape} does not match the manifest's {list(expected_in.shape)}")

    @property
    def patch(self) -> tuple[int, int, int]:
        return self.artifact.spec.preprocessing.patch_size

    def run_batch(self, batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        seg, cls = self.session.run([SEGMENTATION_OUTPUT, CLASSIFICATION_OUTPUT], {INPUT_NAME: batch})
        return np.asarray(seg, dtype=np.float32), np.asarray(cls, dtype=np.float32)

    def predict(self, image: npt.NDArray[np.float32]) -> Prediction:
        """Sliding-window prediction over a (channels, slices, rows, columns) image of any size."""
        padded, crop = pad_to(image, self.patch)
        spatial = padded.shape[1:]
        logits_sum = np.zeros(spatial, dtype=np.float32)
        weight = np.zeros(spatial, dtype=np.float32)
        study = 0.0
        tiles = list(windows(spatial, self.patch, self.overlap))
        for first in range(0, len(tiles), self.batch_size):
            chunk = tiles[first : first + self.batch_size]
            batch = np.stack([padded[(slice(None), *w.slices)] for w in chunk]).astype(np.float32)
            seg, cls = self.run_batch(batch)
            for w, seg_logits, cls_logit in zip(chunk, seg[:, 0], cls[:, 0], strict=True):
                logits_sum[w.slices] += seg_logits
                weight[w.slices] += 1.0
                study = max(study, float(1.0 / (1.0 + np.exp(-float(cls_logit)))))
        probability = _sigmoid((logits_sum / np.maximum(weight, 1.0)).astype(np.float32))[crop]
        return Prediction(np.ascontiguousarray(probability), study, len(tiles))


def describe_providers() -> dict[str, Any]:
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "available": ort.get_available_providers()}
