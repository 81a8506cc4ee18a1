"""The master's in-memory records and indexes: nodes, jobs, the pending queue and GPU holders.

Only the reactor thread touches these, so nothing here locks.  The records turn
into the wire dicts documented in :mod:`zmgpu.model`.
"""

from __future__ import annotations

import bisect
import heapq
import operator
import sys
import time
from collections import Counter
from typing import Callable
from dataclasses import dataclass, field, fields

from ..model import GpuInfo, JobState, NodeState, NodeStatus, gpu_room, in_foreign_use
from ..protocol import Stream
from .allocator import PastStop, past_stop


@dataclass
class NodeRecord:
    """A node agent the master has heard from."""

    node_id: str
    hostname: str
    address: str
    gpus: list[GpuInfo]
    state: NodeState = NodeState.UP
    reachable: bool = True          # False after a send to it failed, until it is heard from again
    drain_reason: str | None = None  # set by an admin: no new jobs here
    instance: str | None = None     # the registered agent process, to tell a duplicate from a restart
    route: bytes = b""              # its ROUTER routing id: the node id, or with keys a secret per connection
    heard: float = 0.0              # monotonic time of the last sign of life
    suspect: bool = False           # silent past the node timeout: no new placements, jobs go on
    registered: bool = True         # False for a node restored from the store until its agent registers
    last_seen: float = 0.0          # wall clock, for people
    holders: dict[int, str] = field(default_factory=dict)   # GPU index -> job id holding it whole
    shares: dict[int, dict[str, int]] = field(default_factory=dict)  # GPU index -> {--gpu-mem job: MiB}
    ranks: set[tuple[str, int]] = field(default_factory=set)  # live (job id, rank) here
    telemetry: dict[int, dict] = field(default_factory=dict)  # GPU index -> its state as the node reports it
    reserve_mb: int = 0             # the node keeps this much free on a GPU shared by --gpu-mem jobs
    master_host: str = ""           # how the node reaches the master's host (its --master-host)

    def __post_init__(self):
        if not self.route:
            self.route = self.node_id.encode()   # until its agent registers (and says otherwise)

    @property
    def up(self) -> bool:
        return self.state is NodeState.UP

    def unavailable(self, index: int) -> str | None:
        """Why GPU ``index`` can take no new job at all (unhealthy, or dirty); None when it can."""
        return _unavailable(self.telemetry.get(index, _NO_REPORT))

    def mark_dirty(self, indices: list[int], job_id: str) -> None:
        """These GPUs still list processes of an ended job: no job may have them until the node says clean."""
        for index in indices:
            self.telemetry.setdefault(index, {})["dirty"] = job_id

    def used_by_others(self) -> bool:
        """Whether processes zmgpu did not start use one of its GPUs, by its last report."""
        return any(in_foreign_use(self.telemetry.get(gpu.index, _NO_REPORT)) for gpu in self.gpus)

    def placement(self) -> "GpuPlaces":
        """Where new jobs may go on this node, in one walk over its GPUs (once per scheduling pass)."""
        places = GpuPlaces()
        for gpu in self.gpus:
            index = gpu.index
            if index in self.holders:
                continue
            state = self.telemetry.get(index, _NO_REPORT)
            blocked = _unavailable(state) is not None
            shared = self.shares.get(index)
            if not blocked:
                places.room[index] = gpu_room(gpu.memory_mb, self.reserve_mb, state.get("foreign_mb") or 0,
                                              sum(shared.values()) if shared else 0)
            if not shared:
                (places.others if blocked or state.get("busy") else places.free).append(index)
        return places

    @property
    def usable(self) -> bool:
        """New job ranks may be placed here."""
        return self.up and self.reachable and not self.suspect and self.drain_reason is None

    @property
    def status(self) -> NodeStatus:
        if not self.up:
            return NodeStatus.DOWN
        if self.suspect:
            return NodeStatus.SUSPECT
        if self.drain_reason is not None:
            return NodeStatus.DRAINED
        if not self.holders and not self.ranks:
            return NodeStatus.IDLE
        taken = sum(g.index in self.holders or bool(self.shares.get(g.index)) for g in self.gpus)
        return NodeStatus.ALLOCATED if taken == len(self.gpus) else NodeStatus.MIXED

    def to_dict(self) -> dict:
        places = self.placement()
        return {
            "node_id": self.node_id, "hostname": self.hostname, "address": self.address,
            "state": self.state.value, "status": self.status.value, "drain_reason": self.drain_reason,
            "last_seen": self.last_seen,
            "gpus": [{**self.telemetry.get(g.index, _NO_REPORT), **g.to_dict(), "job_id": self.holders.get(g.index),
                      "shared_by": dict(self.shares.get(g.index, {})), "unavailable": self.unavailable(g.index),
                      "room_mb": places.room.get(g.index) if g.index in self.shares else None,
                      "free": g.index in places.free}
                     for g in self.gpus],
        }


