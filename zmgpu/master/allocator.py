"""GPU placement as pure functions over plain data, so unit tests need no sockets.

Policy: pending jobs are taken in priority order (then submission order).  A
job that asks for more GPUs than one node has free spans several nodes, all or
nothing (gang); pinned jobs (``--node-gpu-ids``) get exactly their GPUs.  The
first job that cannot start gets a reservation at its expected start (EASY
backfill): later jobs may start ahead of it only when their ``--time`` limit
proves they cannot delay it, so big jobs never starve.  A CPU-only job takes no
GPU and so can delay no one: it starts whenever a node is up.  Per-user GPU caps,
array concurrency limits and dependencies hold single jobs back without
blocking anyone else.

Jobs that declare ``--gpu-mem`` share GPUs: each of their GPUs must have that
much *room* (memory less the node's reserve, foreign use and what the sharing
jobs declared), and the fullest GPU that fits is taken first, so whole GPUs
stay free for exclusive jobs.  Every other job takes its GPUs whole, and never
one that others' processes use.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable

Placement = list[tuple[str, list[int]]]   # (node id, GPU indices), one entry per node
GpuMap = dict[str, list[int]]              # node id -> GPU indices
RoomMap = dict[str, dict[int, int]]        # node id -> GPU index -> MiB a --gpu-mem job may declare there


class WaitReason(str, enum.Enum):
    """Why a pending job has not started (the squeue vocabulary)."""

    RESOURCES = "Resources"            # first in line, waiting for GPUs to free up
    PRIORITY = "Priority"              # an earlier or higher-priority job goes first
    DEPENDENCY = "Dependency"          # --after jobs have not ended yet
    USER_GPU_LIMIT = "UserGPULimit"    # the user already holds the per-user GPU cap
    NODE_DOWN = "NodeDown"             # it needs a node that is down or drained
    PINNED_GPUS_BUSY = "PinnedGPUsBusy"
    ARRAY_LIMIT = "ArrayLimit"         # its array already runs its %N tasks
    GPUS_IN_USE_BY_OTHERS = "GPUsInUseByOthers"   # free of jobs, but someone else's processes use them

    @property
    def own(self) -> bool:
        """Whether the reason is the job's own, not waiting behind a blocked job (Priority) nor for its
        dependencies (which settle themselves): true only as long as a pass reads the job, and a pass that stops
        before it must not leave it standing."""
        return self not in (WaitReason.PRIORITY, WaitReason.DEPENDENCY)


class PastStop(enum.Enum):
    """How a waiting job may start past the job where a pass stopped (see schedule and past_stop)."""

    CPU = "cpu"            # it takes no GPU, so it delays no one: past any stop
    SHARED = "shared"      # it shares GPUs by --gpu-mem, with a time limit: while some GPU has room for it
    LIMITED = "limited"    # it takes whole GPUs, with a time limit: on reserved GPUs, if it ends in time


def past_stop(gpus: int, gpu_mem: int | None, time_limit: float | None) -> tuple[PastStop, float] | None:
    """How a job asking for this may pass a stop, with the value that bounds it (its --gpu-mem, or its time
    limit); None when it never may: a job that takes GPUs and has no time limit passes no reservation."""
    if not gpus:
        return PastStop.CPU, 0
    if time_limit is None:
        return None
    return (PastStop.SHARED, gpu_mem) if gpu_mem is not None else (PastStop.LIMITED, time_limit)


def may_join_past(gpus: int, gpu_mem: int | None, time_limit: float | None, ends_by: float | None,
                  now: float) -> bool:
    """Whether a job asking for this, joining the queue behind where a pass stopped, might start before the
    job there: CPU-only, or sharing GPUs with a time limit, or ending by ``ends_by`` (schedule's last result)."""
    bucket = past_stop(gpus, gpu_mem, time_limit)
    if bucket is None:
        return False
    return bucket[0] is not PastStop.LIMITED or (ends_by is not None and now + time_limit <= ends_by)


@dataclass(frozen=True)
class Request:
    """What a pending job asks for."""

    job_id: str
    gpus: int
    pins: dict[str, list[int]] | None = None
    user: str = ""
    time_limit: float | None = None    # seconds; None: unknown, so it never backfills
    array_id: str | None = None
    array_limit: int | None = None
    hold: WaitReason | None = None     # decided outside placement (dependencies)
    gpu_mem: int | None = None         # MiB per GPU when it may share GPUs; None: GPUs of its own


@dataclass(frozen=True)
class Running:
    """A job holding GPUs now, for reservations, caps and array limits."""

    placement: Placement
    user: str = ""
    end: float | None = None           # expected end (start + time limit); None: unknown
    array_id: str | None = None
    gpu_mem: int | None = None         # it shares its GPUs
    # How many GPUs it holds: counted once, not by every pass (8,000 running jobs cost each pass 6 ms).
    gpus: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "gpus", sum(len(indices) for _, indices in self.placement))


