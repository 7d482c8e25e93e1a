"""ONNX Runtime execution of a model artifact on the device the node's settings ask for (inference/model/device.py says
which provider and why), with the provider actually used read back from the session, never assumed.

On a GPU provider the windows of one run are bound to the device (I/O binding: the input copied once, the outputs
allocated there and copied back once) and every run has the same batch size (the last one padded), so CUDA and
TensorRT never meet a new input shape after the warm-up run at activation.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import numpy.typing as npt

from radfed.inference.model.artifact import (
    CLASSIFICATION_OUTPUT,
    INPUT_NAME,
    SEGMENTATION_OUTPUT,
    ArtifactError,
    ModelArtifact,
)
from radfed.inference.model.device import (
    CUDA_PROVIDER,
    TENSORRT_PROVIDER,
    Device,
    DeviceReport,
    DeviceUnavailableError,
    RuntimeSettings,
    probe_device,
)
from radfed.inference.model.windows import Prediction, predict_study

logger = logging.getLogger(__name__)

GPU_PROVIDERS = (CUDA_PROVIDER, TENSORRT_PROVIDER)


class OnnxModel:
    """An ONNX Runtime session over an artifact's model, checked against its tensor contract.

    Raises :class:`DeviceUnavailableError` when the settings want CUDA and it cannot be had (or the session fell
    back to the CPU); ``device`` says which provider runs and why.
    """

    def __init__(
        self, artifact: ModelArtifact, settings: RuntimeSettings | None = None, *, device: DeviceReport | None = None
    ) -> None:
        settings = settings or RuntimeSettings()
        report = device or probe_device(settings)
        if report.problem is not None:
            raise DeviceUnavailableError(report.problem)
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
        import onnxruntime as ort

        self.artifact = artifact
        self.batch_size = max(1, settings.batch_windows)
        options = ort.SessionOptions()
        if settings.intra_op_threads:
            options.intra_op_num_threads = settings.intra_op_threads
        options.log_severity_level = 3
        if report.provider == TENSORRT_PROVIDER and settings.engine_cache_dir is not None:
            settings.engine_cache_dir.mkdir(parents=True, exist_ok=True)
        # float16 only where a GPU runs it fast; the artifact's checksum of the copy was verified at load
        half = artifact.fp16_path if settings.fp16 and report.provider in GPU_PROVIDERS else None
        self.precision = "float16" if half is not None else "float32"
        self.session = ort.InferenceSession(
            str(half or artifact.onnx_path),
            sess_options=options,
            providers=[name for name, _ in report.providers],
            provider_options=[dict(opts) for _, opts in report.providers],
        )
        self.provider = self.session.get_providers()[0]
        if self.provider != report.provider:  # ONNX Runtime logged why and fell back
            why = f"{report.provider} failed to start for {artifact.key} (fell back to {self.provider}; see the log)"
            if settings.device is Device.CUDA:
                raise DeviceUnavailableError(f"{CUDA_PROVIDER} requested (device = cuda) but {why}")
            report = DeviceReport(report.wanted, self.provider, why, None, report.providers)
        self.device = report
        self._device_id = settings.device_id
        # None: bind on a GPU provider only (tests bind on the CPU to check the path gives the same numbers)
        self.io_binding: bool | None = None
        self._check_contract()
        if settings.warmup:
            self.warm_up()
        logger.info("model %s runs on %s, %s (%s)", artifact.key, self.provider, self.precision, report.reason)

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

    @property
    def on_gpu(self) -> bool:
        return self.provider in GPU_PROVIDERS

    def warm_up(self) -> None:
        """One run of a full batch of zeros: CUDA/cuDNN (or a TensorRT engine) set up before the first study."""
        channels = len(self.artifact.spec.channels)
        self.run_batch(np.zeros((self.batch_size, channels, *self.patch), dtype=np.float32))

    def run_batch(self, batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        count = batch.shape[0]
        if self.on_gpu and count < self.batch_size:  # one input shape on the device: pad the last windows
            padding = np.zeros((self.batch_size - count, *batch.shape[1:]), dtype=batch.dtype)
            batch = np.concatenate([batch, padding])
        bind = self.on_gpu if self.io_binding is None else self.io_binding
        seg, cls = self._run_bound(batch) if bind else self._run(batch)
        return seg[:count], cls[:count]

    def _run(self, batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        seg, cls = self.session.run([SEGMENTATION_OUTPUT, CLASSIFICATION_OUTPUT], {INPUT_NAME: batch})
        return np.asarray(seg, dtype=np.float32), np.asarray(cls, dtype=np.float32)

    def _run_bound(self, batch: npt.NDArray[np.float32]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        where = "cuda" if self.on_gpu else "cpu"
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_NAME, np.ascontiguousarray(batch, dtype=np.float32))
        binding.bind_output(SEGMENTATION_OUTPUT, where, self._device_id if self.on_gpu else 0)
        binding.bind_output(CLASSIFICATION_OUTPUT, where, self._device_id if self.on_gpu else 0)
        self.session.run_with_iobinding(binding)
        seg, cls = binding.copy_outputs_to_cpu()
        return np.asarray(seg, dtype=np.float32), np.asarray(cls, dtype=np.float32)

    def predict(self, image: npt.NDArray[np.float32]) -> Prediction:
        """Sliding-window prediction over a (channels, slices, rows, columns) image of any size."""
        return predict_study(image, self.artifact.spec, self.run_batch, batch_size=self.batch_size)
