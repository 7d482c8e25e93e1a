"""The start-up check of the wanted device: which provider the sessions get and why, the missing piece named.

The first tests look at this machine as it is (the CPU package, no GPU); the others describe a machine by its facts
to name each fault a GPU server can have (no driver, an old driver, a missing cuDNN, a hidden device...)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from radfed.inference.model.device import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    TENSORRT_PROVIDER,
    CudaFacts,
    Device,
    RuntimeSettings,
    choose_providers,
    cuda_libraries,
    gather_facts,
    probe_device,
)


@pytest.fixture(scope="module")
def cpu_machine() -> CudaFacts:
    facts = gather_facts()
    if "onnxruntime-gpu" in facts.packages:
        pytest.skip("this venv has onnxruntime-gpu: the CPU-machine report does not apply")
    return facts


def test_cuda_wanted_on_the_cpu_package_is_a_problem_that_names_the_package(cpu_machine: CudaFacts) -> None:
    report = probe_device(RuntimeSettings(device=Device.CUDA))
    assert report.provider is None and not report.providers
    assert report.problem is not None
    assert f"{CUDA_PROVIDER} requested (device = cuda) but onnxruntime-gpu is not installed" in report.problem
    assert "radfed[gpu]" in report.problem


def test_auto_on_the_cpu_package_runs_on_the_cpu_and_says_why(cpu_machine: CudaFacts) -> None:
    report = probe_device(RuntimeSettings(device=Device.AUTO))
    assert report.problem is None
    assert report.provider == CPU_PROVIDER and [name for name, _ in report.providers] == [CPU_PROVIDER]
    assert report.reason.startswith("device = auto and CUDA cannot be used: onnxruntime-gpu is not installed")
    assert report.as_dict() == {"wanted": "auto", "provider": CPU_PROVIDER, "reason": report.reason, "problem": None}


def test_cpu_wanted_never_looks_for_cuda(cpu_machine: CudaFacts) -> None:
    report = probe_device(RuntimeSettings(device=Device.CPU))
    assert (report.provider, report.problem) == (CPU_PROVIDER, None)


GPU_SERVER = CudaFacts(
    packages={"onnxruntime-gpu": "1.31.1"},
    available=(TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER),
    cuda_version="13.0",
    driver_cuda="13.1",
    missing_libraries=(),
    device_count=2,
    tensorrt_library=False,
)


@pytest.mark.parametrize(
    ("fault", "named"),
    [
        (replace(GPU_SERVER, driver_cuda=None, device_count=0), "no NVIDIA driver (libcuda.so.1 cannot be loaded)"),
        (replace(GPU_SERVER, driver_cuda="12.4"), "the NVIDIA driver supports CUDA up to 12.4, onnxruntime-gpu is"),
        (replace(GPU_SERVER, missing_libraries=("libcudnn.so.9",)), "libcudnn.so.9 not found"),
        (replace(GPU_SERVER, device_count=0), "no CUDA device visible"),
        (replace(GPU_SERVER, device_count=1), "device_id 1 but 1 CUDA device(s) visible"),
        (replace(GPU_SERVER, packages={"onnxruntime": "1.32.0", "onnxruntime-gpu": "1.31.1"}), "are both installed"),
        (
            replace(GPU_SERVER, available=(CPU_PROVIDER,), packages={"onnxruntime": "1.32.0"}),
            "onnxruntime-gpu is not installed",
        ),
    ],
)
def test_each_missing_piece_is_named(fault: CudaFacts, named: str) -> None:
    settings = RuntimeSettings(device=Device.CUDA, device_id=1)
    strict = choose_providers(settings, fault)
    assert strict.provider is None and strict.problem is not None and named in strict.problem
    relaxed = choose_providers(replace(settings, device=Device.AUTO), fault)
    assert relaxed.provider == CPU_PROVIDER and relaxed.problem is None and named in relaxed.reason


def test_a_complete_gpu_server_gets_cuda_with_its_device_and_memory_limit() -> None:
    settings = RuntimeSettings(device=Device.CUDA, device_id=1, gpu_mem_limit_mb=2048)
    report = choose_providers(settings, GPU_SERVER)
    assert report.problem is None and report.provider == CUDA_PROVIDER
    assert report.providers == (
        (CUDA_PROVIDER, {"device_id": "1", "gpu_mem_limit": str(2048 * 1024 * 1024)}),
        (CPU_PROVIDER, {}),
    )
    assert "CUDA device 1" in report.reason


def test_tensorrt_goes_first_only_where_its_library_is_installed(tmp_path: Path) -> None:
    settings = RuntimeSettings(device=Device.AUTO, tensorrt=True, engine_cache_dir=tmp_path / "engines")
    without = choose_providers(settings, GPU_SERVER)
    assert without.provider == CUDA_PROVIDER and "TensorRT wanted but libnvinfer.so.10" in without.reason
    with_library = choose_providers(settings, replace(GPU_SERVER, tensorrt_library=True))
    assert with_library.provider == TENSORRT_PROVIDER
    options = dict(with_library.providers)[TENSORRT_PROVIDER]
    assert options["trt_engine_cache_enable"] == "True"
    assert options["trt_engine_cache_path"] == str(tmp_path / "engines")
    assert [name for name, _ in with_library.providers] == [TENSORRT_PROVIDER, CUDA_PROVIDER, CPU_PROVIDER]


def test_the_libraries_follow_the_cuda_major_the_runtime_was_built_for() -> None:
    assert cuda_libraries("12.8") == (
        "libcudart.so.12",
        "libcublasLt.so.12",
        "libcublas.so.12",
        "libcurand.so.10",
        "libcufft.so.11",
        "libcudnn.so.9",
    )
    assert "libcudart.so.13" in cuda_libraries("13.0") and "libcufft.so.12" in cuda_libraries("13.0")
