"""The GPUs a node offers, and what is happening on them: NVML (the ``pynvml`` module), or simulated.

A :class:`GpuSource` lists the GPUs once (:meth:`GpuSource.devices`) and then
samples them as often as the agent asks (:meth:`GpuSource.sample`): memory
used, utilization, temperature, the compute processes on each GPU with their
memory, and health where NVML tells it (uncorrected ECC errors, a GPU lost).

NVML missing is normal on a CPU machine: the node says so once and offers no
GPUs, and CPU jobs still run.  Simulated GPUs stand in for hardware where there
is none, and are marked as simulated wherever they are listed.  They come as a
count (idle GPUs that never change) or as a YAML file that is read again at
every sample, so tests, and users rehearsing a policy, can change memory use,
foreign processes and health while the agent runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from ..model import GpuInfo, has_type, is_count

SIMULATED_NAME = "Simulated GPU"
SIMULATED_MEMORY_MB = 16384

_MIB = 1024 * 1024
#: NVML's error code for a GPU that fell off the bus (NVML_ERROR_GPU_IS_LOST).
_GPU_IS_LOST = 15
#: NVML's answers from a driver without the version-2 memory call: not supported, function not found,
#: argument version mismatch.
_NO_MEMORY_V2 = frozenset({3, 13, 25})


class NvmlUnavailable(Exception):
    """NVML cannot be used on this machine; the message says why."""


class SimulationError(Exception):
    """A simulated-GPU file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class GpuProcess:
    """A compute process on a GPU, as NVML lists it."""

    pid: int
    used_mb: int


@dataclass
class GpuSample:
    """One GPU at one moment."""

    index: int
    used_mb: int = 0
    utilization: int | None = None     # percent of time a kernel ran, over NVML's last sample period
    temperature: int | None = None     # degrees C
    processes: list[GpuProcess] = field(default_factory=list)
    unhealthy: str | None = None       # why NVML says the GPU cannot be trusted; None when healthy


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


class GpuSource:
    """GPUs and their samples; the base class is a node with none."""

    def devices(self) -> list[GpuInfo]:
        return []

    def sample(self, indices=None) -> list[GpuSample]:
        """Every GPU now, or only those ``indices`` with only their memory and processes (a quick look)."""
        return []

    def close(self) -> None:
        """Let go of the driver (NVML) if one is held."""


