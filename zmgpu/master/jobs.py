"""Job lifecycle on the master: schedule, dispatch, output, end, requeue, time limits, retention.

Every way a job can end (its processes exit, a cancel, a time limit, a lost
node) goes through :meth:`JobService.end_rank`, so the state, the released
GPUs, the log line and the published event are the same whatever happened.
"""

from __future__ import annotations

import logging
import time

from .. import protocol
from ..model import JobState, format_duration, has_type, is_loopback
from ..protocol import Message, MsgType
from . import allocator
from .output import STREAMS, OutputSpool
from .reactor import Reactor
from .dependencies import Dependencies
from .state import ClusterState, JobRecord, RankRecord
from .store import Store


class JobService:
    """Job state transitions, the scheduling pass, and the job messages of node agents."""

    def __init__(self, state: ClusterState, reactor: Reactor, spool: OutputSpool, store: Store, kill_grace: float,
                 max_requeue: int, user_gpu_limit: int | None, retention: float, log: logging.Logger,
                 allow_root_jobs: bool = False):
        self.state = state
        self.reactor = reactor
        self.spool = spool
        self.store = store
        self.kill_grace = kill_grace
        self.max_requeue = max_requeue
        self.user_gpu_limit = user_gpu_limit
        self.retention = retention
        self.allow_root_jobs = allow_root_jobs
        self.log = log
        self.dirty = False   # something changed that may let a pending job start
        # Ranks started this turn, as (job, attempt, rank numbers): their DISPATCH goes out after the commit.
        self.to_dispatch: list[tuple[JobRecord, int, list[int]]] = []
        self.unreasoned: set[str] = set()   # pending jobs no pass has given a wait reason yet
        self.own_reason: set[str] = set()   # pending jobs whose reason is their own (see WaitReason.own)
        self.stop_key: tuple | None = None  # queue key of the job the last pass stopped at; None: it read all
        self.stop_ends_by: float | None = None   # a job joining behind it that ends by then may start
        self.running_views: dict[str, allocator.Running] = {}   # job id -> its cached allocator view
        self.dependencies = Dependencies(state)
        self.requests: dict[str, allocator.Request] = {}   # pending job id -> its request (see _requests)

    def handlers(self) -> dict:
        return {
            MsgType.JOB_STARTED: self.on_job_started,
            MsgType.OUTPUT: self.on_output,
            MsgType.JOB_ENDED: self.on_job_ended,
        }

    def job_dict(self, job: JobRecord, fields: frozenset[str] | None = None) -> dict:
        """The job's wire dict (only ``fields`` of it, when given)."""
        return job.to_dict(self.spool.size, fields)

    def publish_job(self, job: JobRecord, store: bool = True) -> None:
        """Tell subscribers about a change, and have the store write it at the end of the turn."""
        if store:
            self.store.job_changed(job)
        topics = [protocol.job_topic(job.job_id, "state")]
        if job.state.finished:
            topics.append(protocol.end_topic(job.job_id))
        self.reactor.publish(topics, MsgType.JOB_STATE, lambda: self.job_dict(job))

    def enqueue(self, job: JobRecord) -> None:
        """A new or requeued job joins the pending queue."""
        self.state.jobs[job.job_id] = job
        self.join_queue(job)
        # A job that joins behind the one where the last pass stopped, and may not pass it, could only be told to
        # wait, which schedule() does without a pass: this spares a submit behind a long queue a pass.
        if (self.stop_key is None or job.queue_key < self.stop_key
                or allocator.may_join_past(job.gpus, job.gpu_mem_mb, job.time_limit, self.stop_ends_by, time.time())):
            self.dirty = True
        self.publish_job(job)
        self.cancel_if_dependency_failed(job)

    def join_queue(self, job: JobRecord) -> None:
        """A pending job (new, requeued, or read back from the store) waits in the queue, its reason to come
        (one read back may be stale: own_reason follows only the reasons this master gave)."""
        job.reason = None
        self.state.pending.add(job)
        self.unreasoned.add(job.job_id)
        self.dependencies.track(job)

    def unqueue(self, job: JobRecord) -> None:
        """Undo :meth:`enqueue` for a job never acknowledged (its submit could not be stored)."""
        del self.state.jobs[job.job_id]
        if job.job_id in self.state.pending:
            self._leave_queue(job)
        self.unreasoned.discard(job.job_id)
        self._drop_from_array(job)
        self.dependencies.forget(job)
        self.store.forget_unsaved([job.job_id])

    def _drop_from_array(self, job: JobRecord) -> None:
        tasks = self.state.arrays.get(job.array_job_id)
        if tasks is not None and job.job_id in tasks:
            tasks.remove(job.job_id)
            if not tasks:
                del self.state.arrays[job.array_job_id]

    def cancel(self, job: JobRecord, user: str) -> None:
        """End a pending job now, or ask the nodes of a running one to stop it."""
        if job.state is JobState.PENDING:
            self._leave_queue(job)
            self._finish(job, JobState.CANCELLED, f"cancelled by {user}")
        else:
            job.cancel_by = user
            self.store.job_changed(job)
            self.kill_ranks(job, self._stop_reason(job))

    # -- scheduling and dispatch -------------------------------------------------------------

    def schedule(self) -> None:
        """One placement pass over the pending queue, if anything changed since the last (jobs added behind
        where it stopped are no change: see enqueue)."""
        if not self.dirty:
            self._wait_behind(self.unreasoned)
            return
        self.dirty = False
        self.stop_key = self.stop_ends_by = None
        if not len(self.state.pending):
            return
        starts, waits, stopped, self.stop_ends_by = allocator.schedule(self._requests(self.state.pending),
                                                                       self._view(), self._startable_behind)
        if stopped is not None:
            self.stop_key = self.state.jobs[stopped].queue_key
        for job_id, reason in waits.items():
            self._set_reason(self.state.jobs[job_id], reason)
        if stopped is None:
            self.unreasoned.clear()     # the pass read them all
        else:
            # Jobs the pass did not read wait behind a blocked one: new ones, and those whose reason was their own.
            self._wait_behind((self.unreasoned | self.own_reason) - waits.keys() - {j for j, _ in starts})
        for job_id, placement in starts:
            self._start(self.state.jobs[job_id], placement)

    def _wait_behind(self, job_ids) -> None:
        """These jobs, if still pending, wait behind a job that cannot start (Slurm's reason: Priority), or
        for their dependencies first."""
        for job_id in job_ids:
            if job_id in self.state.pending:
                job = self.state.jobs[job_id]
                self._set_reason(job, self._dependency_hold(job) or allocator.WaitReason.PRIORITY)
        self.unreasoned.clear()

    def _requests(self, job_ids):
        """Pending jobs (``job_ids``, in queue order) as allocator requests, built only as far as the pass reads.

        Reading changes nothing (failed dependencies are settled when they end), so the queue is
        walked in place, not copied.  A job's request is built once while it waits, and again only
        when its dependencies stop holding it: a pass reads every job held by its array's %N limit,
        and building them all again made each pass after a task's end of a 10,000-task array take 18 ms.
        """
        jobs, requests = self.state.jobs, self.requests
        for job_id in job_ids:
            job = jobs[job_id]
            hold = self._dependency_hold(job)
            req = requests.get(job_id)
            if req is None or req.hold is not hold:
                req = requests[job_id] = allocator.Request(job.job_id, job.gpus, job.pins, job.user, job.time_limit,
                                                           job.array_job_id, job.array_limit, hold, job.gpu_mem_mb)
            yield req

    def _startable_behind(self, job_id: str, within: float | None, room: int | None):
        """The jobs queued behind ``job_id`` that may pass it (allocator.StartableBehind), as requests: what a
        pass that stopped there reads on."""
        return self._requests(self.state.pending.startable_behind(job_id, within, room))

    def _dependency_hold(self, job: JobRecord) -> allocator.WaitReason | None:
        return allocator.WaitReason.DEPENDENCY if self.dependencies.waits(job) else None

    def _leave_queue(self, job: JobRecord) -> None:
        """``job`` no longer waits (it starts, or ends without starting)."""
        self.state.pending.remove(job.job_id)
        self.requests.pop(job.job_id, None)
        self.own_reason.discard(job.job_id)

    def _set_reason(self, job: JobRecord, reason: allocator.WaitReason) -> None:
        """Tell subscribers why a job waits; not stored: after a restart the first pass says it again."""
        if job.reason != reason.value and job.state is JobState.PENDING:
            job.reason = reason.value
            (self.own_reason.add if reason.own else self.own_reason.discard)(job.job_id)
            self.publish_job(job, store=False)

    def _view(self) -> allocator.View:
        places = {n.node_id: n.placement() for n in self.state.nodes.values() if n.usable}
        nodes = self.state.nodes
        views, jobs = self.running_views, self.state.jobs
        # Cached views looked up in place: a call per running job cost 8,000 running jobs 6 ms a pass.
        running = [views.get(job_id) or self._running_view(jobs[job_id]) for job_id in self.state.running]
        return allocator.View(
            free={node_id: p.free for node_id, p in places.items()},
            capacity={node_id: [g.index for g in nodes[node_id].gpus] for node_id in places},
            load={node_id: len(nodes[node_id].ranks) for node_id in places},
            running=running, now=time.time(), user_gpu_limit=self.user_gpu_limit,
            room={node_id: p.room for node_id, p in places.items()},
            others={node_id: p.others for node_id, p in places.items() if p.others})

    def _settle_dependents(self, dep: JobRecord) -> None:
        """A job ended: cancel the pending jobs that needed it to complete (unless --after-any)."""
        for job_id in self.dependencies.ended(dep):
            if job_id in self.state.pending:
                job = self.state.jobs[job_id]
                self.cancel_if_dependency_failed(job)
                # One no longer held gets a new reason even if the next pass stops before it.
                self.unreasoned.add(job_id)

    def _running_view(self, job: JobRecord) -> allocator.Running:
        """What the allocator needs of a running job, rebuilt only when one of its ranks ends."""
        view = self.running_views.get(job.job_id)
        if view is None:
            view = self.running_views[job.job_id] = allocator.Running(
                [(r.node_id, r.gpu_indices) for _, r in job.live_ranks()], job.user, job.deadline, job.array_job_id,
                job.gpu_mem_mb)
        return view

    def cancel_if_dependency_failed(self, job: JobRecord) -> None:
        """Without --after-any, one --after job that ended badly cancels ``job`` at once."""
        if job.state is not JobState.PENDING:
            return
        why = self.dependencies.failure(job)
        if why is not None:
            self._leave_queue(job)
            self._finish(job, JobState.CANCELLED, why)

    def _start(self, job: JobRecord, placement: allocator.Placement) -> None:
        """Hold the GPUs and mark the job running; its DISPATCH goes out once that is stored.

        A job on several nodes meets at a port its first node picks: the ranks on
        the other nodes are held back until that node's JOB_STARTED names it.
        """
        if job.per_gpu:
            # One rank per GPU; a CPU job (no GPUs) keeps its one rank.
            placement = [(node, [i]) for node, indices in placement for i in indices] or placement
        first = placement[0][0]
        job.ranks = tuple(RankRecord(node_id, indices, held_back=node_id != first) for node_id, indices in placement)
        self.spool.starts_empty(job.job_id, len(job.ranks))
        job.master_port = None
        self._leave_queue(job)
        self.state.running.add(job.job_id)
        job.state, job.reason, job.start_time = JobState.RUNNING, None, time.time()
        for rank in range(len(job.ranks)):
            self.hold_rank(job, rank)
        where = " ".join(f"{r.node_id}:{','.join(map(str, r.gpu_indices)) or '-'}" for r in job.ranks)
        self.log.info("job %s started on %s for %s: %s", job.job_id, where, job.user, job.command)
        self.publish_job(job)
        self.to_dispatch.append((job, job.attempt, [i for i, r in enumerate(job.ranks) if not r.held_back]))

    def send_dispatches(self) -> None:
        """Send the DISPATCH messages of ranks whose RUNNING state is now on disk.

        Sending only after the commit means a master killed at any moment either
        never sent a rank (it is started again after a restart) or knows it runs.
        """
        queued, self.to_dispatch = self.to_dispatch, []
        for job, attempt, ranks in queued:
            if job.attempt != attempt or job.state is not JobState.RUNNING:
                continue   # cancelled or undone meanwhile
            for rank in ranks:
                if job.ranks[rank].ended:
                    continue
                if not self._dispatch(job, rank):
                    self.state.nodes[job.ranks[rank].node_id].reachable = False   # undo_start makes a pass due
                    self.undo_start(job, f"could not reach node {job.ranks[rank].node_id}")
                    break

    def undo_start(self, job: JobRecord, why: str) -> None:
        """Back to the queue as if never started (a new attempt number makes any sent rank stale).

        A job being cancelled or timed out is not started again: its ranks that never
        started end here, and the job ends once the others report.
        """
        if job.cancel_by or job.timed_out:
            for rank, part in job.live_ranks():
                if part.pid is None and job.state is JobState.RUNNING:
                    self.end_rank(job, rank, reason=f"not started: {why}")
            return
        self.kill_ranks(job, why)
        for rank in range(len(job.ranks)):
            self._release(job, rank)
        self.state.running.discard(job.job_id)
        self.log.info("job %s goes back to the queue: %s", job.job_id, why)
        self._next_attempt(job)

    def _next_attempt(self, job: JobRecord) -> None:
        """Back to the queue as a new attempt, with a clean record: the old attempt's output is set aside
        (the next one starts its own), and a rank of it that failed or timed out is not the new one's (else
        repeat_kill would stop the new attempt for it)."""
        self.spool.set_aside(job.job_id, len(job.ranks), job.attempt)
        job.attempt += 1
        job.ranks, job.first_failed, job.timed_out = (), None, False
        job.state, job.reason, job.start_time = JobState.PENDING, None, None
        self.enqueue(job)

    def _dispatch(self, job: JobRecord, rank: int) -> bool:
        part = job.ranks[rank]
        env = job.env
        if job.array_job_id is not None:
            env = {**env, "ZMGPU_ARRAY_JOB_ID": job.array_job_id, "ZMGPU_ARRAY_TASK_ID": str(job.array_task_id)}
        body = {"job_id": job.job_id, "rank": rank, "attempt": job.attempt, "command": job.command,
                "cwd": job.cwd, "env": env, "gpu_indices": part.gpu_indices, "kill_grace": self.kill_grace,
                "gpu_mem_mb": job.gpu_mem_mb, "launch": self._launch_env(job, rank)}
        # Whose account the rank runs under is the node's business; whether that may be root, the master's.
        body.update(user=job.user, allow_root=self.allow_root_jobs)
        return self.reactor.send(self.state.route(part.node_id), MsgType.DISPATCH, body)

    def _launch_env(self, job: JobRecord, rank: int) -> dict[str, str]:
        """The torchrun variables of one rank; MASTER_PORT is left to the job's first node to pick.

        Default: one process per node, whose LOCAL_WORLD_SIZE is its GPU count and whose
        RANK is the global rank of its first GPU (what torchrun will hand that GPU's
        worker).  --per-gpu: each process is one worker of that world.
        """
        part = job.ranks[rank]
        nodes = list(dict.fromkeys(r.node_id for r in job.ranks))
        if job.per_gpu:
            local = [i for i, r in enumerate(job.ranks) if r.node_id == part.node_id]
            world, global_rank, local_rank, local_world = len(job.ranks), rank, local.index(rank), len(local)
        else:
            sizes = [max(len(r.gpu_indices), 1) for r in job.ranks]
            world, global_rank, local_rank, local_world = sum(sizes), sum(sizes[:rank]), 0, sizes[rank]
        env = {"MASTER_ADDR": self._rendezvous_host(nodes),
               "WORLD_SIZE": world, "RANK": global_rank, "LOCAL_RANK": local_rank, "LOCAL_WORLD_SIZE": local_world,
               "NODE_RANK": nodes.index(part.node_id), "NNODES": len(nodes)}
        if job.master_port is not None:
            env["MASTER_PORT"] = job.master_port
        return {name: str(value) for name, value in env.items()}

    def _rendezvous_host(self, nodes: list[str]) -> str:
        """An address of the job's first node that its other nodes can reach.

        A first node beside the master may know itself only as 127.0.0.1 (its route to
        the master is loopback): the others then reach it by the name they use for the master.
        """
        first = self.state.nodes.get(nodes[0])
        if len(nodes) == 1 or first is None:
            return "127.0.0.1"
        if not is_loopback(first.address):
            return first.address
        others = [self.state.nodes[n].master_host for n in nodes[1:] if n in self.state.nodes]
        return next((h for h in others if h and not is_loopback(h)), first.address)

    def kill_ranks(self, job: JobRecord, reason: str) -> None:
        """Ask every node holding a live rank of ``job`` to stop it; ranks never dispatched just end."""
        job.kill_sent = time.time()
        body = {"job_id": job.job_id, "attempt": job.attempt, "reason": reason}
        # Ranks whose DISPATCH waits for the end of this turn would reach their node after the KILL.
        unsent = {rank for queued, attempt, ranks in self.to_dispatch if queued is job and attempt == job.attempt
                  for rank in ranks}
        for rank, part in job.live_ranks():
            if part.held_back or rank in unsent:
                part.ended, part.reason = True, f"not started: {reason}"
                self._release(job, rank)
        for node_id in {r.node_id for _, r in job.live_ranks()}:
            self.reactor.send(self.state.route(node_id), MsgType.KILL, body)
        self._end_if_done(job)

    # -- timers --------------------------------------------------------------------------------

    def check_time_limits(self) -> None:
        """Stop running jobs whose time limit has run out, and ask again where a stop went unheeded.

        A KILL can be lost (its node's link was down); a job that should have
        ended keeps being asked, once per grace period, until its ranks report.
        """
        now = time.time()
        for job_id in list(self.state.running):     # a kill may end a job whose ranks never went out
            job = self.state.jobs[job_id]
            deadline = job.deadline
            if deadline is not None and now >= deadline and not job.timed_out and job.cancel_by is None:
                job.timed_out = True
                self.store.job_changed(job)
                self.log.info("job %s reached its time limit of %s", job.job_id, format_duration(job.time_limit))
                self.kill_ranks(job, self._stop_reason(job))
            elif job.kill_sent and now - job.kill_sent > self.kill_grace + 5:
                self.repeat_kill(job)

    def repeat_kill(self, job: JobRecord) -> None:
        """Send the KILL of a job cancelled, timed out or with a failed rank again (the first may be lost)."""
        reason = self._stop_reason(job)
        if reason is not None:
            self.kill_ranks(job, reason)

    @staticmethod
    def _stop_reason(job: JobRecord) -> str | None:
        """Why a running job's ranks are being stopped, as its first KILL and any repeat say; None: they are not."""
        if job.cancel_by is not None:
            return f"cancelled by {job.cancel_by}"
        if job.timed_out:
            return "time limit reached"
        if job.first_failed is not None:
            return f"rank {job.first_failed} on {job.ranks[job.first_failed].node_id} failed"
        return None

    def purge_finished(self) -> None:
        """Forget finished jobs older than the retention time, with their output.

        A job's dependents were settled when it ended, so forgetting it cannot change them.
        """
        cutoff = time.time() - self.retention
        old = [j for j in self.state.jobs.values() if j.state.finished and j.end_time < cutoff]
        for job in old:
            del self.state.jobs[job.job_id]
            self.store.job_deleted(job.job_id)
            self._drop_from_array(job)
            self.dependencies.forget(job)
        self.spool.discard({job.job_id for job in old})
        if old:
            self.log.info("forgot %d job(s) that ended more than %s ago", len(old), format_duration(self.retention))

    # -- node agent messages ---------------------------------------------------------------------

    def _rank_from(self, identity: bytes, body: dict) -> tuple[JobRecord, RankRecord] | None:
        """The rank a node message is about, if that node really runs it (and in this attempt)."""
        job = self.state.jobs.get(body["job_id"])
        rank = body["rank"]
        if job is not None and body.get("attempt", 0) != job.attempt:
            self.log.debug("node %s reported stale attempt %s of job %s; ignored",
                           identity.decode(errors="replace"), body.get("attempt"), job.job_id)
            return None
        if job is None or not 0 <= rank < len(job.ranks) or self.state.route(job.ranks[rank].node_id) != identity:
            self.log.warning("node %s reported unknown job %s rank %s; ignored",
                             identity.decode(errors="replace"), body["job_id"], rank)
            return None
        return job, job.ranks[rank]

    def on_job_started(self, identity: bytes, msg: Message) -> None:
        """A rank's process is running; the first node's names the rendezvous port the other nodes wait for."""
        found = self._rank_from(identity, msg.body)
        if not found:
            return
        self._started(*found, msg.body)

    def _started(self, job: JobRecord, part: RankRecord, body: dict) -> None:
        """Record a rank's start (from JOB_STARTED, or from the JOB_ENDED of a rank that ended first)."""
        part.pid = body["pid"]
        self.store.job_changed(job)
        port = body.get("master_port")
        held = [i for i, r in job.live_ranks() if r.held_back]
        if held and part.node_id == job.ranks[0].node_id:
            job.master_port = port if isinstance(port, int) else None
            for i in held:
                job.ranks[i].held_back = False
            self.to_dispatch.append((job, job.attempt, held))

    def on_output(self, identity: bytes, msg: Message) -> None:
        """Spool a chunk by offset, publish what is new, ask for a resend on a gap."""
        body = msg.body
        if body["stream"] not in STREAMS or self._rank_from(identity, body) is None:
            return
        key = (body["job_id"], body["rank"], body["stream"])
        result = self.spool.append(key, body["offset"], msg.payload[0])
        if result.gap:
            self.ask_resend(identity, *key, result.offset)
        elif result.data:
            self.reactor.publish(protocol.job_topic(body["job_id"], "output"), MsgType.OUTPUT,
                                 lambda: {**_keyed(key), "offset": result.offset}, result.data)

    def ask_resend(self, route: bytes, job_id: str, rank: int, stream: str, offset: int | None = None) -> None:
        """Ask a node for a stream again from ``offset`` (None: from what the master holds)."""
        key = (job_id, rank, stream)
        self.reactor.send(route, MsgType.RESEND, {**_keyed(key), "offset": self.spool.size(key) if offset is None
                                                  else offset})

    def on_job_ended(self, identity: bytes, msg: Message) -> None:
        """A rank's process ended (or never started): record it through the common path.

        A rank its node refused to start (others took its GPUs meanwhile) puts the
        job back in line rather than failing it.
        """
        found = self._rank_from(identity, msg.body)
        if found is None or found[1].ended:
            return
        job, body = found[0], msg.body
        if isinstance(body.get("refused"), str):
            self.undo_start(job, f"node {found[1].node_id} refused it: {body['refused']}")
            return
        if has_type(body.get("pid"), int) and found[1].pid is None:
            self._started(job, found[1], body)   # it ended before its start went out: both come at once
        node = self.state.nodes.get(found[1].node_id)
        dirty = body.get("dirty_gpus")
        if node is not None and isinstance(dirty, list):
            # Before the GPUs are released, so that no job is placed on a GPU its processes still hold.
            node.mark_dirty([i for i in dirty if i in found[1].gpu_indices], job.job_id)
        if isinstance(body.get("peak_gpu_mem_mb"), int):
            found[1].peak_gpu_mem_mb = body["peak_gpu_mem_mb"]
        self.settle_rank(identity, job, body["rank"], body)

    def settle_rank(self, identity: bytes, job: JobRecord, rank: int, report: dict) -> None:
        """End a rank as its node reports it (JOB_ENDED, or an ended entry of a REGISTER)."""
        part = job.ranks[rank]
        sizes = report.get("sizes")
        for stream, size in (sizes.items() if isinstance(sizes, dict) else ()):
            if stream not in STREAMS or not isinstance(size, int):
                continue
            part.final_sizes[stream] = size
            if self.spool.size((job.job_id, rank, stream)) < size:
                self.ask_resend(identity, job.job_id, rank, stream)
        exit_code, signal, reason = report.get("exit_code"), report.get("signal"), report.get("reason")
        self.end_rank(job, rank, exit_code if isinstance(exit_code, int) else None,
                      signal if isinstance(signal, int) else None, reason if isinstance(reason, str) else None)

    # -- ending ----------------------------------------------------------------------------------

    def hold_rank(self, job: JobRecord, rank: int) -> None:
        """Mark one rank's GPUs as held and the rank as placed on its node (undone by :meth:`_release`)."""
        part = job.ranks[rank]
        node = self.state.nodes[part.node_id]
        if job.gpu_mem_mb is None:
            node.holders.update(dict.fromkeys(part.gpu_indices, job.job_id))
        else:
            for index in part.gpu_indices:
                node.shares.setdefault(index, {})[job.job_id] = job.gpu_mem_mb
        node.ranks.add((job.job_id, rank))

    def _release(self, job: JobRecord, rank: int) -> None:
        """Give one rank's GPUs and its place on its node back: a pass may now start something."""
        self.dirty = True
        part = job.ranks[rank]
        node = self.state.nodes.get(part.node_id)
        if node is not None:
            for index in part.gpu_indices:
                if node.holders.get(index) == job.job_id:
                    del node.holders[index]
                shared = node.shares.get(index, {})
                shared.pop(job.job_id, None)
                if not shared:
                    node.shares.pop(index, None)
            node.ranks.discard((job.job_id, rank))
        self.running_views.pop(job.job_id, None)

    def end_rank(self, job: JobRecord, rank: int, exit_code: int | None = None,
                 signal: int | None = None, reason: str | None = None, lost: bool = False) -> None:
        """Record how one rank ended, free its GPUs, and end the job when no rank is left."""
        part = job.ranks[rank]
        part.ended, part.exit_code, part.signal, part.reason, part.lost = True, exit_code, signal, reason, lost
        self._release(job, rank)
        self.store.job_changed(job)
        if part.failed and job.first_failed is None:
            job.first_failed = rank
            if job.live_ranks() and job.cancel_by is None and not job.timed_out:
                # One rank failing dooms a gang job: stop the others (unless stopping already).  Only the first
                # failure says so: each later one made a KILL per rank per node (65,920 for 1,024 ranks on 128
                # nodes), each a read of every process on the node.  A lost KILL is repeated (repeat_kill).
                self.kill_ranks(job, self._stop_reason(job))
        self._end_if_done(job)

    def _end_if_done(self, job: JobRecord) -> None:
        """Once no rank of a running job is left, it ends (or goes back to the queue); once only."""
        if job.state is not JobState.RUNNING or job.live_ranks():
            return
        self.state.running.discard(job.job_id)
        if self._should_requeue(job):
            self._requeue(job)
        else:
            self._finish(job, *self._verdict(job))

    def _should_requeue(self, job: JobRecord) -> bool:
        lost = any(r.lost for r in job.ranks)
        return lost and job.requeue and job.cancel_by is None and job.requeue_count < self.max_requeue

    def _requeue(self, job: JobRecord) -> None:
        """Back to the queue with the same id after a node failure; the old attempt's output is set aside."""
        lost = next(r for r in job.ranks if r.lost)
        self.log.info("job %s requeued (%d of at most %d): %s", job.job_id, job.requeue_count + 1,
                      self.max_requeue, lost.reason)
        job.requeue_count += 1
        self._next_attempt(job)

    def _verdict(self, job: JobRecord) -> tuple[JobState, str | None]:
        """Final state and reason once every rank has ended."""
        first = job.ranks[job.first_failed] if job.first_failed is not None else None
        job.exit_code, job.signal = (first.exit_code, first.signal) if first else (0, None)
        if job.cancel_by is not None:
            return JobState.CANCELLED, f"cancelled by {job.cancel_by}"
        if job.timed_out:
            return JobState.TIMEOUT, f"time limit of {format_duration(job.time_limit)} reached"
        lost = next((r for r in job.ranks if r.lost), None)
        if lost is not None:
            return JobState.NODE_FAIL, lost.reason
        if first is None:
            return JobState.COMPLETED, None
        what = first.reason or (f"killed by signal {first.signal}" if first.signal
                                else f"exited with code {first.exit_code}")
        if len(job.ranks) > 1:
            what = f"rank {job.first_failed} on {first.node_id}: {what}"
        return JobState.FAILED, what

    def _finish(self, job: JobRecord, state: JobState, reason: str | None) -> None:
        job.state, job.reason, job.end_time = state, reason, time.time()
        status = (f"signal {job.signal}" if job.signal else f"exit code {job.exit_code}"
                  if job.exit_code is not None else "no exit code")
        self.log.info("job %s ended %s (%s)%s", job.job_id, state.value, status,
                      f": {reason}" if reason else "")
        self.dirty = True   # jobs that depend on it may now start or be cancelled
        self.publish_job(job)
        self.unreasoned.discard(job.job_id)
        self._settle_dependents(job)


def _keyed(key: tuple[str, int, str]) -> dict:
    """A (job id, rank, stream) key as the fields of an OUTPUT or RESEND message."""
    return dict(zip(("job_id", "rank", "stream"), key))
