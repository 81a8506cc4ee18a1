"""Job lifecycle on the master: submit, schedule, dispatch, output, end, cancel.

Every way a job can end (its processes exit, a cancel, a lost node) goes
through :meth:`JobService.end_rank`, so the state, the released GPUs, the log
line and the published event are the same whatever happened.
"""

from __future__ import annotations

import logging
import os
import secrets
import time

from .. import protocol
from ..model import JobState, parse_node_gpu_ids
from ..protocol import CHUNK_BYTES, ErrorCode, Message, MsgType, Stream, error_reply, ok_reply
from . import allocator
from .output import OutputSpool
from .reactor import Reactor
from .state import ClusterState, JobRecord, RankRecord

_STREAMS = {s.value for s in Stream}


class JobService:
    """Handlers for client requests and for the job messages of node agents."""

    def __init__(self, state: ClusterState, reactor: Reactor, spool: OutputSpool,
                 kill_grace: float, log: logging.Logger):
        self.state = state
        self.reactor = reactor
        self.spool = spool
        self.kill_grace = kill_grace
        self.log = log
        self.dirty = False   # something changed that may let a pending job start

    def handlers(self) -> dict:
        return {
            MsgType.PING: self.on_ping,
            MsgType.SUBMIT: self.on_submit,
            MsgType.QUEUE: self.on_queue,
            MsgType.JOB: self.on_job,
            MsgType.CANCEL: self.on_cancel,
            MsgType.FETCH: self.on_fetch,
            MsgType.JOB_STARTED: self.on_job_started,
            MsgType.OUTPUT: self.on_output,
            MsgType.JOB_ENDED: self.on_job_ended,
        }

    # -- client requests -----------------------------------------------------------------------

    def _reply(self, identity: bytes, body: dict, *payload: bytes) -> None:
        self.reactor.send(identity, MsgType.REPLY, body, *payload)

    def _fail(self, identity: bytes, msg: Message, code: ErrorCode, message: str) -> None:
        self._reply(identity, error_reply(msg.body["req"], code, message))

    def on_ping(self, identity: bytes, msg: Message) -> None:
        """Answer a liveness check with the protocol version."""
        self._reply(identity, ok_reply(msg.body["req"], version=protocol.PROTOCOL_VERSION))

    def on_submit(self, identity: bytes, msg: Message) -> None:
        """Validate a job, queue it, and answer with its id."""
        try:
            job = self._new_job(msg.body["user"], msg.body["job"])
        except ValueError as exc:
            self._fail(identity, msg, ErrorCode.BAD_REQUEST, str(exc))
            return
        request = allocator.Request(job.job_id, job.gpus, job.pins)
        capacity = [allocator.NodeCapacity(n.node_id, tuple(g.index for g in n.gpus))
                    for n in self.state.nodes.values()]
        problem = allocator.infeasible(request, capacity)
        if problem:
            self._fail(identity, msg, ErrorCode.IMPOSSIBLE, problem)
            return
        self.state.jobs[job.job_id] = job
        self.state.pending[job.job_id] = None
        self.dirty = True
        self.log.debug("job %s submitted by %s: %s", job.job_id, job.user, job.command)
        self._reply(identity, ok_reply(msg.body["req"], job_id=job.job_id))
        self.publish_job(job)

    def _new_job(self, user: str, spec: dict) -> JobRecord:
        """Build a job record from a SUBMIT body; ValueError names what is wrong."""
        command, cwd, env = spec.get("command"), spec.get("cwd"), spec.get("env")
        gpus, pin_spec = spec.get("gpus", 0), spec.get("node_gpu_ids")
        if not isinstance(command, str) or not command.strip():
            raise ValueError("the job has no command")
        if not isinstance(cwd, str) or not os.path.isabs(cwd):
            raise ValueError("the job's working directory must be an absolute path")
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                for k, v in env.items()):
            raise ValueError("the job's environment must map names to strings")
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
            raise ValueError("--gpus must be a whole number >= 0")
        pins = None
        if pin_spec is not None:
            if not isinstance(pin_spec, str):
                raise ValueError("--node-gpu-ids must be a string")
            pins = parse_node_gpu_ids(pin_spec)
            pinned = sum(len(v) for v in pins.values())
            if gpus and gpus != pinned:
                raise ValueError(f"--gpus {gpus} does not match the {pinned} GPU(s) named in --node-gpu-ids")
            gpus = pinned
        job_id = secrets.token_hex(4)
        while job_id in self.state.jobs:
            job_id = secrets.token_hex(4)
        self.state.next_seq += 1
        return JobRecord(job_id=job_id, seq=self.state.next_seq, user=user, command=command,
                         cwd=cwd, env=env, gpus=gpus, pins=pins, node_gpu_ids=pin_spec,
                         interactive=bool(spec.get("interactive", False)))

    def job_dict(self, job: JobRecord) -> dict:
        return job.to_dict(self.spool.sizes)

    def on_queue(self, identity: bytes, msg: Message) -> None:
        """List jobs (active ones, or all with ``all``) and nodes."""
        everything = bool(msg.body.get("all"))
        jobs = [self.job_dict(j) for j in self.state.jobs.values()
                if everything or not j.state.finished]
        nodes = [n.to_dict() for n in self.state.nodes.values()]
        self._reply(identity, ok_reply(msg.body["req"], jobs=jobs, nodes=nodes))

    def _find(self, identity: bytes, msg: Message, job_id: str) -> JobRecord | None:
        job = self.state.jobs.get(job_id)
        if job is None:
            self._fail(identity, msg, ErrorCode.UNKNOWN_JOB, f"unknown job id '{job_id}'")
        return job

    def on_job(self, identity: bytes, msg: Message) -> None:
        """One job's dict."""
        job = self._find(identity, msg, msg.body["job_id"])
        if job is not None:
            self._reply(identity, ok_reply(msg.body["req"], job=self.job_dict(job)))

    def on_fetch(self, identity: bytes, msg: Message) -> None:
        """Output bytes the master holds, from an offset (the snapshot half of the Clone pattern)."""
        body = msg.body
        job = self._find(identity, msg, body["job_id"])
        if job is None:
            return
        if body["stream"] not in _STREAMS or not 0 <= body["rank"] < max(len(job.ranks), 1):
            self._fail(identity, msg, ErrorCode.BAD_REQUEST, "no such rank or stream for this job")
            return
        key = (job.job_id, body["rank"], body["stream"])
        offset = max(0, body["offset"])
        data = self.spool.read(key, offset, CHUNK_BYTES)
        self._reply(identity, ok_reply(body["req"], offset=offset, size=self.spool.size(key)), data)

    def on_cancel(self, identity: bytes, msg: Message) -> None:
        """Cancel each listed job; one result per id."""
        results = [self._cancel_one(str(job_id), msg.body["user"]) for job_id in msg.body["job_ids"]]
        self._reply(identity, ok_reply(msg.body["req"], results=results))

    def _cancel_one(self, job_id: str, user: str) -> dict:
        job = self.state.jobs.get(job_id)
        if job is None:
            return {"job_id": job_id, "ok": False, "message": f"unknown job id '{job_id}'"}
        if job.state.finished:
            return {"job_id": job_id, "ok": False,
                    "message": f"job {job_id} already ended ({job.state.value})"}
        reason = f"cancelled by {user}"
        if job.state is JobState.PENDING:
            self.state.pending.pop(job_id, None)
            self._finish(job, JobState.CANCELLED, reason)
        else:
            job.cancel_by = user
            self.kill_ranks(job, reason)
        return {"job_id": job_id, "ok": True, "message": f"cancelled job {job_id}"}

    # -- scheduling and dispatch -------------------------------------------------------------

    def schedule(self) -> None:
        """One placement pass over the pending queue, if anything changed since the last."""
        if not self.dirty:
            return
        self.dirty = False
        nodes = self.state.nodes.values()
        free = {n.node_id: n.free_gpus() for n in nodes if n.up}
        load = {n.node_id: len(n.ranks) for n in nodes if n.up}
        down = {n.node_id for n in nodes if not n.up}
        pending = [self.state.jobs[jid] for jid in self.state.pending]
        requests = [allocator.Request(j.job_id, j.gpus, j.pins) for j in pending]
        starts, waits = allocator.schedule(requests, free, load, down)
        for job_id, reason in waits.items():
            job = self.state.jobs[job_id]
            if job.reason != reason.value:
                job.reason = reason.value
                self.publish_job(job)
        for job_id, placement in starts:
            self._start(self.state.jobs[job_id], placement)

    def _start(self, job: JobRecord, placement: allocator.Placement) -> None:
        """Hold the GPUs, mark the job running, and dispatch one rank per node."""
        del self.state.pending[job.job_id]
        job.ranks = [RankRecord(node_id, indices) for node_id, indices in placement]
        job.state, job.reason, job.start_time = JobState.RUNNING, None, time.time()
        for rank, part in enumerate(job.ranks):
            node = self.state.nodes[part.node_id]
            node.holders.update(dict.fromkeys(part.gpu_indices, job.job_id))
            node.ranks.add((job.job_id, rank))
        where = " ".join(f"{r.node_id}:{','.join(map(str, r.gpu_indices)) or '-'}" for r in job.ranks)
        self.log.info("job %s started on %s for %s: %s", job.job_id, where, job.user, job.command)
        self.publish_job(job)
        for rank, part in enumerate(job.ranks):
            body = {"job_id": job.job_id, "rank": rank, "command": job.command, "cwd": job.cwd,
                    "env": job.env, "gpu_indices": part.gpu_indices, "kill_grace": self.kill_grace}
            if not self.reactor.send(part.node_id.encode(), MsgType.DISPATCH, body):
                self.end_rank(job, rank, reason=f"could not reach node {part.node_id} to start the job")

    def kill_ranks(self, job: JobRecord, reason: str) -> None:
        """Ask every node holding a live rank of ``job`` to stop it."""
        for node_id in {r.node_id for _, r in job.live_ranks()}:
            self.reactor.send(node_id.encode(), MsgType.KILL, {"job_id": job.job_id, "reason": reason})

    # -- node agent messages ---------------------------------------------------------------------

    def _rank_from(self, identity: bytes, body: dict) -> tuple[JobRecord, RankRecord] | None:
        """The rank a node message is about, if that node really runs it."""
        job = self.state.jobs.get(body["job_id"])
        rank = body["rank"]
        if job is None or not 0 <= rank < len(job.ranks) or job.ranks[rank].node_id.encode() != identity:
            self.log.warning("node %s reported unknown job %s rank %s; ignored",
                             identity.decode(errors="replace"), body["job_id"], rank)
            return None
        return job, job.ranks[rank]

    def on_job_started(self, identity: bytes, msg: Message) -> None:
        """A rank's process is running."""
        found = self._rank_from(identity, msg.body)
        if found:
            found[1].pid = msg.body["pid"]

    def on_output(self, identity: bytes, msg: Message) -> None:
        """Spool a chunk by offset, publish what is new, ask for a resend on a gap."""
        body = msg.body
        if body["stream"] not in _STREAMS or self._rank_from(identity, body) is None:
            return
        key = (body["job_id"], body["rank"], body["stream"])
        result = self.spool.append(key, body["offset"], msg.payload[0])
        if result.gap:
            self.reactor.send(identity, MsgType.RESEND, {**_rank_key(body), "offset": result.offset})
        elif result.data:
            self.reactor.publish(protocol.job_topic(body["job_id"], "output"), MsgType.OUTPUT,
                                 {**_rank_key(body), "offset": result.offset}, result.data)

    def on_job_ended(self, identity: bytes, msg: Message) -> None:
        """A rank's process ended (or never started): record it through the common path."""
        body = msg.body
        found = self._rank_from(identity, body)
        if found is None or found[1].ended:
            return
        job, part = found
        for stream, size in body["sizes"].items():
            if stream not in _STREAMS or not isinstance(size, int):
                continue
            part.final_sizes[stream] = size
            held = self.spool.size((job.job_id, body["rank"], stream))
            if held < size:
                self.reactor.send(identity, MsgType.RESEND,
                                  {"job_id": job.job_id, "rank": body["rank"], "stream": stream, "offset": held})
        self.end_rank(job, body["rank"], body["exit_code"], body["signal"], body["reason"])

    # -- ending ----------------------------------------------------------------------------------

    def end_rank(self, job: JobRecord, rank: int, exit_code: int | None = None,
                 signal: int | None = None, reason: str | None = None, lost: bool = False) -> None:
        """Record how one rank ended, free its GPUs, and end the job when no rank is left."""
        part = job.ranks[rank]
        part.ended, part.exit_code, part.signal, part.reason, part.lost = True, exit_code, signal, reason, lost
        node = self.state.nodes.get(part.node_id)
        if node is not None:
            for index in part.gpu_indices:
                if node.holders.get(index) == job.job_id:
                    del node.holders[index]
            node.ranks.discard((job.job_id, rank))
        self.dirty = True
        if part.failed and job.first_failed is None:
            job.first_failed = rank
        if part.failed and job.live_ranks() and job.cancel_by is None:
            # One rank failing dooms a gang job: stop the others rather than let them hang.
            self.kill_ranks(job, f"rank {rank} on {part.node_id} failed")
        if not job.live_ranks():
            self._finish(job, *self._verdict(job))

    def _verdict(self, job: JobRecord) -> tuple[JobState, str | None]:
        """Final state and reason once every rank has ended."""
        first = job.ranks[job.first_failed] if job.first_failed is not None else None
        job.exit_code, job.signal = (first.exit_code, first.signal) if first else (0, None)
        if job.cancel_by is not None:
            return JobState.CANCELLED, f"cancelled by {job.cancel_by}"
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
        self.publish_job(job)

    def publish_job(self, job: JobRecord) -> None:
        self.reactor.publish(protocol.job_topic(job.job_id, "state"), MsgType.JOB_STATE, self.job_dict(job))


def _rank_key(body: dict) -> dict:
    return {"job_id": body["job_id"], "rank": body["rank"], "stream": body["stream"]}
