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


class NVMLError_NotSupported(NVMLError):
    def __str__(self):
        return "Not Supported"


class NVMLError_GpuIsLost(NVMLError):
    value = 15

    def __str__(self):
        return "GPU is lost"


class NVMLError_FunctionNotFound(NVMLError):
    value = 13

    def __str__(self):
        return "Function Not Found"


@dataclass
class Device:
    name: str | bytes
    uuid: str | bytes
    total: int
    broken: bool = False
    used: int = 0
    utilization: int | None = 7           # None: not supported
    temperature: int = 41
    processes: list = field(default_factory=list)   # (pid, bytes or None)
    ecc: int | None = 0                   # None: not supported (a consumer GPU)
    lost: bool = False                    # fell off the bus after discovery
    reserved: int = 0                     # what the driver keeps for itself (version 1 counts it as used)


@dataclass
class FakeNvml:
    """The NVML calls the agent makes, over a list of devices; records init and shutdown."""

    devices: list[Device] = field(default_factory=list)
    init_error: Exception | None = None
    calls: list[str] = field(default_factory=list)
    memory_v2: str = "yes"                # or "old pynvml" (no such keyword), "old driver" (no such call)

    def module(self) -> types.ModuleType:
        mod = types.ModuleType("pynvml")
        mod.NVMLError = NVMLError
        mod.NVMLError_NotSupported = NVMLError_NotSupported
        mod.NVML_TEMPERATURE_GPU = 0
        mod.NVML_MEMORY_ERROR_TYPE_UNCORRECTED = 1
        mod.NVML_VOLATILE_ECC = 0
        mod.nvmlInit = self.init
        mod.nvmlShutdown = lambda: self.calls.append("shutdown")
        mod.nvmlDeviceGetCount = lambda: len(self.devices)
        mod.nvmlDeviceGetHandleByIndex = self.handle
        mod.nvmlDeviceGetName = lambda dev: dev.name
        mod.nvmlDeviceGetUUID = lambda dev: dev.uuid
        if self.memory_v2 == "old pynvml":
            mod.nvmlDeviceGetMemoryInfo = lambda dev: self.memory(dev)
        else:
            mod.nvmlMemory_v2 = 0x2000028
            mod.nvmlDeviceGetMemoryInfo = self.memory
        mod.nvmlDeviceGetComputeRunningProcesses = lambda dev: [
            types.SimpleNamespace(pid=pid, usedGpuMemory=mem) for pid, mem in self._alive(dev).processes]
        mod.nvmlDeviceGetUtilizationRates = lambda dev: types.SimpleNamespace(
            gpu=self._supported(self._alive(dev).utilization), memory=0)
        mod.nvmlDeviceGetTemperature = lambda dev, sensor: self._alive(dev).temperature
        mod.nvmlDeviceGetTotalEccErrors = lambda dev, kind, counter: self._supported(self._alive(dev).ecc)
        return mod

    def memory(self, dev: Device, version=None):
        """Version 1 counts the driver's reserve as used; version 2 gives it apart."""
        used = self._alive(dev).used
        if not version:
            return types.SimpleNamespace(total=dev.total, free=dev.total - dev.reserved - used,
                                         used=used + dev.reserved)
        if self.memory_v2 == "old driver":
            raise NVMLError_FunctionNotFound()
        return types.SimpleNamespace(version=version, total=dev.total, reserved=dev.reserved,
                                     free=dev.total - dev.reserved - used, used=used)

    @staticmethod
    def _alive(dev: Device) -> Device:
        if dev.lost:
            raise NVMLError_GpuIsLost()
        return dev

    @staticmethod
    def _supported(value):
        if value is None:
            raise NVMLError_NotSupported()
        return value

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


def discover(simulate=None, node_id="node001") -> list[GpuInfo]:
    """What a node would offer; NVML is let go of again, as the agent does when it stops."""
    source = gpus.open_source(simulate, node_id, LOG)
    try:
        return source.devices()
    finally:
        source.close()


def test_nvml_gpus_are_listed_with_index_name_uuid_and_memory(nvml, caplog):
    found = discover()
    assert found == [GpuInfo(0, "NVIDIA H200", "GPU-aaaa", 143771, simulated=False),
                     GpuInfo(1, "NVIDIA H200", "GPU-bbbb", 143771, simulated=False)]
    assert nvml.calls == ["init", "shutdown"]
    assert warnings_of(caplog) == []