class NvmlSource(GpuSource):
    """Real GPUs through NVML, initialised once for the life of the agent."""

    def __init__(self, log: logging.Logger):
        self.log = log
        self.nvml = _nvml()
        self.handles: dict[int, object] = {}
        self.info: list[GpuInfo] = []
        self._warned: set[tuple[int, str]] = set()
        self._memory_kw: dict | None = None    # nvmlDeviceGetMemoryInfo's keywords, once known (see _memory)
        try:
            count = self.nvml.nvmlDeviceGetCount()
        except self.nvml.NVMLError as exc:
            self.close()
            raise NvmlUnavailable(f"cannot count devices: {exc}") from None
        for index in range(count):
            try:
                handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
                memory = self._memory(handle)
                self.info.append(GpuInfo(
                    index=index,
                    name=_text(self.nvml.nvmlDeviceGetName(handle)),
                    uuid=_text(self.nvml.nvmlDeviceGetUUID(handle)),
                    memory_mb=(int(memory.total) - int(getattr(memory, "reserved", 0))) // _MIB,
                ))
                self.handles[index] = handle
            except self.nvml.NVMLError as exc:
                log.warning("GPU %d cannot be read through NVML (%s); it is not offered", index, exc)

    def devices(self) -> list[GpuInfo]:
        return list(self.info)

    def _memory(self, handle):
        """A GPU's memory figures, in NVML's version 2 where the driver and pynvml have it.

        Version 1 counts as used what the driver reserves for itself (about 600 MiB of an idle H200): an
        idle GPU would look in use, and that memory would pass for a foreign process's.  Version 2 gives it
        apart, as nvidia-smi does, so a GPU offers its total less that reserve and shows nvidia-smi's used
        memory.  Which one works is learnt from the first answer that tells (a GPU's own error does not).
        """
        nvml = self.nvml
        if self._memory_kw is None:
            version = {"version": getattr(nvml, "nvmlMemory_v2", None)}
            try:
                if version["version"] is not None:
                    memory = nvml.nvmlDeviceGetMemoryInfo(handle, **version)
                    self._memory_kw = version
                    return memory
            except TypeError:       # a pynvml without the keyword
                pass
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) not in _NO_MEMORY_V2:
                    raise
            self._memory_kw = {}
        return nvml.nvmlDeviceGetMemoryInfo(handle, **self._memory_kw)

    def sample(self, indices=None) -> list[GpuSample]:
        if indices is None:
            return [self._sample(index, handle, quick=False) for index, handle in self.handles.items()]
        return [self._sample(index, self.handles[index], quick=True) for index in indices if index in self.handles]

    def _sample(self, index: int, handle, quick: bool) -> GpuSample:
        """One GPU's sample; a call NVML does not support leaves its field unknown."""
        nvml = self.nvml
        sample = GpuSample(index)
        try:
            sample.used_mb = int(self._memory(handle).used) // _MIB
            sample.processes = [GpuProcess(int(p.pid), int(p.usedGpuMemory or 0) // _MIB)
                                for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)]
        except nvml.NVMLError as exc:
            if _lost(exc):
                sample.unhealthy = "the GPU is lost (NVML cannot reach it)"
                return sample
            self._warn_once(index, "memory and processes", exc)
        if quick:
            return sample
        sample.utilization = self._optional(index, "utilization",
                                            lambda: nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        sample.temperature = self._optional(index, "temperature",
                                            lambda: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        ecc = self._optional(index, "ECC errors", lambda: nvml.nvmlDeviceGetTotalEccErrors(
            handle, nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC))
        if ecc:
            sample.unhealthy = f"{ecc} uncorrected ECC error(s) since the driver loaded"
        return sample

    def _optional(self, index: int, what: str, call):
        """``call()`` as an int, or None where this GPU does not support it (consumer GPUs have no ECC)."""
        try:
            return int(call())
        except self.nvml.NVMLError as exc:
            if not isinstance(exc, getattr(self.nvml, "NVMLError_NotSupported", ())):
                self._warn_once(index, what, exc)
            return None

    def _warn_once(self, index: int, what: str, exc) -> None:
        if (index, what) not in self._warned:
            self._warned.add((index, what))
            self.log.warning("GPU %d: NVML cannot read its %s (%s)", index, what, exc)

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError:
            pass


def _lost(exc) -> bool:
    return getattr(exc, "value", None) == _GPU_IS_LOST or type(exc).__name__ == "NVMLError_GpuIsLost"


class SimulatedSource(GpuSource):
    """``count`` idle simulated GPUs, or the GPUs a YAML file describes, read again at every sample."""

    def __init__(self, node_id: str, count: int = 0, path: str | None = None):
        self.path = path
        self.info = [GpuInfo(i, SIMULATED_NAME, f"SIM-{node_id}-{i}", SIMULATED_MEMORY_MB, True)
                     for i in range(count)]
        self.samples = [GpuSample(i) for i in range(count)]
        if path is not None:
            entries = self._read()
            self.info = [GpuInfo(i, str(e.get("name", SIMULATED_NAME)), f"SIM-{node_id}-{i}",
                                 int(e.get("memory_mb", SIMULATED_MEMORY_MB)), True)
                         for i, e in enumerate(entries)]
            self.samples = [_simulated_sample(i, e) for i, e in enumerate(entries)]

    def devices(self) -> list[GpuInfo]:
        return list(self.info)

    def sample(self, indices=None) -> list[GpuSample]:
        """The file as it is now; a file being rewritten (or broken) leaves the last good sample."""
        if self.path is not None:
            try:
                entries = self._read()
            except SimulationError:
                entries = None
            if entries is not None:
                self.samples = [_simulated_sample(i, e) for i, e in enumerate(entries[:len(self.info)])]
        # A quick look reads only the GPUs asked about, as NVML's does.
        return self.samples if indices is None else [s for s in self.samples if s.index in indices]

    def _read(self) -> list[dict]:
        import yaml  # lazily: only a node simulating GPUs from a file reads YAML here

        try:
            with open(self.path) as fh:
                data = yaml.safe_load(fh)
        except OSError as exc:
            raise SimulationError(f"{self.path}: cannot read the simulated GPUs: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise SimulationError(f"{self.path}: not valid YAML: {exc}") from None
        entries = data.get("gpus") if isinstance(data, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise SimulationError(f"{self.path}: key 'gpus' must be a list of mappings (name, memory_mb, "
                                  f"used_mb, foreign_pids, healthy)")
        for i, entry in enumerate(entries):
            _check_entry(self.path, i, entry)
        return entries


#: Keys of one simulated GPU, with the type each must have.
_SIMULATED_KEYS = {"name": str, "memory_mb": int, "used_mb": int, "foreign_pids": list, "processes": list,
                   "healthy": bool, "utilization": int, "temperature": int}


def _check_entry(path: str, index: int, entry: dict) -> None:
    for key, value in entry.items():
        kind = _SIMULATED_KEYS.get(key)
        if kind is None:
            raise SimulationError(f"{path}: gpus[{index}]: unknown key '{key}' "
                                  f"(known keys: {', '.join(_SIMULATED_KEYS)})")
        if not has_type(value, kind):
            raise SimulationError(f"{path}: gpus[{index}].{key} must be {kind.__name__}, got {value!r}")
    if not all(is_count(p) for p in entry.get("foreign_pids", [])):
        raise SimulationError(f"{path}: gpus[{index}].foreign_pids must be a list of process ids")
    if not all(isinstance(p, dict) and is_count(p.get("pid")) and is_count(p.get("used_mb", 0))
               for p in entry.get("processes", [])):
        raise SimulationError(f"{path}: gpus[{index}].processes must be a list of {{pid, used_mb}}")


def _simulated_sample(index: int, entry: dict) -> GpuSample:
    """``used_mb`` is memory outside the listed ``processes``; ``foreign_pids`` hold none of their own."""
    processes = [GpuProcess(pid, 0) for pid in entry.get("foreign_pids", [])]
    processes += [GpuProcess(p["pid"], p.get("used_mb", 0)) for p in entry.get("processes", [])]
    return GpuSample(index, used_mb=entry.get("used_mb", 0) + sum(p.used_mb for p in processes),
                     utilization=entry.get("utilization", 0), temperature=entry.get("temperature"),
                     processes=processes,
                     unhealthy=None if entry.get("healthy", True) else "simulated as unhealthy")


def open_source(simulate: str | None, node_id: str, log: logging.Logger) -> GpuSource:
    """The GPUs this node offers: ``simulate`` (a count or a YAML file) when set, else NVML's.

    Raises SimulationError for a simulated-GPU file that cannot be used.
    """
    if simulate is not None:
        if simulate.isdigit():
            return SimulatedSource(node_id, count=int(simulate))
        return SimulatedSource(node_id, path=os.path.abspath(simulate))
    try:
        return NvmlSource(log)
    except NvmlUnavailable as exc:
        log.warning("NVML is not available (%s): this node offers no GPUs; CPU jobs (--gpus 0) "
                    "still run here; use --simulate-gpus N to rehearse without NVIDIA hardware", exc)
        return GpuSource()


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
