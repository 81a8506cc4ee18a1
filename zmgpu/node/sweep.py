"""Find and signal every process of a job on this host, wherever in the process tree it went.

Signalling a rank's process group is not enough to stop a job: a child that
calls setsid (a PyTorch DataLoader worker, a daemonised server) leaves the
group, and one that ignores SIGTERM survives it, holding its GPU memory.  Such
processes keep the environment the rank gave them, which the runner marks with
the job id and the attempt, so reading ``/proc/<pid>/environ`` finds them.

Reading the environment of every process on the host costs milliseconds, so the
agent sweeps only when a job is being stopped (a KILL), never on a normal end.
Processes of other users cannot be read and are skipped: jobs run as the
agent's user.  :func:`proc_stat` is what /proc says of one process (its state
and start time), for telling a process from a later one with its pid;
:func:`boot_ticks` gives a start time in the same unit.  :class:`PendingKills`
holds the KILLs whose grace period runs, until what is left of them gets SIGKILL.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

#: Set in every rank's environment: the job id, and how many times the job was requeued before.
JOB_ID_VAR = "ZMGPU_JOB_ID"
ATTEMPT_VAR = "ZMGPU_RESTART_COUNT"

#: Rounds of SIGKILL at most: each one also catches what the previous round's victims forked meanwhile.
KILL_ROUNDS = 3


@dataclass(frozen=True)
class JobProcesses:
    """The processes of a job on this host: of one attempt, or of every attempt below ``below`` (None: all)."""

    job_id: str
    attempt: int | None = None
    below: int | None = None

    def __str__(self) -> str:
        if self.attempt:
            return f"job {self.job_id} (attempt {self.attempt})"
        if self.below is not None:
            return f"job {self.job_id} (attempts before {self.below})"
        return f"job {self.job_id}"

    def pids(self) -> list[int]:
        """Pids of the live processes (other than this one) that match."""
        mark = f"{JOB_ID_VAR}={self.job_id}".encode()
        me = os.getpid()
        found = []
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == me:
                continue
            entries = _environ(name)
            # A zombie's environment reads empty, so a process already ended never matches.
            if mark in entries and self._attempt_matches(entries):
                found.append(int(name))
        return found

    def _attempt_matches(self, entries: list[bytes]) -> bool:
        if self.attempt is None and self.below is None:
            return True
        value = _value(entries, ATTEMPT_VAR) or b""
        if not value.isdigit():
            return False
        attempt = int(value)
        return attempt == self.attempt if self.attempt is not None else attempt < self.below

    def terminate(self) -> int:
        """SIGCONT (a stopped process never sees a SIGTERM) and SIGTERM to every match; how many."""
        pids = self.pids()
        _signal(pids, signal.SIGCONT, signal.SIGTERM)
        return len(pids)

    def kill(self) -> int:
        """SIGKILL every match until none is found (or KILL_ROUNDS rounds); how many were killed."""
        killed = set()
        for _ in range(KILL_ROUNDS):
            pids = self.pids()
            if not pids:
                break
            _signal(pids, signal.SIGKILL)
            killed.update(pids)
        return len(killed)


@dataclass
class PendingKill:
    """A KILL in its grace period: at ``deadline`` whatever of the job is still running gets SIGKILL."""

    target: JobProcesses
    deadline: float             # monotonic


class PendingKills:
    """The node's KILLs in their grace period, by (job id, attempt or None: every attempt)."""

    def __init__(self):
        self.by_key: dict[tuple[str, int | None], PendingKill] = {}

    def start(self, job_id: str, attempt: int | None, grace: float, now: float) -> PendingKill:
        """The KILL of ``job_id`` (one attempt, or all): a new one, or one repeated, which keeps its first
        deadline unless attempts spared from it (see :meth:`spare`) are now to be stopped too."""
        target = JobProcesses(job_id, attempt)
        pending = self.by_key.get((job_id, attempt))
        if pending is None or pending.target != target:
            pending = self.by_key[(job_id, attempt)] = PendingKill(target, now + grace)
        return pending

    def spare(self, job_id: str, attempt: int) -> None:
        """A KILL of every attempt of a job came before this attempt was dispatched: it is not for this one."""
        pending = self.by_key.get((job_id, None))
        if pending is not None:
            below = attempt if pending.target.below is None else min(pending.target.below, attempt)
            pending.target = JobProcesses(job_id, below=below)
        self.by_key.pop((job_id, attempt), None)

    def due(self, now: float) -> list[JobProcesses]:
        """The KILLs whose grace period is over, now forgotten: what of them still runs is to get SIGKILL."""
        ended = [key for key, pending in self.by_key.items() if now >= pending.deadline]
        return [self.by_key.pop(key).target for key in ended]

    def deadlines(self) -> list[float]:
        """When each KILL's grace period ends (monotonic): the agent's poll never sleeps past one."""
        return [pending.deadline for pending in self.by_key.values()]


def read_job_mark(pid: int) -> str | None:
    """The zmgpu job id in a process's environment; None when it has none (or cannot be read)."""
    value = _value(_environ(pid), JOB_ID_VAR)
    return value.decode(errors="replace") if value is not None else None


def _environ(pid) -> list[bytes]:
    """A process's environment as ``NAME=value`` entries; none for one gone or another user's."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return fh.read().split(b"\0")
    except OSError:
        return []


def _value(entries: list[bytes], name: str) -> bytes | None:
    """The value of ``name`` among environment entries, or None."""
    prefix = f"{name}=".encode()
    return next((e[len(prefix):] for e in entries if e.startswith(prefix)), None)


#: Nanoseconds per clock tick, the unit of the start times in /proc/<pid>/stat.
_NS_PER_TICK = 10**9 // os.sysconf("SC_CLK_TCK")


def boot_ticks() -> int:
    """Now, as /proc gives a process's start time: whole clock ticks since boot.

    The kernel stamps a process's start when it forks it, so two readings around
    a spawn that agree are its start time, without reading /proc (which, just
    after a spawn, waits for the exec)."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // _NS_PER_TICK


def proc_stat(pid: int) -> tuple[str, int] | None:
    """State letter and start time (clock ticks after boot) of ``pid``, from /proc; None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            # The command name (field 2) may hold spaces and ')': the fixed fields follow its last ')'.
            fields = fh.read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[19])     # fields 3 and 22
    except (OSError, IndexError, ValueError):
        return None


def proc_start_time(pid: int) -> int | None:
    """The start time of ``pid`` (clock ticks after boot), from /proc; None if there is no such process."""
    stat = proc_stat(pid)
    return stat[1] if stat else None


def _signal(pids: list[int], *signums: int) -> None:
    """Send each signal, in order, to each process; one that is gone already is skipped."""
    for pid in pids:
        for signum in signums:
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                break