#: The state of a GPU its node has not reported on: healthy, free of others' use.
_NO_REPORT: dict = {}


def _unavailable(state: dict) -> str | None:
    """Why a GPU in this reported state can take no new job (unhealthy, or dirty); None when it can."""
    if state.get("healthy") is False:
        return f"drained: {state.get('health') or 'unhealthy'}"
    if state.get("dirty"):
        return f"dirty: job {state['dirty']}"
    return None


@dataclass
class GpuPlaces:
    """A node's GPUs as a scheduling pass sees them."""

    free: list[int] = field(default_factory=list)     # for a new exclusive job
    others: list[int] = field(default_factory=list)   # unheld, but others' processes, ill health or a leftover
    room: dict[int, int] = field(default_factory=dict)  # MiB a new --gpu-mem job may declare (not held whole)


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
    held_back: bool = False         # its DISPATCH waits for the rendezvous port from the job's first node
    peak_gpu_mem_mb: int | None = None   # the most GPU memory its processes were seen using on one GPU

    @property
    def failed(self) -> bool:
        """Ended with anything but exit code 0."""
        return self.ended and (self.exit_code != 0 or self.signal is not None)


#: A master holds job records by the hundred thousand: with slots one takes about 340 bytes instead of 1,650
#: (its attribute dict), and is one object fewer for the garbage collector to walk.  Slots need Python 3.10.
_SLOTS = {"slots": True} if sys.version_info >= (3, 10) else {}


