"""What the node agent tells the master about its GPUs, and the GPU checks around a job's start and end.

Every sample (once per heartbeat) each compute process on a GPU is attributed
to the zmgpu job that started it, read from the ``ZMGPU_JOB_ID`` mark in its
environment, or else counted as *foreign*: a colleague's notebook, a stray
process.  The node's policy decides when foreign use makes a GPU busy for a
new exclusive job: ``exclusive`` (any foreign process) or ``threshold`` (foreign
memory above a limit).  Jobs that declared ``--gpu-mem`` share a GPU while what
they declared, plus the foreign use, plus a reserve, fits in its memory.

Only what changed goes to the master (:meth:`Telemetry.changes`), with a small
dead band on the numbers that wander (memory, utilization, temperature), so a
thousand idle nodes cost the master almost nothing.

Release check: once a job rank has ended, its GPUs are looked at again; any of
the job's processes still listed there makes the GPU *dirty* (the master gives
it to no one) and is killed again, until NVML lists none of them.  On real GPUs
a cancelled job's CUDA process is often still listed for a moment while the
driver takes its memory back, so a GPU dirty for a moment is routine (an INFO
line); one still dirty after :data:`DIRTY_WARN_AFTER` seconds gets a warning.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

from ..model import foreign_pids, gpu_room
from .gpus import GpuSample, GpuSource
from .sweep import proc_start_time, read_job_mark

#: Changes smaller than these are not worth a message (MiB, percent, degrees C).
DEAD_BAND = {"used_mb": 64, "foreign_mb": 64, "utilization": 5, "temperature": 2}
#: Every this many samples the master hears every field again, whatever it heard before: a change lost
#: on the way (a dropped heartbeat, a reconnect) cannot stay wrong for long.
FULL_REPORT_EVERY = 60
#: Seconds a GPU may stay dirty before the log warns of it: past the driver's usual clean-up of an ended process.
DIRTY_WARN_AFTER = 5.0


@dataclass(frozen=True)
class Policy:
    """The node's YAML on foreign processes and sharing."""

    foreign: str = "exclusive"          # or "threshold"
    threshold_mb: int = 1024            # foreign memory above which a GPU is busy (threshold policy)
    reserve_mb: int = 512               # kept free on a GPU shared by --gpu-mem jobs

    def busy(self, foreign_pids: int, foreign_mb: int) -> bool:
        """Is a GPU with this foreign use taken for a new exclusive job?"""
        if self.foreign == "threshold":
            return foreign_mb > self.threshold_mb
        return foreign_pids > 0

    def to_dict(self) -> dict:
        return {"foreign_policy": self.foreign, "foreign_threshold_mb": self.threshold_mb,
                "gpu_mem_reserve_mb": self.reserve_mb}


@dataclass
class DirtyGpu:
    """A GPU that still lists processes of a job that ended there."""

    job_id: str
    warn_at: float | None      # when (monotonic) to warn that it is still dirty; None: warned already