def test_nvml_samples_memory_processes_utilization_temperature(nvml, caplog):
    nvml.devices[1] = Device("NVIDIA H200", "GPU-bbbb", 143771 * MIB, used=5000 * MIB, utilization=93,
                             temperature=67, processes=[(4242, 3000 * MIB), (4343, None)])
    source = gpus.open_source(None, "node001", LOG)
    idle, busy = source.sample()
    assert (idle.index, idle.used_mb, idle.processes, idle.unhealthy) == (0, 0, [], None)
    assert (busy.used_mb, busy.utilization, busy.temperature) == (5000, 93, 67)
    # A process whose memory NVML cannot tell (no accounting in a container) counts as 0 MiB.
    assert busy.processes == [gpus.GpuProcess(4242, 3000), gpus.GpuProcess(4343, 0)]
    assert warnings_of(caplog) == []
    source.close()
    assert nvml.calls == ["init", "shutdown"]


def test_unsupported_calls_leave_fields_unknown_without_warnings(nvml, caplog):
    nvml.devices[0].utilization = None
    nvml.devices[0].ecc = None
    [sample, _] = gpus.open_source(None, "node001", LOG).sample()
    assert sample.utilization is None and sample.temperature == 41 and sample.unhealthy is None
    assert warnings_of(caplog) == []


def test_ecc_errors_and_a_lost_gpu_make_it_unhealthy(nvml):
    source = gpus.open_source(None, "node001", LOG)
    nvml.devices[0].ecc = 2
    nvml.devices[1].lost = True
    ecc, lost = source.sample()
    assert "2 uncorrected ECC error" in ecc.unhealthy
    assert "lost" in lost.unhealthy


@pytest.mark.parametrize("v2", ["yes", "old pynvml", "old driver"])
def test_memory_as_nvidia_smi_counts_it_without_the_drivers_reserve(nvml, v2, monkeypatch):
    """Version 2 where there is one: the total less the driver's reserve, and only what is used in it."""
    nvml.memory_v2 = v2
    monkeypatch.setitem(sys.modules, "pynvml", nvml.module())
    nvml.devices = [Device("NVIDIA H200", "GPU-aaaa", 143771 * MIB, used=1000 * MIB, reserved=616 * MIB)]
    source = gpus.open_source(None, "node001", LOG)
    try:
        [gpu], [sample] = source.devices(), source.sample()
    finally:
        source.close()
    assert (gpu.memory_mb, sample.used_mb) == ((143155, 1000) if v2 == "yes" else (143771, 1616))


def test_a_gpu_lost_at_discovery_does_not_decide_the_memory_call_for_the_others(nvml, caplog):
    for device in nvml.devices:
        device.reserved = 616 * MIB
    nvml.devices[0].lost = True
    assert [(g.uuid, g.memory_mb) for g in discover()] == [("GPU-bbbb", 143155)]
    [warning] = warnings_of(caplog)
    assert "GPU 0" in warning and "GPU is lost" in warning


def test_bytes_from_older_pynvml_become_text(nvml):
    nvml.devices = [Device(b"Tesla V100-SXM2-16GB", b"GPU-cccc", 16384 * MIB)]
    [gpu] = discover()
    assert (gpu.name, gpu.uuid, gpu.memory_mb) == ("Tesla V100-SXM2-16GB", "GPU-cccc", 16384)
    assert isinstance(gpu.name, str) and isinstance(gpu.uuid, str)


def test_unreadable_gpu_is_skipped_with_a_warning(nvml, caplog):
    nvml.devices[0].broken = True
    found = discover()
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
    assert discover() == []
    assert_one_nvml_warning(caplog, "nvidia-ml-py")
    assert gpus.nvml_device_count() == 0


def test_missing_nvml_library_gives_no_gpus_and_one_warning(nvml, caplog):
    nvml.init_error = NVMLError_LibraryNotFound()
    assert discover() == []
    assert_one_nvml_warning(caplog, "NVML Shared Library Not Found")
    assert "shutdown" not in nvml.calls    # NVML was never initialised
    assert gpus.nvml_device_count() == 0


def test_nvml_device_count(nvml):
    assert gpus.nvml_device_count() == 2
    assert nvml.calls == ["init", "shutdown"]


@pytest.mark.parametrize("count", [0, 3])
def test_simulated_gpus_are_marked_and_leave_nvml_alone(nvml, caplog, count):
    found = discover(str(count), "node007")
    assert found == [GpuInfo(i, "Simulated GPU", f"SIM-node007-{i}", 16384, simulated=True)
                     for i in range(count)]
    assert all(gpu.to_dict()["simulated"] is True for gpu in found)
    assert nvml.calls == []
    assert warnings_of(caplog) == []


def test_a_quick_look_reads_only_memory_and_processes_of_the_gpus_asked(nvml):
    nvml.devices[1].processes = [(4242, 1000 * MIB)]
    source = gpus.open_source(None, "node001", LOG)
    [sample] = source.sample([1])
    assert (sample.index, sample.processes, sample.utilization, sample.temperature) == (
        1, [gpus.GpuProcess(4242, 1000)], None, None)