@dataclass(**_SLOTS)
class JobRecord:
    """A submitted job (or one task of an array) and everything known about it."""

    job_id: str
    seq: int                        # submission order, the tie-break after priority
    user: str
    command: str
    cwd: str
    env: dict[str, str]             # shared by the tasks of an array, never mutated
    gpus: int
    gpu_mem_mb: int | None = None   # --gpu-mem: may share GPUs, declaring this much on each
    per_gpu: bool = False           # --per-gpu: one process (rank) per GPU
    pins: dict[str, list[int]] | None = None
    node_gpu_ids: str | None = None
    interactive: bool = False
    name: str | None = None
    priority: int = 0
    time_limit: int | None = None   # seconds
    requeue: bool = False
    requeue_count: int = 0
    attempt: int = 0                # bumped on every new dispatch, so reports of older runs are told apart
    after: tuple[str, ...] = ()      # job or array ids it waits for (a tuple: never changed, shared by the tasks)
    after_any: bool = False
    array_job_id: str | None = None
    array_task_id: int | None = None
    array_limit: int | None = None  # the array's %N
    state: JobState = JobState.PENDING
    reason: str | None = None
    # A tuple, replaced whole at each start: a pending job's is the empty one, so it holds no list of its own.
    ranks: tuple[RankRecord, ...] = ()
    submit_time: float = field(default_factory=time.time)
    start_time: float | None = None
    end_time: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    cancel_by: str | None = None    # who asked for a cancel of a running job
    timed_out: bool = False         # the time limit ended it
    first_failed: int | None = None  # the rank that failed first, which the verdict names
    env_id: str = ""                # content hash of env, the key it is stored under
    kill_sent: float = 0.0          # when a KILL last went out, to repeat one that went unheeded
    master_port: int | None = None  # the torch.distributed rendezvous port its first node picked

    def copy(self) -> "JobRecord":
        """A shallow copy, made without ``__init__``'s work per field: an array's tasks are made by the ten
        thousand (faster than copy.copy, which goes through the pickling protocol)."""
        twin = object.__new__(JobRecord)
        for name, value in zip(JOB_FIELDS, _job_values(self)):
            setattr(twin, name, value)
        return twin

    @property
    def queue_key(self) -> tuple[int, int, str]:
        """Order of the pending queue: higher priority first, then first come first served."""
        return (-self.priority, self.seq, self.job_id)

    @property
    def deadline(self) -> float | None:
        """When the time limit runs out (wall clock), for a running job with a limit."""
        if self.start_time is None or self.time_limit is None:
            return None
        return self.start_time + self.time_limit

    def live_ranks(self) -> list[tuple[int, RankRecord]]:
        return [(i, r) for i, r in enumerate(self.ranks) if not r.ended]

    def to_dict(self, size: Callable[[tuple[str, int, str]], int], fields: frozenset[str] | None = None) -> dict:
        """The wire dict; ``size`` tells how many bytes of a (job, rank, stream) the master holds.  With
        ``fields``, only those keys (names it does not have are left out), each computed only when asked: a
        listing of thousands of jobs for a table needs a few fields of each."""
        if fields is None:
            values = list(_wire_values(self))
            for position, get in _COMPUTED_AT:     # in rising order: each lands where _WIRE_KEYS has it
                values.insert(position, get(self, size))
            return dict(zip(_WIRE_KEYS, values))
        chosen = {}
        for name in fields:
            if name in _WIRE_AS_IS_SET:
                chosen[name] = getattr(self, name)
            elif (get := _WIRE_COMPUTED.get(name)) is not None:
                chosen[name] = get(self, size)
        return chosen

    def _outputs(self, size: Callable[[tuple[str, int, str]], int]) -> list[dict]:
        """Each rank's streams with the bytes of them the master holds."""
        # Once a rank has ended, the size its node reported is the one a client must reach.
        return [{"rank": i, "stream": stream, "size": max(size((self.job_id, i, stream)), r.final_sizes.get(stream, 0))}
                for i, r in enumerate(self.ranks) for stream in _STREAMS]


_STREAMS = tuple(s.value for s in Stream)   # iterating the Enum itself costs a generator per rank

#: The keys of a job's wire dict, in the order ``--json`` shows them.
_WIRE_KEYS = ("job_id", "name", "user", "command", "cwd", "gpus", "node_gpu_ids", "interactive", "priority",
              "time_limit", "requeue", "requeue_count", "attempt", "after", "after_any", "array_job_id",
              "array_task_id", "state", "reason", "allocation", "submit_time", "start_time", "end_time", "exit_code",
              "signal", "outputs", "gpu_mem_mb", "per_gpu", "master_port", "peak_gpu_mem_mb")
#: Those computed from the record, given the master's output sizes ...
_WIRE_COMPUTED: dict[str, Callable[[JobRecord, Callable], object]] = {
    "state": lambda job, size: job.state.value,
    "allocation": lambda job, size: [{"node_id": r.node_id, "gpu_indices": r.gpu_indices} for r in job.ranks],
    "outputs": JobRecord._outputs,
    "peak_gpu_mem_mb": lambda job, size: max(
        (r.peak_gpu_mem_mb for r in job.ranks if r.peak_gpu_mem_mb is not None), default=None),
}
_COMPUTED_AT = [(position, _WIRE_COMPUTED[key]) for position, key in enumerate(_WIRE_KEYS) if key in _WIRE_COMPUTED]
#: ... and the others, the record's attributes as they are.
_WIRE_AS_IS_SET = frozenset(_WIRE_KEYS) - _WIRE_COMPUTED.keys()
_wire_values = operator.attrgetter(*(key for key in _WIRE_KEYS if key in _WIRE_AS_IS_SET))


#: A job record's field names, in order.
JOB_FIELDS = tuple(f.name for f in fields(JobRecord))
_job_values = operator.attrgetter(*JOB_FIELDS)


