"""ONNX Runtime execution of a model artifact, GPU when present, with the provider actually used reported.

``onnxruntime-gpu`` lists CUDA even on a machine without a GPU and then silently runs on the CPU, so the
provider is read back from the session, never assumed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
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
from radfed.inference.windows import Prediction, predict_study

logger = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxModel:
    """An ONNX Runtime session over an artifact's model, checked against its tensor contract."""

    def __init__(
        self,
        artifact: ModelArtifact,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        batch_size: int = 4,
    ) -> None:
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import onnxruntime as ort

        self.artifact = artifact
        self.batch_size = batch_size
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
        return self.artifact.spec.patch_size

    def run_batch(self, batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        seg, cls = self.session.run([SEGMENTATION_OUTPUT, CLASSIFICATION_OUTPUT], {INPUT_NAME: batch})
        return np.asarray(seg, dtype=np.float32), np.asarray(cls, dtype=np.float32)

    def predict(self, image: npt.NDArray[np.float32]) -> Prediction:
        """Sliding-window prediction over a (channels, slices, rows, columns) image of any size."""
        return predict_study(image, self.artifact.spec, self.run_batch, batch_size=self.batch_size)


def describe_providers() -> dict[str, Any]:
    import onnxruntime as ort

    return {"onnxruntime": ort.__version__, "available": ort.get_available_providers()}
