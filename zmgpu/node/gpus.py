"""The GPUs a node offers: read through NVML (the ``pynvml`` module), or simulated.

NVML missing is normal on a CPU machine: the node says so once and offers no
GPUs, and CPU jobs still run.  Simulated GPUs stand in for hardware where there
is none, and are marked as simulated wherever they are listed.
"""

from __future__ import annotations

import logging

from ..model import GpuInfo

SIMULATED_NAME = "Simulated GPU"
SIMULATED_MEMORY_MB = 16384

_MIB = 1024 * 1024


class NvmlUnavailable(Exception):
    """NVML cannot be used on this machine; the message says why."""


def _text(value) -> str:
    """pynvml returns bytes in older releases and str in newer ones."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _nvml():
    """The initialised ``pynvml`` module; the caller must call ``nvmlShutdown``."""
    try:
        import pynvml  # lazily: only nodes that look for real GPUs need it
    except ImportError:
        raise NvmlUnavailable("the pynvml module (package nvidia-ml-py) is not installed") from None
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        raise NvmlUnavailable(str(exc) or type(exc).__name__) from None
    return pynvml


def _read_nvml(log: logging.Logger) -> list[GpuInfo]:
    """Every GPU NVML can describe; a device NVML cannot read is skipped with a warning."""
    pynvml = _nvml()
    try:
        try:
            count = pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(f"cannot count devices: {exc}") from None
        gpus = []
        for index in range(count):
            try:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
                gpus.append(GpuInfo(
                    index=index,
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                    memory_mb=int(pynvml.nvmlDeviceGetMemoryInfo(handle).total) // _MIB,
                ))
            except pynvml.NVMLError as exc:
                log.warning("GPU %d cannot be read through NVML (%s); it is not offered", index, exc)
        return gpus
    finally:
        pynvml.nvmlShutdown()


def simulated(count: int, node_id: str) -> list[GpuInfo]:
    """``count`` simulated GPUs with UUIDs unique to this node."""
    return [GpuInfo(index=i, name=SIMULATED_NAME, uuid=f"SIM-{node_id}-{i}",
                    memory_mb=SIMULATED_MEMORY_MB, simulated=True)
            for i in range(count)]


def discover(simulate: int | None, node_id: str, log: logging.Logger) -> list[GpuInfo]:
    """The GPUs this node offers: ``simulate`` simulated ones when set, else NVML's."""
    if simulate is not None:
        return simulated(simulate, node_id)
    try:
        return _read_nvml(log)
    except NvmlUnavailable as exc:
        log.warning("NVML is not available (%s): this node offers no GPUs; CPU jobs (--gpus 0) "
                    "still run here; use --simulate-gpus N to rehearse without NVIDIA hardware", exc)
        return []


def nvml_device_count() -> int:
    """How many GPUs NVML sees; 0 when NVML is not available."""
    try:
        pynvml = _nvml()
    except NvmlUnavailable:
        return 0
    try:
        return pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError:
        return 0
    finally:
        pynvml.nvmlShutdown()