class Telemetry:
    """The agent's view of its GPUs: samples, attribution, dirty GPUs, and the deltas owed to the master."""

    def __init__(self, source: GpuSource, policy: Policy, log: logging.Logger):
        self.source = source
        self.policy = policy
        self.log = log
        self.devices = source.devices()
        self.memory = {gpu.index: gpu.memory_mb for gpu in self.devices}
        self.owners: dict[int, tuple[int | None, str | None]] = {}  # pid -> (start time, job id or None)
        self.dirty: dict[int, DirtyGpu] = {}   # GPU index -> the ended job whose processes still hold it
        self.current: dict[int, dict] = {}     # GPU index -> its state as of the last sample
        self.sent: dict[int, dict] = {}        # GPU index -> its state as the master last heard it
        self.samples = 0
        self.sample()

    # -- sampling -----------------------------------------------------------------------

    def sample(self) -> dict[int, dict]:
        """Read every GPU now; the per-GPU state dicts (the wire form)."""
        samples = self.source.sample()
        self.current = {s.index: self._state(s) for s in samples if s.index in self.memory}
        self._forget_owners({p["pid"] for state in self.current.values() for p in state["processes"]})
        self.samples += 1
        if self.samples % FULL_REPORT_EVERY == 0:
            self.sent.clear()
        return self.current

    def _look(self, indices: list[int]) -> None:
        """A quick fresh look at some GPUs' memory and processes, around a job's start or end.

        What is not read again (utilization, temperature, health) keeps its last value.
        """
        for sample in self.source.sample(indices):
            state = self.current.get(sample.index)
            if state is not None:
                fresh = self._state(sample)
                state.update((k, fresh[k]) for k in ("used_mb", "processes", "foreign_mb", "busy", "dirty"))

    def _state(self, sample: GpuSample) -> dict:
        processes = [{"pid": p.pid, "used_mb": p.used_mb, "job_id": self.owner(p.pid)} for p in sample.processes]
        foreign = [p for p in processes if p["job_id"] is None]
        ours_mb = sum(p["used_mb"] for p in processes if p["job_id"] is not None)
        foreign_mb = max(0, sample.used_mb - ours_mb)
        return {"used_mb": sample.used_mb, "utilization": sample.utilization, "temperature": sample.temperature,
                "processes": processes, "foreign_mb": foreign_mb,
                "busy": self.policy.busy(len(foreign), foreign_mb),
                "healthy": sample.unhealthy is None, "health": sample.unhealthy,
                "dirty": self.dirty_job(sample.index)}

    def owner(self, pid: int) -> str | None:
        """The zmgpu job a GPU process belongs to, None for a foreign one.

        Remembered per pid and start time: a process that has died (NVML may still
        list it while the driver lets go of its memory) keeps the owner it had.
        """
        start = proc_start_time(pid)
        known = self.owners.get(pid)
        if known is not None and (start is None or known[0] == start):
            return known[1]
        job_id = read_job_mark(pid) if start is not None else None
        self.owners[pid] = (start, job_id)
        return job_id

    def _forget_owners(self, listed: set[int]) -> None:
        for pid in self.owners.keys() - listed:
            del self.owners[pid]

    def job_memory(self, job_id: str, indices: list[int]) -> int:
        """MiB the job's processes use on the most loaded of ``indices``, as of the last sample."""
        return max((sum(p["used_mb"] for p in self.current.get(i, {}).get("processes", ()) if p["job_id"] == job_id)
                    for i in indices), default=0)

    # -- what the master hears -------------------------------------------------------------

    def snapshot(self) -> dict[str, dict]:
        """Every GPU's full state, for the REGISTER; from now on only changes are sent."""
        self.sent = {i: dict(state) for i, state in self.current.items()}
        return {str(i): state for i, state in self.current.items()}

    def changes(self) -> dict[str, dict]:
        """The fields that changed (beyond the dead band) since the master last heard; {} when none.

        They count as heard only once :meth:`delivered` says so: a heartbeat that could not be sent
        leaves them owed.
        """
        out = {}
        for index, state in self.current.items():
            before = self.sent.get(index, {})
            delta = {k: v for k, v in state.items() if _moved(k, before.get(k), v)}
            if delta:
                out[str(index)] = delta
        return out

    def delivered(self, changes: dict[str, dict]) -> None:
        """``changes`` went out to the master."""
        for key, delta in changes.items():
            self.sent.setdefault(int(key), {}).update(delta)

    def report_in_full(self, indices: list[int]) -> None:
        """The master's view of these GPUs may be off by the dead band: the next changes carry all of it."""
        for index in indices:
            self.sent.pop(index, None)

    def dirty_for(self, job_id: str, indices: list[int]) -> list[int]:
        """Which of ``indices`` are dirty with ``job_id``'s processes now."""
        return [i for i in indices if self.dirty_job(i) == job_id]

    def dirty_job(self, index: int) -> str | None:
        """The job whose processes keep GPU ``index`` dirty; None when it is clean."""
        dirty = self.dirty.get(index)
        return dirty.job_id if dirty is not None else None

    # -- around a job ------------------------------------------------------------------------

    def refuse_start(self, indices: list[int], gpu_mem_mb: int | None, declared: dict[int, int]) -> str | None:
        """Why a rank must not start on ``indices`` now (a fresh look), or None.

        ``declared`` is the --gpu-mem the shared ranks running here declared, per GPU.
        """
        if not indices:
            return None
        self._look(indices)
        for index in indices:
            state = self.current.get(index)
            if state is None:
                continue
            if state["dirty"]:
                return f"GPU {index} still holds processes of job {state['dirty']}"
            if gpu_mem_mb is None:
                if state["busy"]:
                    return f"GPU {index} is in use by others ({_describe_foreign(state)})"
                continue
            room = gpu_room(self.memory[index], self.policy.reserve_mb, state["foreign_mb"], declared.get(index, 0))
            if gpu_mem_mb > room:
                return (f"GPU {index} has {max(room, 0)} MiB left for --gpu-mem jobs, {gpu_mem_mb} MiB asked "
                        f"(others use {state['foreign_mb']} MiB)")
        return None

    def release_check(self, job_id: str, indices: list[int]) -> list[int]:
        """After a rank of ``job_id`` ended: the GPUs its processes still hold (now dirty); those are killed again."""
        if not indices:
            return []
        self._look(indices)
        held = [i for i in indices if any(p["job_id"] == job_id for p in self.current.get(i, {}).get("processes", ()))]
        if held:
            warn_at = time.monotonic() + DIRTY_WARN_AFTER
            for index in held:
                # Another rank of the same job ending there (--per-gpu) neither restarts the wait nor warns again.
                if self.dirty_job(index) != job_id:
                    self.dirty[index] = DirtyGpu(job_id, warn_at)
                self.current[index]["dirty"] = job_id
            killed = self._kill_leftovers(job_id, held)
            self.log.info("job %s ended but GPU(s) %s still list its processes: marked dirty (not given to any "
                          "job until clean); SIGKILL to %d process(es) of it", job_id, ",".join(map(str, held)),
                          killed)
        return held

    def recheck_dirty(self) -> list[int]:
        """Look at the dirty GPUs again; the ones now clean (their state in :attr:`current` is updated)."""
        if not self.dirty:
            return []
        self._look(sorted(self.dirty))
        clean = []
        for index, dirty in list(self.dirty.items()):
            job_id, state = dirty.job_id, self.current.get(index, {})
            left = [p["pid"] for p in state.get("processes", ()) if p["job_id"] == job_id]
            if left:
                self._kill_leftovers(job_id, [index])
                if dirty.warn_at is not None and time.monotonic() >= dirty.warn_at:
                    dirty.warn_at = None
                    self.log.warning("GPU %d still lists process(es) %s of job %s over %g s after it ended: "
                                     "not given to any job until they are gone", index,
                                     ", ".join(map(str, left)), job_id, DIRTY_WARN_AFTER)
                continue
            del self.dirty[index]
            state["dirty"] = None
            clean.append(index)
            self.log.info("GPU %d is clean again: no process of job %s is left on it", index, job_id)
        return clean

    def _kill_leftovers(self, job_id: str, indices: list[int]) -> int:
        """SIGKILL the processes of ``job_id`` listed on ``indices``, and only those: the job's other ranks
        (--per-gpu) or a later attempt on other GPUs of this node run on.  How many were signalled."""
        killed = 0
        for index in indices:
            for proc in self.current.get(index, {}).get("processes", ()):
                if proc["job_id"] != job_id:
                    continue    # another job's, or foreign: never read, never signalled
                start = proc_start_time(proc["pid"])
                known = self.owners.get(proc["pid"])
                # Still the very process that was seen with the job's mark (not a new one given its pid).
                if start is not None and known and known[0] == start:
                    try:
                        os.kill(proc["pid"], signal.SIGKILL)
                        killed += 1
                    except (ProcessLookupError, PermissionError):
                        pass
        return killed


def _moved(key: str, before, after) -> bool:
    band = DEAD_BAND.get(key)
    if band is None or before is None or after is None:
        return before != after
    return abs(after - before) >= band


def _describe_foreign(state: dict) -> str:
    pids = [str(pid) for pid in foreign_pids(state)]
    who = f"pid {', '.join(pids[:3])}{' ...' if len(pids) > 3 else ''}" if pids else "no listed process"
    return f"{who}, {state['foreign_mb']} MiB"