@dataclass
class View:
    """The cluster as one scheduling pass sees it."""

    free: GpuMap                        # usable (up, not drained) nodes -> free GPU indices
    capacity: GpuMap                    # usable nodes -> all their GPU indices
    load: dict[str, int] = field(default_factory=dict)   # ranks per node, to spread CPU jobs
    running: list[Running] = field(default_factory=list)
    now: float = 0.0
    user_gpu_limit: int | None = None
    room: RoomMap = field(default_factory=dict)   # usable nodes -> room for --gpu-mem jobs per GPU
    others: GpuMap = field(default_factory=dict)  # usable nodes -> GPUs free of jobs but used by others


@dataclass(frozen=True)
class NodeCapacity:
    """A registered node's GPUs, for the feasibility check at submit."""

    node_id: str
    gpu_indices: tuple[int, ...]
    room: tuple[int, ...] = ()         # MiB each GPU offers --gpu-mem jobs when empty (memory less reserve)


def infeasible(request: Request, nodes: list[NodeCapacity]) -> str | None:
    """A sentence saying why no set of registered nodes could ever run ``request``, or None."""
    if not nodes:
        return "no node agent has registered with this master yet; start zmgpu-node first"
    if request.pins:
        by_id = {n.node_id: n for n in nodes}
        for node_id, indices in request.pins.items():
            node = by_id.get(node_id)
            if node is None:
                known = ", ".join(sorted(by_id))
                return f"unknown node '{node_id}' in --node-gpu-ids (registered nodes: {known})"
            missing = sorted(set(indices) - set(node.gpu_indices))
            if missing:
                have = ",".join(map(str, node.gpu_indices)) or "none"
                return f"node '{node_id}' has no GPU {missing[0]} (its GPUs: {have})"
        return None
    # Counted only as far as the request needs (a submit to a thousand nodes counted them all), and in full
    # only for the message that it can never be satisfied.
    enough = _reaches(request.gpus, (len(n.gpu_indices) for n in nodes))
    if request.gpu_mem is not None and enough and not _reaches(
            request.gpus, (mb >= request.gpu_mem for n in nodes for mb in n.room)):
        fitting = sum(mb >= request.gpu_mem for n in nodes for mb in n.room)
        largest = max((mb for n in nodes for mb in n.room), default=0)
        return (f"--gpu-mem {request.gpu_mem} MiB on {request.gpus} GPU(s) can never be satisfied: "
                f"{fitting} GPU(s) have that much room (the most any GPU offers is {largest} MiB, "
                f"its memory less the node's reserve)")
    if not enough:
        total = sum(len(n.gpu_indices) for n in nodes)
        per_node = ", ".join(f"{n.node_id}: {len(n.gpu_indices)}" for n in nodes)
        return (f"--gpus {request.gpus} can never be satisfied: the registered nodes have "
                f"{total} GPU(s) in all ({per_node})")
    return None


