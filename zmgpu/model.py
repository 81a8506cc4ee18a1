"""Shared vocabulary: job and node states, GPU descriptions, GPU pin specs.

The master builds these, the wire carries them as plain dicts (``to_dict``),
and the CLI reads the dicts back.  The dict layouts are part of the protocol:

job dict::

    job_id, user, command, cwd, gpus (asked), node_gpu_ids (pin spec or None),
    interactive, state, reason, allocation [{node_id, gpu_indices}] (rank = position),
    submit_time, start_time, end_time (epoch seconds or None),
    exit_code, signal (None until known),
    outputs [{rank, stream, size}] (bytes the master holds; final once the state is final),
    gpu_mem_mb (--gpu-mem, or None), per_gpu, master_port (the rendezvous port its first node picked),
    peak_gpu_mem_mb (the most GPU memory its processes were seen using on one GPU, or None);
    asked with ``collapse``, a queue listing gives the pending tasks of an array that are consecutive (in
    submission order) and wait for the same reason as one dict: the first task's, with job_id
    ``ARRAYID_[ranges%N]`` and tasks (how many); asked with ``fields``, each job dict of a listing has only
    those keys (and a collapsed one job_id and tasks)

node dict::

    node_id, hostname, address, state, last_seen (epoch seconds),
    gpus [{index, name, uuid, memory_mb, simulated, job_id (holder or None),
           shared_by {job id: MiB declared}, room_mb (left for --gpu-mem jobs on a shared GPU),
           unavailable (why no job may take it: drained as unhealthy, or dirty; None),
           free (a new exclusive job could take it now, as the scheduler sees it),
           and the node's last report: used_mb, utilization, temperature, foreign_mb,
           processes [{pid, used_mb, job_id (None: foreign)}], busy (others' use keeps
           exclusive jobs off), healthy, health, dirty (job id whose processes linger)}]
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass


class JobState(str, enum.Enum):
    """Slurm-like job states."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"
    NODE_FAIL = "NODE_FAIL"

    @property
    def finished(self) -> bool:
        """True once the job can change no more."""
        return self not in (JobState.PENDING, JobState.RUNNING)


#: The states a job ends in: a check for ended jobs asks for these alone, so the master sends no dicts of
#: the many still pending or running.
FINISHED_STATES = tuple(state.value for state in JobState if state.finished)


