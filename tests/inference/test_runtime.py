"""The ONNX runtime wrapper on a real exported model: several windows per run give what one window at a time gives,
the I/O-binding path gives the plain path's numbers, warm-up runs one full batch, the float16 copy stays within its
tolerance of float32 and is used only on a GPU, CUDA wanted where it cannot be had refuses to load, and a session
that falls back to the CPU is named."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from radfed.federation.learning.export import FP16_PARITY_TOLERANCE
from radfed.inference.model.artifact import ArtifactError, ModelArtifact, load_artifact, sha256_of
from radfed.inference.model.device import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    Device,
    DeviceReport,
    DeviceUnavailableError,
    RuntimeSettings,
    gather_facts,
)
from radfed.inference.model.runtime import OnnxModel
from tests.small_model import small_artifact

CPU = RuntimeSettings(device=Device.CPU, warmup=False)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    return small_artifact(tmp_path_factory.mktemp("small") / "artifact", fp16=True)


def _image(artifact: ModelArtifact) -> npt.NDArray[np.float32]:
    rng = np.random.default_rng(3)
    return rng.standard_normal((len(artifact.spec.channels), 3, 70, 90)).astype(np.float32)


def test_several_windows_per_run_give_the_same_prediction_as_one_at_a_time(artifact: ModelArtifact) -> None:
    image = _image(artifact)
    one = OnnxModel(artifact, RuntimeSettings(device=Device.CPU, batch_windows=1, warmup=False)).predict(image)
    assert one.windows > 8
    for batch in (3, 8):  # 3: the last run holds fewer windows
        many = OnnxModel(artifact, RuntimeSettings(device=Device.CPU, batch_windows=batch, warmup=False))
        prediction = many.predict(image)
        assert prediction.windows == one.windows
        assert np.abs(prediction.probability - one.probability).max() < 1e-5
        assert prediction.study_probability == pytest.approx(one.study_probability, abs=1e-6)


def test_the_io_binding_path_gives_the_plain_path_numbers(artifact: ModelArtifact) -> None:
    model = OnnxModel(artifact, CPU)
    batch = _image(artifact)[None, :, :1, :32, :32].repeat(3, axis=0)
    plain_seg, plain_cls = model.run_batch(batch)
    model.io_binding = True  # what a CUDA provider does, here bound to the CPU
    bound_seg, bound_cls = model.run_batch(batch)
    assert bound_seg.shape == (3, 1, 1, 32, 32) and bound_cls.shape == (3, 1)
    np.testing.assert_array_equal(bound_seg, plain_seg)
    np.testing.assert_array_equal(bound_cls, plain_cls)


def test_warm_up_runs_one_full_batch_at_activation(artifact: ModelArtifact, monkeypatch: pytest.MonkeyPatch) -> None:
    shapes: list[tuple[int, ...]] = []
    original = OnnxModel.run_batch

    def recorded(self: OnnxModel, batch: npt.NDArray[np.float32]):  # type: ignore[no-untyped-def]
        shapes.append(batch.shape)
        return original(self, batch)

    monkeypatch.setattr(OnnxModel, "run_batch", recorded)
    OnnxModel(artifact, RuntimeSettings(device=Device.CPU, batch_windows=5, warmup=False))
    assert shapes == []
    OnnxModel(artifact, RuntimeSettings(device=Device.CPU, batch_windows=5))
    assert shapes == [(5, len(artifact.spec.channels), 1, 32, 32)]


def test_the_float16_copy_keeps_the_float32_model_and_states_its_difference(artifact: ModelArtifact) -> None:
    assert artifact.fp16_path is not None and artifact.fp16_path.is_file()
    assert sha256_of(artifact.onnx_path) == artifact.sha256  # the float32 model as exported
    error = artifact.provenance["onnx_fp16_max_abs_error"]
    assert 0 < error < FP16_PARITY_TOLERANCE  # half precision differs, a little
    on_cpu = OnnxModel(artifact, RuntimeSettings(device=Device.CPU, fp16=True, warmup=False))
    assert on_cpu.precision == "float32"  # float16 only on a GPU provider


def test_a_changed_float16_copy_is_refused(artifact: ModelArtifact, tmp_path: Path) -> None:
    copy = tmp_path / "artifact"
    shutil.copytree(artifact.folder, copy)
    with (copy / "model.fp16.onnx").open("ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match=r"model\.fp16\.onnx does not match the manifest's checksum"):
        load_artifact(copy)


def test_cuda_wanted_where_it_cannot_be_had_refuses_to_load(artifact: ModelArtifact) -> None:
    if "onnxruntime-gpu" in gather_facts().packages:
        pytest.skip("this venv has onnxruntime-gpu: the CPU-machine refusal does not apply")
    with pytest.raises(DeviceUnavailableError, match="onnxruntime-gpu is not installed"):
        OnnxModel(artifact, RuntimeSettings(device=Device.CUDA))
    auto = OnnxModel(artifact, RuntimeSettings(device=Device.AUTO, warmup=False))
    assert auto.provider == CPU_PROVIDER and "onnxruntime-gpu is not installed" in auto.device.reason


def test_a_session_that_falls_back_to_the_cpu_is_read_back_and_named(artifact: ModelArtifact) -> None:
    """The start-up check passed but the CUDA provider does not start (injected: this runtime has none): ONNX
    Runtime runs the session on the CPU, and the model says so instead of claiming CUDA."""
    claimed = DeviceReport(
        Device.AUTO, CUDA_PROVIDER, "CUDA device 0", None, ((CUDA_PROVIDER, {"device_id": "0"}), (CPU_PROVIDER, {}))
    )
    with pytest.warns(UserWarning, match="'CUDAExecutionProvider' is not in available provider names"):
        model = OnnxModel(artifact, RuntimeSettings(device=Device.AUTO, warmup=False), device=claimed)
    assert model.provider == CPU_PROVIDER and not model.on_gpu
    assert model.device.provider == CPU_PROVIDER and model.device.problem is None
    assert model.device.reason.startswith(f"{CUDA_PROVIDER} failed to start for small:0.0.1 (fell back to")
    strict = pytest.raises(
        DeviceUnavailableError, match=r"requested \(device = cuda\) but CUDAExecutionProvider failed"
    )
    with strict, pytest.warns(UserWarning, match="not in available provider names"):
        OnnxModel(
            artifact, RuntimeSettings(device=Device.CUDA, warmup=False), device=replace(claimed, wanted=Device.CUDA)
        )