def _reaches(target: int, counts: Iterable[int]) -> bool:
    """Whether ``counts`` add up to ``target`` or more, read only as far as that takes."""
    total = 0
    for count in counts:
        total += count
        if total >= target:
            return True
    return total >= target


def place(request: Request, free: dict[str, list[int]], load: dict[str, int],
          room: RoomMap | None = None) -> Placement | None:
    """Where ``request`` can start now, or None.

    ``free`` maps each usable (up) node to its free GPU indices; ``load`` counts
    the job ranks already on each node, to spread CPU-only jobs.  A ``--gpu-mem``
    request goes by ``room`` instead; without one it is placed like any other.
    """
    if request.gpu_mem is not None and request.gpus and room is not None:
        return _place_shared(request, room)
    if request.pins:
        if all(set(idx) <= set(free.get(node, ())) for node, idx in request.pins.items()):
            return [(node, list(idx)) for node, idx in request.pins.items()]
        return None
    if not free:
        return None
    if request.gpus == 0:
        node = min(free, key=lambda n: (load.get(n, 0), n))
        return [(node, [])]
    # One node if any fits: the tightest fit keeps big holes for big jobs.
    fitting = [n for n, idx in free.items() if len(idx) >= request.gpus]
    if fitting:
        node = min(fitting, key=lambda n: (len(free[n]), n))
        return [(node, sorted(free[node])[:request.gpus])]
    # Otherwise span nodes, fullest-free first, so the job touches as few nodes as possible.
    placement: Placement = []
    needed = request.gpus
    for node in sorted(free, key=lambda n: (-len(free[n]), n)):
        if needed == 0:
            break
        take = sorted(free[node])[:needed]
        if take:
            placement.append((node, take))
            needed -= len(take)
    return placement if needed == 0 else None


def _place_shared(request: Request, room: RoomMap) -> Placement | None:
    """GPUs with room for ``request.gpu_mem`` each: the fullest that fit first, on one node if one has enough."""
    need = request.gpu_mem
    if request.pins:
        ok = all(room.get(n, {}).get(i, -1) >= need for n, idx in request.pins.items() for i in idx)
        return [(n, list(idx)) for n, idx in request.pins.items()] if ok else None
    fits = {n: sorted((mb, i) for i, mb in gpus.items() if mb >= need) for n, gpus in room.items()}
    one = [n for n, gpus in fits.items() if len(gpus) >= request.gpus]
    if one:
        node = min(one, key=lambda n: (sum(mb for mb, _ in fits[n][:request.gpus]), n))
        return [(node, sorted(i for _, i in fits[node][:request.gpus]))]
    placement: Placement = []
    needed = request.gpus
    for node in sorted(fits, key=lambda n: (-len(fits[n]), n)):
        take = sorted(i for _, i in fits[node][:needed])
        if take:
            placement.append((node, take))
            needed -= len(take)
        if needed == 0:
            return placement
    return None