class NodeState(str, enum.Enum):
    """Liveness of a node agent as the master sees it."""

    UP = "UP"
    DOWN = "DOWN"


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as a node agent reports it at registration."""

    index: int
    name: str
    uuid: str
    memory_mb: int
    simulated: bool = False

    def to_dict(self) -> dict:
        # By hand, not asdict(): every node listing builds one per GPU of the cluster.
        return {"index": self.index, "name": self.name, "uuid": self.uuid, "memory_mb": self.memory_mb,
                "simulated": self.simulated}

    @classmethod
    def from_dict(cls, data: dict) -> "GpuInfo":
        """Build from a wire dict; raises ValueError on a malformed entry."""
        try:
            return cls(index=int(data["index"]), name=str(data["name"]),
                       uuid=str(data["uuid"]), memory_mb=int(data["memory_mb"]),
                       simulated=bool(data.get("simulated", False)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed GPU entry {data!r}") from exc


def shell_exit_status(exit_code: int | None, signal: int | None) -> int:
    """The status a shell would report: the exit code, or 128+N for signal N."""
    if signal:
        return 128 + signal
    return exit_code if exit_code is not None else 1


def parse_node_gpu_ids(spec: str) -> dict[str, list[int]]:
    """Parse ``"node001:0,1;node002:0"`` into ``{"node001": [0, 1], "node002": [0]}``.

    Raises ValueError with a sentence a user can act on.
    """
    pins: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        node, sep, ids = part.partition(":")
        node = node.strip()
        if not sep or not node or not ids.strip():
            raise ValueError(f"bad --node-gpu-ids entry '{part}': expected NODE:IDX[,IDX...]")
        try:
            indices = [int(i) for i in ids.split(",")]
        except ValueError:
            raise ValueError(f"bad GPU index in --node-gpu-ids entry '{part}'") from None
        if any(i < 0 for i in indices) or len(set(indices)) != len(indices):
            raise ValueError(f"GPU indices in '{part}' must be distinct and >= 0")
        if node in pins:
            raise ValueError(f"node '{node}' appears twice in --node-gpu-ids")
        pins[node] = sorted(indices)
    if not pins:
        raise ValueError("--node-gpu-ids is empty: expected NODE:IDX[,IDX...][;NODE:...]")
    return pins


_SIZE_UNITS = {"": 1, "M": 1, "MB": 1, "MIB": 1, "G": 1024, "GB": 1024, "GIB": 1024, "T": 1024 ** 2, "TB": 1024 ** 2,
               "TIB": 1024 ** 2}


def parse_size(text: str) -> int:
    """A memory size such as ``12G``, ``800M`` or ``1.5G`` in MiB (binary units; no unit means MiB, as Slurm's --mem).

    Raises ValueError with a sentence a user can act on.
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match[2].upper() if match else None
    if unit not in _SIZE_UNITS:
        raise ValueError(f"bad size '{text}': expected a number with M or G, such as 800M or 12G")
    mib = int(float(match[1]) * _SIZE_UNITS[unit])
    if mib <= 0:
        raise ValueError(f"bad size '{text}': it must be at least 1M")
    return mib


def format_size(mib: int | None) -> str:
    """MiB as people read them: ``800M``, ``12G``, ``1.5G``; '-' when unknown."""
    if mib is None:
        return "-"
    if mib < 1024:
        return f"{mib}M"
    return f"{mib / 1024:.1f}".rstrip("0").rstrip(".") + "G"


#: A job id: 8 hex characters, or an array task ``ARRAYID_INDEX`` (Slurm's form).
JOB_ID_PATTERN = r"[0-9a-f]{8}(?:_[0-9]{1,7})?"
_JOB_ID = re.compile(JOB_ID_PATTERN)


def is_job_id(value) -> bool:
    """True for a well-formed job id (``8hex`` or an array task's ``8hex_N``)."""
    return isinstance(value, str) and _JOB_ID.fullmatch(value) is not None


def has_type(value, kind: type | tuple) -> bool:
    """``isinstance``, except that a bool is never an int: a flag is never a valid count or offset."""
    return isinstance(value, kind) and (not isinstance(value, bool) or kind is bool
                                        or (isinstance(kind, tuple) and bool in kind))


def foreign_pids(gpu: dict) -> list[int]:
    """The processes a GPU's report lists that zmgpu did not start (their job_id is None)."""
    return [p["pid"] for p in gpu.get("processes") or () if p.get("job_id") is None]


def in_foreign_use(gpu: dict) -> bool:
    """Whether processes zmgpu did not start use the GPU: listed ones, or use the node's policy counts as busy."""
    return bool(gpu.get("busy") or foreign_pids(gpu))


def gpu_room(memory_mb: int, reserve_mb: int, foreign_mb: int, declared_mb: int) -> int:
    """MiB of a GPU still free for --gpu-mem jobs: its memory less the reserve, others' use, and what the
    sharing jobs declared.  The master places by it and the node checks again by it, so they must agree."""
    return memory_mb - reserve_mb - foreign_mb - declared_mb


def is_loopback(host: str) -> bool:
    """An address only this machine can reach (a host name other than localhost may resolve to any)."""
    import ipaddress   # here: the CLI imports this module and never needs it

    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_count(value) -> bool:
    """True for an int >= 0 (never a bool: a flag is no rank, attempt or id)."""
    return has_type(value, int) and value >= 0

#: A node id: it appears in --node-gpu-ids specs ("node001:0,1;node002:0") and in spool paths.
NODE_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]*"
#: A user name as useradd accepts it (a trailing $ for machine accounts included).
USER_NAME_PATTERN = r"[A-Za-z_][A-Za-z0-9._-]*\$?"


class NodeStatus(str, enum.Enum):
    """What ``zmgpu nodes`` shows: liveness, drain and GPU use in one word (sinfo's vocabulary)."""

    IDLE = "idle"            # up, no GPU held
    MIXED = "mixed"          # up, some GPUs held
    ALLOCATED = "allocated"  # up, every GPU held
    DRAINED = "drained"      # an admin stopped new placements (running jobs finish)
    SUSPECT = "suspect"      # missed heartbeats: nothing new placed, jobs go on until it is declared down
    DOWN = "down"            # not heard from within the node timeout


