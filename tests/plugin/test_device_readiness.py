"""``/ready`` names the device the node runs on and why (issue 22): on this CPU machine, ``device = cuda`` is a
problem that names the missing package and nothing is served; ``auto`` is ready on the CPU with the reason stated.
A real Orthanc answers, so the device is the only thing that can make the node not ready. ``radfed fp16`` gives an
artifact its float16 copy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from radfed.federation.learning.export import FP16_PARITY_TOLERANCE
from radfed.inference.model.artifact import load_artifact
from radfed.inference.model.device import CPU_PROVIDER, CUDA_PROVIDER, Device, RuntimeSettings, gather_facts
from radfed.inference.testing.orthanc_server import OrthancProcess
from radfed.plugin.commands.cli import main
from radfed.plugin.node.config import NodeConfig, load_config
from radfed.plugin.node.service import NodeService
from tests.small_model import small_artifact


@pytest.fixture(scope="module")
def artifact_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "onnxruntime-gpu" in gather_facts().packages:
        pytest.skip("this venv has onnxruntime-gpu: the CPU-machine report does not apply")
    folder = tmp_path_factory.mktemp("small") / "artifact"
    small_artifact(folder)
    return folder


@pytest.fixture
def node(tmp_path: Path, orthanc: OrthancProcess, artifact_folder: Path) -> Iterator[object]:
    services: list[NodeService] = []

    def make(device: Device) -> NodeService:
        config = NodeConfig(
            orthanc=orthanc.endpoint,
            state_dir=tmp_path / device.value,
            models_dir=tmp_path / device.value / "models",
            api_token="t",
            prefetch=False,
            runtime=RuntimeSettings(device=device),
        )
        service = NodeService(config)
        services.append(service)
        service.registry.install(artifact_folder)
        service.registry.activate("small", "0.0.1")
        service.load_active_model()
        return service

    yield make
    for service in services:
        service.ledger.close()
        service.client.close()


def test_cuda_wanted_without_onnxruntime_gpu_is_not_ready_and_says_why(node) -> None:  # type: ignore[no-untyped-def]
    service = node(Device.CUDA)
    state = service.readiness()
    assert state["ready"] is False and state["orthanc_reachable"] is True
    problem = f"{CUDA_PROVIDER} requested (device = cuda) but onnxruntime-gpu is not installed"
    assert any(p.startswith(problem) for p in state["problems"])
    assert state["device"]["wanted"] == "cuda" and state["device"]["provider"] is None
    assert state["model"] is None  # nothing runs silently on the CPU


def test_auto_without_a_gpu_is_ready_on_the_cpu_with_the_reason(node) -> None:  # type: ignore[no-untyped-def]
    service = node(Device.AUTO)
    state = service.readiness()
    assert state["problems"] == [] and state["ready"] is True
    assert state["model"] == "small:0.0.1" and state["provider"] == CPU_PROVIDER
    assert state["device"]["provider"] == CPU_PROVIDER and state["device"]["problem"] is None
    assert "CUDA cannot be used: onnxruntime-gpu is not installed" in state["device"]["reason"]


def test_the_device_settings_are_read_from_the_inference_table(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        '[node]\nstate_dir = "/srv/radfed"\nonnx_threads = 2\n'
        '[inference]\ndevice = "cuda"\ndevice_id = 1\ngpu_mem_limit_mb = 4096\ntensorrt = true\nbatch_windows = 8\n'
    )
    runtime = load_config(path, {"RADFED_API_TOKEN": "t"}).runtime
    assert (runtime.device, runtime.device_id, runtime.gpu_mem_limit_mb, runtime.batch_windows) == (
        Device.CUDA,
        1,
        4096,
        8,
    )
    assert runtime.tensorrt and runtime.engine_cache_dir == Path("/srv/radfed/tensorrt-engines")
    assert runtime.intra_op_threads == 2
    assert load_config(path, {"RADFED_API_TOKEN": "t", "RADFED_DEVICE": "cpu"}).runtime.device is Device.CPU
    path.write_text('[inference]\ndevice = "gpu"\n')
    with pytest.raises(ValueError, match=r"inference\.device must be one of cpu, cuda, auto, got 'gpu'"):
        load_config(path, {"RADFED_API_TOKEN": "t"})


def test_radfed_fp16_adds_a_checked_float16_copy_and_keeps_the_float32_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = small_artifact(tmp_path / "artifact")
    assert before.fp16_path is None
    assert main(["fp16", str(before.folder)]) == 0
    after = load_artifact(before.folder)
    assert after.fp16_path is not None and after.sha256 == before.sha256
    error = after.provenance["onnx_fp16_max_abs_error"]
    assert 0 < error < FP16_PARITY_TOLERANCE and f"{error:.4f}" in capsys.readouterr().out