@dataclass
class _Pool:
    """What a pass may still hand out: its own copies of the free GPUs, the room and the load, and counts.

    Without pins or --gpu-mem a request fits exactly when enough GPUs are free
    (it may span nodes), and outlasting the reservation, when enough are free
    that the reservation will not take.  The counts answer that at once, so a
    long queue facing a full cluster costs a comparison per job, not a walk
    over every node (with time limits every job is looked at: 1,000 full nodes
    and 2,000 pending took 0.77 s a pass).
    """

    free: GpuMap
    room: RoomMap
    load: dict[str, int]
    count: int = 0                          # free GPUs
    spare: int = 0                          # free GPUs the reservation will not take
    reservation: Reservation | None = None  # the first blocked job's, once there is one
    # Indexes built by the first placement that asks for one, then kept by each start.  Without them every
    # start walked every node: on 1,000 empty nodes of 8 GPUs a pass starting 8,000 jobs of whole GPUs spent
    # 0.55 s in placement (of 0.61 s), one starting 4,000 jobs sharing GPUs by --gpu-mem took 7.5 s, one
    # starting 4,000 CPU-only jobs 0.34 s.
    # The nodes with GPUs free, by how many, each count a heap of names (see tightest) ...
    by_free: dict[int, list[str]] | None = field(default=None, repr=False)
    # ... every GPU with room for --gpu-mem jobs, as (MiB, node, index) in that order (see tightest_room) ...
    by_room: list[tuple[int, str, int]] | None = field(default=None, repr=False)
    # ... and the usable nodes as a heap of (ranks placed there, node) (see least_loaded).
    by_load: list[tuple[int, str]] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, view: View) -> "_Pool":
        free = {n: list(idx) for n, idx in view.free.items()}
        count = sum(len(idx) for idx in free.values())
        return cls(free, {n: dict(gpus) for n, gpus in view.room.items()}, dict(view.load), count, count)

    def reserve(self, reservation: Reservation) -> None:
        self.reservation = reservation
        self.spare = self.count - sum(1 for n, i in reservation.gpus if i in self.free.get(n, ()))

    def cannot_fit(self, req: Request, spare_only: bool) -> bool:
        """Whether ``req`` surely fits nowhere (False: placement must tell)."""
        if req.gpus == 0 or req.pins or req.gpu_mem is not None:
            return False
        return req.gpus > (self.spare if spare_only else self.count)

    def place(self, req: Request) -> Placement | None:
        """``place`` over what the pool holds, choosing as it does.  The common requests are found by an
        index: a CPU-only job, one taking whole GPUs on one node, one sharing a single GPU."""
        if req.pins:
            return place(req, self.free, self.load, self.room)
        if not req.gpus:
            node = self.least_loaded()
            return None if node is None else [(node, [])]
        if req.gpu_mem is None:
            node = self.tightest(req.gpus)
            if node is not None:
                return [(node, sorted(self.free[node])[:req.gpus])]
        elif req.gpus == 1:
            found = self.tightest_room(req.gpu_mem)
            return None if found is None else [(found[1], [found[2]])]
        return place(req, self.free, self.load, self.room)

    def least_loaded(self) -> str | None:
        """The usable node with the fewest ranks placed, the first by name on a tie (as ``place`` chooses)."""
        if self.by_load is None:
            self.by_load = [(self.load.get(node, 0), node) for node in self.free]
            heapq.heapify(self.by_load)
        # Loads only grow in a pass: an entry whose load is no longer the node's is stale.
        while self.by_load and self.load.get(self.by_load[0][1], 0) != self.by_load[0][0]:
            heapq.heappop(self.by_load)
        return self.by_load[0][1] if self.by_load else None

    def tightest_room(self, gpu_mem: int, avoid: frozenset[tuple[str, int]] = frozenset()
                      ) -> tuple[int, str, int] | None:
        """The GPU whose room fits ``gpu_mem`` most tightly, the first by node name, then index, on a tie
        (as ``place`` chooses for one shared GPU), as (room, node, index); or None.  The (node, index) pairs in
        ``avoid`` (a reservation's few GPUs) are passed over."""
        rooms = self._rooms()
        at = bisect.bisect_left(rooms, (gpu_mem,))
        while at < len(rooms) and (rooms[at][1], rooms[at][2]) in avoid:
            at += 1
        return rooms[at] if at < len(rooms) else None

    def largest_room(self) -> int | None:
        """The most room any GPU offers --gpu-mem jobs (None: no GPU offers any)."""
        rooms = self._rooms()
        return rooms[-1][0] if rooms else None

    def _rooms(self) -> list[tuple[int, str, int]]:
        if self.by_room is None:
            self.by_room = sorted((mb, node, index) for node, gpus in self.room.items() for index, mb in gpus.items())
        return self.by_room

    def tightest(self, gpus: int) -> str | None:
        """The node with the fewest free GPUs of those with at least ``gpus`` free, the first by name on a tie
        (as ``place`` chooses), or None."""
        if self.by_free is None:
            self.by_free = {}
            for node, idx in self.free.items():
                if idx:
                    self.by_free.setdefault(len(idx), []).append(node)
            for heap in self.by_free.values():
                heapq.heapify(heap)
        for count in sorted(c for c in self.by_free if c >= gpus):
            heap = self.by_free[count]
            # Free GPUs only shrink in a pass: a node that no longer has this count never has it again.
            while heap and len(self.free[heap[0]]) != count:
                heapq.heappop(heap)
            if heap:
                return heap[0]
        return None

    def take(self, placement: Placement, gpu_mem: int | None) -> None:
        """Mark a placement's GPUs as taken."""
        for node, indices in placement:
            taken = set(indices)
            free = self.free.get(node, [])
            was_free = [i for i in free if i in taken]
            self.free[node] = [i for i in free if i not in taken]
            self.count -= len(was_free)
            if was_free and self.free[node] and self.by_free is not None:
                heapq.heappush(self.by_free.setdefault(len(self.free[node]), []), node)
            reserved = self.reservation.gpus if self.reservation else ()
            self.spare -= sum((node, i) not in reserved for i in was_free)
            gpus = self.room.get(node, {})
            for i in taken:
                if i not in gpus:
                    continue
                if self.by_room is not None:
                    del self.by_room[bisect.bisect_left(self.by_room, (gpus[i], node, i))]
                if gpu_mem is None:
                    del gpus[i]
                    continue
                gpus[i] -= gpu_mem
                if self.by_room is not None:
                    bisect.insort(self.by_room, (gpus[i], node, i))
            self.load[node] = self.load.get(node, 0) + 1
            if self.by_load is not None:
                heapq.heappush(self.by_load, (self.load[node], node))