def parse_time_limit(text: str) -> int:
    """Slurm time formats to seconds: ``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``.

    Raises ValueError with a sentence naming the accepted formats.
    """
    formats = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
    text = text.strip()
    days_part, dash, rest = text.partition("-")
    try:
        if dash:
            days = int(days_part)
            parts = [int(p) for p in rest.split(":")]
            if not 1 <= len(parts) <= 3:
                raise ValueError
            hours, minutes, secs = (parts + [0, 0])[:3]
        else:
            days, parts = 0, [int(p) for p in text.split(":")]
            # Slurm reads a lone number as minutes and two numbers as minutes:seconds.
            shapes = {1: lambda p: (0, p[0], 0), 2: lambda p: (0, p[0], p[1]), 3: lambda p: tuple(p)}
            hours, minutes, secs = shapes[len(parts)](parts)
    except (ValueError, KeyError):
        raise ValueError(f"bad time limit '{text}': expected {formats}") from None
    if min(days, hours, minutes, secs) < 0:
        raise ValueError(f"bad time limit '{text}': parts must not be negative")
    total = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if total <= 0:
        raise ValueError(f"bad time limit '{text}': it must be longer than zero")
    return total


def format_duration(seconds: float | None) -> str:
    """Seconds as Slurm prints them: ``M:SS``, ``H:MM:SS`` or ``D-HH:MM:SS``."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}-{hours:02d}:{minutes:02d}:{secs:02d}"
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


#: Most tasks one array may have, so a typo cannot flood the queue.
MAX_ARRAY_TASKS = 100_000


def parse_array_spec(spec: str) -> tuple[list[int], int | None]:
    """``"0-99%8"`` -> (indices 0..99, at most 8 at once); ``"1,5,7"`` -> ([1, 5, 7], None).

    Ranges may carry a step (``0-10:2``).  Raises ValueError with a sentence.
    """
    body, pct, limit_text = spec.strip().partition("%")
    limit = None
    try:
        if pct:
            limit = int(limit_text)
            if limit < 1:
                raise ValueError
        indices: set[int] = set()
        for part in filter(None, (p.strip() for p in body.split(","))):
            span, colon, step_text = part.partition(":")
            first, dash, last = span.partition("-")
            lo, hi = int(first), int(last) if dash else int(first)
            step = int(step_text) if colon else 1
            if lo < 0 or hi < lo or step < 1:
                raise ValueError
            indices.update(range(lo, hi + 1, step))
            if len(indices) > MAX_ARRAY_TASKS:
                raise ValueError(f"bad --array '{spec}': more than {MAX_ARRAY_TASKS} tasks")
    except ValueError as exc:
        if str(exc).startswith("bad --array"):
            raise
        raise ValueError(f"bad --array '{spec}': expected e.g. 0-99, 0-99%8 or 1,5,7") from None
    if not indices:
        raise ValueError(f"bad --array '{spec}': no task index given")
    return sorted(indices), limit


def format_array_spec(indices, limit: int | None = None) -> str:
    """``[0, 1, 2, 5, 7, 9, 11]`` -> ``"0-2,5-11:2"`` (``%N`` added for a limit): the array spec that
    :func:`parse_array_spec` reads back, as squeue shows the pending tasks of an array.  Three or more evenly
    spaced indices are one span with a step, so an array of every other task is as short as one of all."""
    ordered = sorted(set(indices))
    spans = []
    i = 0
    while i < len(ordered):
        first, last, step = ordered[i], ordered[i], 1
        if i + 1 < len(ordered):
            step, j = ordered[i + 1] - first, i + 1
            while j + 1 < len(ordered) and ordered[j + 1] - ordered[j] == step:
                j += 1
            if step == 1 or j - i >= 2:
                last, i = ordered[j], j
        spans.append(str(first) if first == last else f"{first}-{last}" if step == 1 else f"{first}-{last}:{step}")
        i += 1
    return ",".join(spans) + ("" if limit is None else f"%{limit}")
