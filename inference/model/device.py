"""Which ONNX Runtime execution provider the node's sessions get, and why, in words for ``/ready``.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` even where the NVIDIA driver or a CUDA library is missing; a
session then logs an error and runs on the CPU. So the pieces CUDA needs are checked one by one before a session is
made (the runtime package, the driver and the CUDA version it supports, the CUDA/cuDNN libraries, a visible device),
and the first one missing is named. With ``device = cuda`` that is a problem (the node is not ready); with ``auto``
the node runs on the CPU and says why.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import metadata
from pathlib import Path
from typing import Any

from radfed.inference.errors import RadfedError

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
RUNTIME_PACKAGES = ("onnxruntime", "onnxruntime-gpu")
DRIVER_LIBRARY = "libcuda.so.1"
TENSORRT_LIBRARY = "libnvinfer.so.10"


class Device(StrEnum):
    """The device a node wants its models on (``[inference] device``)."""

    CPU = "cpu"
    CUDA = "cuda"  # the GPU or not ready
    AUTO = "auto"  # the GPU when every piece is there, else the CPU with the reason stated


class DeviceUnavailableError(RadfedError, RuntimeError):
    """``device = cuda`` and CUDA cannot be used here; the message names the missing piece."""


@dataclass(frozen=True)
class RuntimeSettings:
    """How the node runs its ONNX models (``[inference]`` in the node's configuration)."""

    device: Device = Device.AUTO
    device_id: int = 0
    gpu_mem_limit_mb: int | None = None  # the CUDA arena's limit; None: ONNX Runtime's default (no limit)
    tensorrt: bool = False  # TensorRT ahead of CUDA where its libraries are installed
    engine_cache_dir: Path | None = None  # TensorRT engines, built once per model (the node's state folder)
    batch_windows: int = 4  # sliding windows per ONNX run
    warmup: bool = True  # one run at activation, so the first study does not pay for CUDA/cuDNN set-up
    fp16: bool = False  # on a GPU provider, the artifact's float16 copy when it carries one
    intra_op_threads: int | None = None


@dataclass(frozen=True)
class CudaFacts:
    """What this machine offers CUDA-wise, gathered by :func:`gather_facts` (tests build one to name a fault)."""

    packages: dict[str, str]  # installed runtime distributions -> version
    available: tuple[str, ...]  # onnxruntime.get_available_providers()
    cuda_version: str = ""  # the CUDA the installed runtime was built for; "" for a CPU build
    driver_cuda: str | None = None  # the newest CUDA the NVIDIA driver supports ("12.4"); None: no driver
    missing_libraries: tuple[str, ...] = ()
    device_count: int = 0
    tensorrt_library: bool = False


@dataclass(frozen=True)
class DeviceReport:
    """The provider chosen for a wanted device and why; ``problem`` is set when the wanted device cannot be had."""

    wanted: Device
    provider: str | None  # the first provider of the sessions; None: none acceptable (cuda wanted, not usable)
    reason: str
    problem: str | None = None
    providers: tuple[tuple[str, dict[str, str]], ...] = field(default=(), repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {"wanted": self.wanted.value, "provider": self.provider, "reason": self.reason, "problem": self.problem}


def _major(version: str) -> int | None:
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def cuda_libraries(cuda_version: str) -> tuple[str, ...]:
    """The CUDA and cuDNN libraries ONNX Runtime's CUDA provider loads, for the CUDA major it was built for."""
    major = _major(cuda_version) or 12
    cufft = 11 if major == 12 else major - 1  # cuFFT 11 ships with CUDA 12, 12 with CUDA 13
    return (
        f"libcudart.so.{major}",
        f"libcublasLt.so.{major}",
        f"libcublas.so.{major}",
        "libcurand.so.10",
        f"libcufft.so.{cufft}",
        "libcudnn.so.9",
    )


def _loadable(name: str) -> bool:
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def _driver() -> tuple[str | None, int]:
    """The newest CUDA the driver supports and how many devices it shows (cuInit honours CUDA_VISIBLE_DEVICES)."""
    try:
        cuda = ctypes.CDLL(DRIVER_LIBRARY)
    except OSError:
        return None, 0
    version, count = ctypes.c_int(0), ctypes.c_int(0)
    if cuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None, 0
    supported = f"{version.value // 1000}.{version.value % 1000 // 10}"
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return supported, 0
    return supported, count.value


def gather_facts() -> CudaFacts:
    """Look at the installed runtime and, for a GPU build, the driver, libraries and devices."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    packages = {}
    for name in RUNTIME_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    available = tuple(ort.get_available_providers())
    cuda_version = str(getattr(ort, "cuda_version", "") or "")
    if CUDA_PROVIDER not in available:
        return CudaFacts(packages, available, cuda_version)
    preload = getattr(ort, "preload_dlls", None)  # the CUDA/cuDNN libraries of NVIDIA's wheels (onnxruntime 1.21+)
    if preload is not None:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):  # it prints what it misses
            preload()
    driver_cuda, count = _driver()
    missing = tuple(name for name in cuda_libraries(cuda_version) if not _loadable(name))
    return CudaFacts(packages, available, cuda_version, driver_cuda, missing, count, _loadable(TENSORRT_LIBRARY))


def _why_not_cuda(facts: CudaFacts, device_id: int) -> str | None:
    """The first missing piece, in words; None when CUDA can be used."""
    cpu_version = facts.packages.get("onnxruntime")
    if cpu_version and "onnxruntime-gpu" in facts.packages:
        return (
            f"onnxruntime {cpu_version} and onnxruntime-gpu {facts.packages['onnxruntime-gpu']} are both installed "
            "(one module, the CPU package's files win): pip uninstall -y onnxruntime onnxruntime-gpu, then install "
            "radfed[gpu]"
        )
    if CUDA_PROVIDER not in facts.available:
        if "onnxruntime-gpu" not in facts.packages:
            return (
                f"onnxruntime-gpu is not installed (onnxruntime {cpu_version or '?'} is the CPU build): install "
                "radfed[gpu]"
            )
        return f"onnxruntime-gpu offers no {CUDA_PROVIDER} (available: {', '.join(facts.available)})"
    if facts.driver_cuda is None:
        return f"no NVIDIA driver ({DRIVER_LIBRARY} cannot be loaded)"
    built, driver = _major(facts.cuda_version), _major(facts.driver_cuda)
    if built is not None and driver is not None and driver < built:
        return (
            f"the NVIDIA driver supports CUDA up to {facts.driver_cuda}, onnxruntime-gpu is built for CUDA "
            f"{facts.cuda_version}: update the driver"
        )
    if facts.missing_libraries:
        return (
            f"{', '.join(facts.missing_libraries)} not found (radfed[gpu] brings them as NVIDIA wheels; or put CUDA "
            f"{facts.cuda_version or '12'} and cuDNN 9 on LD_LIBRARY_PATH)"
        )
    if facts.device_count == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        return "no CUDA device visible" + (f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else "")
    if device_id >= facts.device_count:
        return f"device_id {device_id} but {facts.device_count} CUDA device(s) visible"
    return None


def _gpu_providers(settings: RuntimeSettings, tensorrt: bool) -> tuple[tuple[str, dict[str, str]], ...]:
    cuda = {"device_id": str(settings.device_id)}
    if settings.gpu_mem_limit_mb:
        cuda["gpu_mem_limit"] = str(settings.gpu_mem_limit_mb * 1024 * 1024)
    chosen: list[tuple[str, dict[str, str]]] = []
    if tensorrt:
        options = {"device_id": str(settings.device_id)}
        if settings.engine_cache_dir is not None:
            cache = str(settings.engine_cache_dir)
            options |= {"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache}
            options |= {"trt_timing_cache_enable": "True", "trt_timing_cache_path": cache}
        chosen.append((TENSORRT_PROVIDER, options))
    # CPU last: operators a GPU provider lacks run there (a session never falls back to it as a whole)
    return (*chosen, (CUDA_PROVIDER, cuda), (CPU_PROVIDER, {}))


def choose_providers(settings: RuntimeSettings, facts: CudaFacts) -> DeviceReport:
    """The providers for the wanted device on a machine described by ``facts``."""
    cpu_only: tuple[tuple[str, dict[str, str]], ...] = ((CPU_PROVIDER, {}),)
    if settings.device is Device.CPU:
        return DeviceReport(settings.device, CPU_PROVIDER, "device = cpu in the node's settings", None, cpu_only)
    missing = _why_not_cuda(facts, settings.device_id)
    if missing is not None:
        if settings.device is Device.CUDA:
            problem = f"{CUDA_PROVIDER} requested (device = cuda) but {missing}"
            return DeviceReport(settings.device, None, problem, problem)
        return DeviceReport(
            settings.device, CPU_PROVIDER, f"device = auto and CUDA cannot be used: {missing}", None, cpu_only
        )
    reason = f"CUDA device {settings.device_id} (runtime built for CUDA {facts.cuda_version or '?'}, driver supports "
    reason += f"{facts.driver_cuda})"
    tensorrt = settings.tensorrt and TENSORRT_PROVIDER in facts.available and facts.tensorrt_library
    if settings.tensorrt and not tensorrt:
        reason += f"; TensorRT wanted but {TENSORRT_LIBRARY} or its provider is missing"
    providers = _gpu_providers(settings, tensorrt)
    return DeviceReport(settings.device, providers[0][0], reason, None, providers)


def probe_device(settings: RuntimeSettings) -> DeviceReport:
    """The start-up check: :func:`choose_providers` on this machine's facts."""
    return choose_providers(settings, gather_facts())
