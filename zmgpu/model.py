"""Shared vocabulary: job and node states, GPU descriptions, GPU pin specs.

The master builds these, the wire carries them as plain dicts (``to_dict``),
and the CLI reads the dicts back.  The dict layouts are part of the protocol:

job dict::

    job_id, user, command, cwd, gpus (asked), node_gpu_ids (pin spec or None),
    interactive, state, reason, allocation [{node_id, gpu_indices}] (rank = position),
    submit_time, start_time, end_time (epoch seconds or None),
    exit_code, signal (None until known),
    outputs [{rank, stream, size}] (bytes the master holds; final once the state is final)

node dict::

    node_id, hostname, address, state, last_seen (epoch seconds),
    gpus [{index, name, uuid, memory_mb, simulated, job_id (holder or None)}]
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass


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
        return asdict(self)

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