@dataclass(frozen=True)
class Reservation:
    """The first blocked job's expected start and the GPUs it will take then."""

    start: float | None                # None: unknown (a running job has no time limit)
    gpus: frozenset[tuple[str, int]]


#: The jobs queued behind a job that may pass it (see past_stop): CPU-only ones; given a number of MiB, those
#: sharing GPUs that declare no more; given a number of seconds, those taking whole GPUs whose time limit is no
#: longer; as requests in queue order (see schedule).
StartableBehind = Callable[[str, "float | None", "int | None"], Iterable[Request]]


#: What a pass found: the jobs to start and where, why each job it read waits, the job it stopped at, and the time
#: (epoch seconds) by which a job joining behind that one must end to start (see schedule).
PassResult = tuple[list[tuple[str, Placement]], dict[str, WaitReason], "str | None", "float | None"]


def schedule(pending: Iterable[Request], view: View, startable_behind: StartableBehind | None = None) -> PassResult:
    """One pass over ``pending`` (already in priority order).

    Returns four things:

    - the jobs to start, with their placements;
    - a wait reason for each job it looked at;
    - the job it stopped at, past which no job that joins the queue later may
      start unless it needs no free GPU, or ends in time (None: it read them all);
    - that time, epoch seconds by which such a job must end (None: no job that
      takes whole GPUs may start past the stop).

    Once the first blocked job's start is
    unknown nothing behind it that needs a GPU may start, so the pass stops
    there and does not read the rest of ``pending`` (it may be a generator): a
    long queue costs one step per job that can still move.  Once that job has
    its reservation and every free GPU is in it, the pass reads on only the jobs
    behind that may still start (``startable_behind``): CPU-only ones, which
    take no GPU and so may start whatever GPU jobs wait; those sharing GPUs,
    while some GPU has room for one; and while some GPU is free, those whose
    time limit ends by the time the reservation starts.  Without
    ``startable_behind`` it reads the rest of ``pending`` for them.  ``view`` is
    not changed.
    """
    pending = iter(pending)
    if startable_behind is None:
        def startable_behind(job_id: str, within: float | None, room: int | None) -> Iterable[Request]:
            return pending     # the rest, which the callers below filter
    pool = _Pool.of(view)
    user_gpus: Counter = Counter()
    array_running: Counter = Counter()
    for run in view.running:
        user_gpus[run.user] += run.gpus
        array_running[run.array_id] += 1
    capacity_total = sum(len(idx) for idx in view.capacity.values())
    started: list[tuple[str, Running]] = []     # job id, and the job as the reservation replays it
    waits: dict[str, WaitReason] = {}

    def stop(job_id: str | None, ends_by: float | None = None) -> PassResult:
        return [(started_id, run.placement) for started_id, run in started], waits, job_id, ends_by

    def consider(req: Request) -> bool:
        """Start ``req`` or say why it waits; False when nothing behind it that needs a GPU may start."""
        held = _held(req, view, capacity_total, user_gpus, array_running)
        if held is not None:
            waits[req.job_id] = held
            return True
        placement = _backfill(req, pool, view.now)
        if placement is None:
            waits[req.job_id] = _why_not(req, pool.reservation, pool.free, view.others)
            if pool.reservation is None:
                # Jobs this pass started hold GPUs too: left out, one with a time limit would make the blocked
                # job's start unknown, and the pass stop where a job could still backfill.
                pool.reserve(_reserve(req, pool.free, view, [run for _, run in started]))
            return pool.reservation.start is not None
        gpu_mem = req.gpu_mem if req.gpus else None
        end = view.now + req.time_limit if req.time_limit is not None else None
        started.append((req.job_id, Running(placement, req.user, end, req.array_id, gpu_mem)))
        pool.take(placement, gpu_mem)
        user_gpus[req.user] += req.gpus
        array_running[req.array_id] += 1
        return True

    for req in pending:
        # With time limits every job would otherwise be read, past where none may start: 100,000 pending made
        # each pass (one per job end, and per submit) take 0.3 s with no GPU free, and 143 ms (1,000 nodes)
        # with a few free GPUs that the reservation takes; now 8 ms.
        if pool.reservation is not None and not pool.spare:
            reservation = pool.reservation
            # How long a job may run on reserved GPUs (a second more: the test of each is _ends_by's); with none
            # free, no job taking whole GPUs may start.
            within = reservation.start - view.now + 1 if pool.count else None
            for startable in itertools.chain([req], startable_behind(req.job_id, within, pool.largest_room())):
                if _may_start_past(startable, pool, within is not None, view.now):
                    consider(startable)
            # A job joining behind may start only if it needs no free GPU, or (while some GPU is free) ends in time.
            return stop(req.job_id, reservation.start if pool.count else None)
        if not consider(req):
            # The start of the first blocked job is unknown: no job that takes GPUs may pass it.
            for startable in startable_behind(req.job_id, None, None):
                if not startable.gpus:
                    consider(startable)
            return stop(req.job_id)
    return stop(None)


