"""The master's in-memory records and indexes: nodes, jobs, the pending queue and GPU holders.

Only the reactor thread touches these, so nothing here locks.  The records turn
into the wire dicts documented in :mod:`zmgpu.model`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..model import GpuInfo, JobState, NodeState
from ..protocol import Stream


@dataclass
class NodeRecord:
    """A node agent the master has heard from."""

    node_id: str
    hostname: str
    address: str
    gpus: list[GpuInfo]
    state: NodeState = NodeState.UP
    expires: float = 0.0            # monotonic deadline for the next sign of life
    last_seen: float = 0.0          # wall clock, for people
    holders: dict[int, str] = field(default_factory=dict)   # GPU index -> job id holding it
    ranks: set[tuple[str, int]] = field(default_factory=set)  # live (job id, rank) here

    @property
    def up(self) -> bool:
        return self.state is NodeState.UP

    def free_gpus(self) -> list[int]:
        """Indices of GPUs no job holds."""
        return [g.index for g in self.gpus if g.index not in self.holders]

    def to_dict(self) -> dict:
        return {
            "node_id": self.node_id, "hostname": self.hostname, "address": self.address,
            "state": self.state.value, "last_seen": self.last_seen,
            "gpus": [{**g.to_dict(), "job_id": self.holders.get(g.index)} for g in self.gpus],
        }


@dataclass
class RankRecord:
    """One process of a job: the part that runs on one node."""

    node_id: str
    gpu_indices: list[int]
    pid: int | None = None
    ended: bool = False
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    lost: bool = False              # ended because its node was declared dead
    final_sizes: dict[str, int] = field(default_factory=dict)  # stream -> bytes, as the node reported

    @property
    def failed(self) -> bool:
        """Ended with anything but exit code 0."""
        return self.ended and (self.exit_code != 0 or self.signal is not None)


@dataclass
class JobRecord:
    """A submitted job and everything known about it."""

    job_id: str
    seq: int                        # submission order, for first-come first-served
    user: str
    command: str
    cwd: str
    env: dict[str, str]
    gpus: int
    pins: dict[str, list[int]] | None
    node_gpu_ids: str | None
    interactive: bool
    state: JobState = JobState.PENDING
    reason: str | None = None
    ranks: list[RankRecord] = field(default_factory=list)
    submit_time: float = field(default_factory=time.time)
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    cancel_by: str | None = None    # who asked for a cancel of a running job
    first_failed: int | None = None  # the rank that failed first, which the verdict names

    def live_ranks(self) -> list[tuple[int, RankRecord]]:
        return [(i, r) for i, r in enumerate(self.ranks) if not r.ended]

    def to_dict(self, sizes: dict[tuple[str, int, str], int]) -> dict:
        # Once a rank has ended, the size its node reported is the one a client must reach.
        outputs = [
            {"rank": i, "stream": s.value,
             "size": max(sizes.get((self.job_id, i, s.value), 0), r.final_sizes.get(s.value, 0))}
            for i, r in enumerate(self.ranks) for s in Stream
        ]
        return {
            "job_id": self.job_id, "user": self.user, "command": self.command, "cwd": self.cwd,
            "gpus": self.gpus, "node_gpu_ids": self.node_gpu_ids, "interactive": self.interactive,
            "state": self.state.value, "reason": self.reason,
            "allocation": [{"node_id": r.node_id, "gpu_indices": r.gpu_indices} for r in self.ranks],
            "submit_time": self.submit_time, "start_time": self.start_time, "end_time": self.end_time,
            "exit_code": self.exit_code, "signal": self.signal, "outputs": outputs,
        }


@dataclass
class ClusterState:
    """Every index the reactor keeps, declared in one place."""

    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    # Pending job ids in first-come first-served order (dicts keep insertion order).
    pending: dict[str, None] = field(default_factory=dict)
    next_seq: int = 0

    def requeue_in_order(self, job: JobRecord) -> None:
        """Put a job back among the pending ones at its original place."""
        self.pending[job.job_id] = None
        order = sorted(self.pending, key=lambda jid: self.jobs[jid].seq)
        self.pending = dict.fromkeys(order)