class PendingQueue:
    """Pending job ids kept sorted by :attr:`JobRecord.queue_key`, so a pass never sorts; counted per user.
    The jobs that may pass a stop (CPU-only ones; those sharing GPUs, per --gpu-mem; those taking whole GPUs,
    per time limit: see allocator.past_stop) are also kept in queue order, since a pass that stops reads on
    only those that may still start."""

    def __init__(self):
        self._keys: list[tuple[int, int, str]] = []
        # The keys of the jobs that may pass a stop, sorted, per allocator.past_stop bucket.
        self._past_stop: dict[tuple[PastStop, float], list[tuple[int, int, str]]] = {}
        # job id -> job; not (key, job) pairs: a pair holding a record is one more object per waiting job for
        # the garbage collector to walk (the keys in the lists hold plain values, so it stops looking at them).
        self._by_id: dict[str, JobRecord] = {}
        self._per_user: Counter[str] = Counter()

    def add(self, job: JobRecord) -> None:
        key = job.queue_key
        bisect.insort(self._keys, key)
        bucket = past_stop(job.gpus, job.gpu_mem_mb, job.time_limit)
        if bucket is not None:
            bisect.insort(self._past_stop.setdefault(bucket, []), key)
        self._by_id[job.job_id] = job
        self._count(job, 1)

    def remove(self, job_id: str) -> None:
        job = self._by_id.pop(job_id)
        key = job.queue_key    # the key it was added under: priority, number and id never change
        _discard_key(self._keys, key)
        # As at add: what a job asks for does not change while it waits.
        bucket = past_stop(job.gpus, job.gpu_mem_mb, job.time_limit)
        if bucket is not None:
            keys = self._past_stop[bucket]
            _discard_key(keys, key)
            if not keys:
                del self._past_stop[bucket]
        self._count(job, -1)

    def _count(self, job: JobRecord, step: int) -> None:
        self._per_user[job.user] += step
        if not self._per_user[job.user]:
            del self._per_user[job.user]

    def startable_behind(self, job_id: str, within: float | None = None, room: int | None = None):
        """The jobs queued after ``job_id`` (a pending job) that may pass it (see allocator.StartableBehind),
        in queue order."""
        bounds = {PastStop.CPU: 0, PastStop.SHARED: room, PastStop.LIMITED: within}
        after = self._by_id[job_id].queue_key
        lists = [keys for (kind, value), keys in self._past_stop.items()
                 if bounds[kind] is not None and value <= bounds[kind]]
        return (key[2] for key in heapq.merge(*(keys[bisect.bisect_right(keys, after):] for keys in lists)))

    def count(self, user: str) -> int:
        """How many jobs of ``user`` wait."""
        return self._per_user[user]

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._by_id

    def __iter__(self):
        # No copy: a pass only reads; jobs leave the queue after the pass (see JobService._requests).
        return (key[2] for key in self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def _discard_key(keys: list, key: tuple) -> None:
    """Remove ``key`` from the sorted ``keys``; it must be there (a key that changed while its job waited would
    otherwise take another job's place out of the queue)."""
    i = bisect.bisect_left(keys, key)
    assert i < len(keys) and keys[i] == key, f"queue key {key} is not in the pending queue"
    del keys[i]


@dataclass
class ClusterState:
    """Every index the reactor keeps, declared in one place."""

    nodes: dict[str, NodeRecord] = field(default_factory=dict)
    jobs: dict[str, JobRecord] = field(default_factory=dict)
    pending: PendingQueue = field(default_factory=PendingQueue)
    running: set[str] = field(default_factory=set)           # job ids holding GPUs or processes now
    arrays: dict[str, list[str]] = field(default_factory=dict)  # array id -> its task ids
    next_seq: int = 0
    nodes_version: int = 0   # bumped whenever a node's GPUs and reserve are recorded (registered, restored)

    def route(self, node_id: str) -> bytes:
        """The routing id that reaches a node's agent."""
        node = self.nodes.get(node_id)
        return node.route if node is not None else node_id.encode()

    def expand(self, job_id: str) -> list[str]:
        """An array id stands for all its tasks; any other id for itself."""
        return self.arrays.get(job_id, [job_id])