def _fits_usable(req: Request, view: View, capacity_total: int) -> bool:
    """Could ``req`` run on the usable nodes if they were empty?"""
    if req.pins:
        return all(set(idx) <= set(view.capacity.get(node, ())) for node, idx in req.pins.items())
    return req.gpus <= capacity_total and (req.gpus > 0 or bool(view.capacity))


def _held(req: Request, view: View, capacity_total: int, user_gpus: Counter,
          array_running: Counter) -> WaitReason | None:
    """A reason that keeps this one job waiting without holding up the others."""
    if req.hold is not None:
        return req.hold
    if req.array_limit is not None and array_running[req.array_id] >= req.array_limit:
        return WaitReason.ARRAY_LIMIT
    if view.user_gpu_limit is not None and req.gpus and user_gpus[req.user] + req.gpus > view.user_gpu_limit:
        return WaitReason.USER_GPU_LIMIT
    if not _fits_usable(req, view, capacity_total):
        # A node it needs is down or drained: waiting in line would only hold up the others.
        return WaitReason.NODE_DOWN
    return None


def _backfill(req: Request, pool: _Pool, now: float) -> Placement | None:
    """Where ``req`` may start now without delaying the reserved job, or None."""
    reservation = pool.reservation
    # A CPU-only job takes no GPU, so it cannot delay the reserved job, however long it runs.
    if reservation is not None and req.gpus:
        if reservation.start is None or req.time_limit is None:
            return None
        if not _ends_by(req, reservation, now):
            # It would outlast the reservation: only GPUs the reserved job will not need are fair game.
            if pool.cannot_fit(req, spare_only=True):
                return None
            if req.gpu_mem is not None and req.gpus == 1 and not req.pins:
                # As place() over the room outside the reservation chooses, through the pool's index: building
                # that room took 2.4 ms per job on 1,000 nodes.
                found = pool.tightest_room(req.gpu_mem, avoid=reservation.gpus)
                return None if found is None else [(found[1], [found[2]])]
            spare = {n: [i for i in idx if (n, i) not in reservation.gpus] for n, idx in pool.free.items()}
            if req.gpu_mem is None:
                return place(req, spare, pool.load)
            spare_room = {n: {i: mb for i, mb in gpus.items() if (n, i) not in reservation.gpus}
                          for n, gpus in pool.room.items()}
            return place(req, spare, pool.load, spare_room)
    if pool.cannot_fit(req, spare_only=False):
        return None
    return pool.place(req)


