"""GPU discovery of the node agent, against a stand-in ``pynvml`` module (GPU hardware is the one thing faked)."""

from __future__ import annotations

import logging
import sys
import types
from dataclasses import dataclass, field

import pytest

from zmgpu.model import GpuInfo
from zmgpu.node import gpus

MIB = 1024 * 1024
LOG = logging.getLogger("test.gpus")


class NVMLError(Exception):
    """Stands in for pynvml.NVMLError."""


class NVMLError_LibraryNotFound(NVMLError):
    def __str__(self):
        return "NVML Shared Library Not Found"


@dataclass
class Device:
    name: str | bytes
    uuid: str | bytes
    total: int
    broken: bool = False


@dataclass
class FakeNvml:
    """The few NVML calls the agent makes, over a list of devices; records init and shutdown."""

    devices: list[Device] = field(default_factory=list)
    init_error: Exception | None = None
    calls: list[str] = field(default_factory=list)

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        mod.NVMLError = NVMLError
        mod.nvmlInit = self.init
        mod.nvmlShutdown = lambda: self.calls.append("shutdown")
        mod.nvmlDeviceGetCount = lambda: len(self.devices)
        mod.nvmlDeviceGetHandleByIndex = self.handle
        mod.nvmlDeviceGetName = lambda dev: dev.name
        mod.nvmlDeviceGetUUID = lambda dev: dev.uuid
        mod.nvmlDeviceGetMemoryInfo = lambda dev: types.SimpleNamespace(total=dev.total, free=0, used=0)
        return mod

    def init(self):
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error

    def handle(self, index):
        device = self.devices[index]
        if device.broken:
            raise NVMLError("GPU is lost")
        return device


@pytest.fixture
def nvml(monkeypatch):
    """Install a stand-in pynvml with two GPUs; tests may change its devices or make init fail."""
    fake = FakeNvml([Device("NVIDIA H200", "GPU-aaaa", 143771 * MIB),
                     Device("NVIDIA H200", "GPU-bbbb", 143771 * MIB)])
    monkeypatch.setitem(sys.modules, "pynvml", fake.module())
    return fake


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_nvml_gpus_are_listed_with_index_name_uuid_and_memory(nvml, caplog):
    found = gpus.discover(None, "node001", LOG)
    assert found == [GpuInfo(0, "NVIDIA H200", "GPU-aaaa", 143771, simulated=False),
                     GpuInfo(1, "NVIDIA H200", "GPU-bbbb", 143771, simulated=False)]
    assert nvml.calls == ["init", "shutdown"]
    assert warnings_of(caplog) == []


def test_bytes_from_older_pynvml_become_text(nvml):
    nvml.devices = [Device(b"Tesla V100-SXM2-16GB", b"GPU-cccc", 16384 * MIB)]
    [gpu] = gpus.discover(None, "node001", LOG)
    assert (gpu.name, gpu.uuid, gpu.memory_mb) == ("Tesla V100-SXM2-16GB", "GPU-cccc", 16384)
    assert isinstance(gpu.name, str) and isinstance(gpu.uuid, str)


def test_unreadable_gpu_is_skipped_with_a_warning(nvml, caplog):
    nvml.devices[0].broken = True
    found = gpus.discover(None, "node001", LOG)
    assert [g.uuid for g in found] == ["GPU-bbbb"]
    [warning] = warnings_of(caplog)
    assert "GPU 0" in warning and "GPU is lost" in warning
    assert nvml.calls == ["init", "shutdown"]


def assert_one_nvml_warning(caplog, reason: str) -> None:
    [warning] = warnings_of(caplog)
    assert "NVML is not available" in warning
    assert reason in warning
    assert "--gpus 0" in warning and "--simulate-gpus" in warning


def test_missing_pynvml_gives_no_gpus_and_one_warning(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "pynvml", None)   # makes `import pynvml` raise ImportError
    assert gpus.discover(None, "node001", LOG) == []
    assert_one_nvml_warning(caplog, "nvidia-ml-py")
    assert gpus.nvml_device_count() == 0


def test_missing_nvml_library_gives_no_gpus_and_one_warning(nvml, caplog):
    nvml.init_error = NVMLError_LibraryNotFound()
    assert gpus.discover(None, "node001", LOG) == []
    assert_one_nvml_warning(caplog, "NVML Shared Library Not Found")
    assert "shutdown" not in nvml.calls    # NVML was never initialised
    assert gpus.nvml_device_count() == 0


def test_nvml_device_count(nvml):
    assert gpus.nvml_device_count() == 2
    assert nvml.calls == ["init", "shutdown"]


@pytest.mark.parametrize("count", [0, 3])
def test_simulated_gpus_are_marked_and_leave_nvml_alone(nvml, caplog, count):
    found = gpus.discover(count, "node007", LOG)
    assert found == [GpuInfo(i, "Simulated GPU", f"SIM-node007-{i}", 16384, simulated=True)
                     for i in range(count)]
    assert all(gpu.to_dict()["simulated"] is True for gpu in found)
    assert nvml.calls == []
    assert warnings_of(caplog) == []