def _may_start_past(req: Request, pool: _Pool, gpus_free: bool, now: float) -> bool:
    """Whether ``req`` may start although the reservation holds every free GPU (see past_stop): it takes none,
    or shares one that has room for it, or (``gpus_free``) it ends by the time the reservation starts."""
    bucket = past_stop(req.gpus, req.gpu_mem, req.time_limit)
    if bucket is None:
        return False
    if bucket[0] is PastStop.SHARED:
        return pool.tightest_room(req.gpu_mem) is not None
    return bucket[0] is PastStop.CPU or (gpus_free and _ends_by(req, pool.reservation, now))


def _ends_by(req: Request, reservation: Reservation, now: float) -> bool:
    """Whether ``req``, started now, ends by the time the reserved job starts (its limit known, and that start)."""
    return req.time_limit is not None and reservation.start is not None and now + req.time_limit <= reservation.start


def _reserve(req: Request, free: GpuMap, view: View, started: Iterable[Running] = ()) -> Reservation:
    """When and where the first blocked job will start, replaying the expected ends of running jobs and of
    those ``started`` earlier in this pass.

    Jobs without a time limit never release their GPUs in this replay; if the
    blocked job only fits once one of them ends, its start is unknown and
    nothing may backfill past it.
    """
    running = [*view.running, *started]
    future = {n: list(idx) for n, idx in free.items()}
    # A shared GPU comes free only when the last job sharing it ends.
    sharers = Counter((n, i) for r in running if r.gpu_mem is not None for n, idx in r.placement for i in idx)
    for run in sorted((r for r in running if r.end is not None), key=lambda r: r.end):
        for node, indices in run.placement:
            if node not in future:
                continue
            for i in indices:
                if run.gpu_mem is not None:
                    sharers[(node, i)] -= 1
                if run.gpu_mem is None or not sharers[(node, i)]:
                    future[node].append(i)
        placement = place(req, future, {})
        if placement is not None:
            return Reservation(max(run.end, view.now),
                               frozenset((n, i) for n, idx in placement for i in idx))
    return Reservation(None, frozenset())


def _why_not(req: Request, reservation: Reservation | None, free: GpuMap, others: GpuMap) -> WaitReason:
    if others and reservation is None and req.gpu_mem is None and req.gpus:
        # Would the GPUs that only others' processes keep busy let the first blocked job start?  (Asked of
        # that one only: a placement over every node for each job behind it would make a long queue slow.)
        widened = {n: free.get(n, []) + others.get(n, []) for n in free.keys() | others.keys()}
        if place(req, widened, {}) is not None:
            return WaitReason.GPUS_IN_USE_BY_OTHERS
    if req.pins:
        return WaitReason.PINNED_GPUS_BUSY
    return WaitReason.RESOURCES if reservation is None else WaitReason.PRIORITY
