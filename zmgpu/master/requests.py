"""Client requests to the master: one handler per message type, each answering with one REPLY.

Handlers validate what the client asked, act through the job service or the
node records, and answer ``{"ok": true, ...}`` or a typed error whose message
the CLI prints as it is.  Who may do what is decided here: admins (the
master's ``admins`` list) may raise priorities and drain or resume nodes; a
job's owner or an admin may cancel it and read its output (access.py); a
submit must keep within the master's limits (:class:`SubmitLimits`), so no
client can fill the master's memory with one huge job or a flood of them.
"""

from __future__ import annotations

import functools
import itertools
import os
import secrets
import time
from dataclasses import dataclass, field

from .. import protocol
from ..model import (JobState, format_array_spec, format_duration, gpu_room, has_type, is_job_id, parse_array_spec,
                     parse_node_gpu_ids)
from ..protocol import CHUNK_BYTES, ErrorCode, Message, MsgType, error_reply, ok_reply
from . import allocator
from .access import Access
from .jobs import JobService
from .output import STREAMS
from .state import ClusterState, JobRecord, NodeRecord
from .registry import NodeRegistry
from .store import Store, StoreError, env_id



class RequestError(Exception):
    """A request that cannot be served; becomes an error reply."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Outgoing:
    """A reply held until the turn's changes are stored."""

    identity: bytes
    body: dict
    payload: list[bytes]
    new_jobs: list[str] = field(default_factory=list)   # jobs this reply acknowledges


@dataclass(frozen=True)
class SubmitLimits:
    """What one submit may ask for (the master's YAML)."""

    max_command_bytes: int = 128 << 10
    max_env_bytes: int = 1 << 20
    max_pending_per_user: int = 10000
    allow_root_jobs: bool = False
    default_time_limit: int | None = None
    max_time_limit: int | None = None


@dataclass(frozen=True)
class CheckedEnv:
    """A job environment that passed the checks, with the content hash the store keeps it under."""

    env: dict
    env_id: str


class Environments:
    """Job environments, checked and hashed once for each user's run of equal ones.

    A user's submits nearly always carry the same environment (their shell's), and
    checking and hashing one costs more than the rest of a submit; an equal one
    is also kept as the same dict, once in memory however many jobs carry it.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.last: dict[str, CheckedEnv] = {}    # user -> the environment of their latest submit

    def checked(self, user: str, env) -> CheckedEnv:
        """``env`` checked (RequestError TOO_LARGE, ValueError for a malformed one), with its hash."""
        last = self.last.get(user)
        if last is not None and env == last.env:
            return last
        if not isinstance(env, dict):
            raise ValueError("the job's environment must map names to strings")
        size = sum(len(str(k).encode()) + len(str(v).encode()) + 2 for k, v in env.items())
        if size > self.max_bytes:
            raise RequestError(ErrorCode.TOO_LARGE, f"the environment is {size} bytes; this master takes "
                                                    f"at most {self.max_bytes} (max_env_bytes): "
                                                    f"submit with a smaller environment")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("the job's environment must map names to strings")
        checked = self.last[user] = CheckedEnv(env, env_id(env))
        return checked


#: The nodes a QUEUE's ``nodes`` asks for: all (the default), none, or those whose GPUs others use.
_NODE_CHOICES = {True: lambda nodes: nodes, False: lambda nodes: (),
                 "foreign": lambda nodes: [node for node in nodes if node.used_by_others()]}


class ClientRequests:
    """Handlers for everything a ``zmgpu`` client may ask."""

    def __init__(self, state: ClusterState, jobs: JobService, registry: NodeRegistry, access: Access,
                 limits: SubmitLimits, exposed: bool = False):
        self.state = state
        self.jobs = jobs
        self.registry = registry
        self.access = access
        self.limits = limits
        self.environments = Environments(limits.max_env_bytes)
        self.exposed = exposed   # listening beyond loopback without keys (--insecure): every NODES reply says so
        self.outbox: list[Outgoing] = []
        self._new_jobs: list[str] = []   # jobs created by the request being served
        self._capacity_list: list[allocator.NodeCapacity] = []
        self._capacity_of = -1           # the state.nodes_version it was built for

    def handlers(self) -> dict:
        table = {
            MsgType.PING: self.on_ping,
            MsgType.SUBMIT: self.on_submit,
            MsgType.QUEUE: self.on_queue,
            MsgType.JOB: self.on_job,
            MsgType.NODES: self.on_nodes,
            MsgType.CANCEL: self.on_cancel,
            MsgType.FETCH: self.on_fetch,
            MsgType.DRAIN: self.on_drain,
            MsgType.RESUME: self.on_resume,
        }
        return {msg_type: self._replying(handler) for msg_type, handler in table.items()}

    def _replying(self, handler):
        """Wrap a handler that returns reply fields (and payload) or raises RequestError."""
        def serve(identity: bytes, msg: Message) -> None:
            req = msg.body["req"]
            self._new_jobs = []
            try:
                fields, *payload = handler(msg.body)
                body = ok_reply(req, **fields)
            except RequestError as exc:
                body, payload = error_reply(req, exc.code, str(exc)), []
            self.outbox.append(Outgoing(identity, body, payload, self._new_jobs))
        serve.__name__ = handler.__name__
        return serve

    def commit_and_reply(self, store: Store) -> None:
        """Store the turn's changes, then answer: a submit is acknowledged only once it is on disk."""
        if not self.outbox:
            return   # nothing to answer: the end-of-turn commit will do
        try:
            store.flush()
        except StoreError as exc:
            self._revoke(exc)
        for out in self.outbox:
            self.jobs.reactor.send(out.identity, MsgType.REPLY, out.body, *out.payload)
        self.outbox.clear()

    def _revoke(self, exc: StoreError) -> None:
        """Turn this turn's unsaved submits into errors and forget those jobs."""
        for out in self.outbox:
            if not out.new_jobs:
                continue
            self.jobs.log.error("%s; refusing a submit", exc)
            for job_id in out.new_jobs:
                self.jobs.unqueue(self.state.jobs[job_id])
            out.body = error_reply(out.body["req"], ErrorCode.STORE_FAILED,
                                   f"the master could not store the job, so it was not queued ({exc})")
            out.payload = []

    # -- lookups ---------------------------------------------------------------------------------

    def _job(self, job_id: str) -> JobRecord:
        job = self.state.jobs.get(job_id)
        if job is None:
            raise RequestError(ErrorCode.UNKNOWN_JOB, f"unknown job id '{job_id}'")
        return job

    def _node(self, node_id: str) -> NodeRecord:
        node = self.state.nodes.get(node_id)
        if node is None:
            known = ", ".join(sorted(self.state.nodes)) or "none"
            raise RequestError(ErrorCode.UNKNOWN_NODE, f"unknown node '{node_id}' (registered nodes: {known})")
        return node

    def _admin(self, user: str, what: str) -> None:
        if not self.access.is_admin(user):
            raise RequestError(ErrorCode.PERMISSION_DENIED,
                               f"permission denied: only admins may {what} (see 'admins' in the master's YAML)")

    def _readable(self, job: JobRecord, user: str) -> JobRecord:
        """``job``, if ``user`` may read its output: its owner or an admin."""
        if not self.access.may_act(user, job.user):
            raise RequestError(ErrorCode.PERMISSION_DENIED, _not_yours(job.job_id, job.user, "read its output"))
        return job

    # -- handlers --------------------------------------------------------------------------------

    def on_ping(self, body: dict) -> tuple:
        """Answer a liveness check with the protocol version and the PUB port (a client may not know it)."""
        return ({"version": protocol.PROTOCOL_VERSION, "pub_port": self.jobs.reactor.pub_port},)

    def on_submit(self, body: dict) -> tuple:
        """Validate a job (or an array of them), queue it, and answer with its id."""
        user, spec = body["user"], body["job"]
        if user == "root" and not self.limits.allow_root_jobs:
            raise RequestError(ErrorCode.PERMISSION_DENIED,
                               "permission denied: jobs do not run as root on this cluster; submit as an "
                               "ordinary user (or set allow_root_jobs: true in the master's YAML)")
        self._check_sizes(spec)
        try:
            template = self._template(user, spec)
            array = spec.get("array")
            indices, limit = parse_array_spec(array) if array is not None else (None, None)
        except (ValueError, TypeError) as exc:
            raise RequestError(ErrorCode.BAD_REQUEST, str(exc)) from None
        problem = allocator.infeasible(allocator.Request("", template.gpus, template.pins,
                                                         gpu_mem=template.gpu_mem_mb), self._capacity())
        cap = self.jobs.user_gpu_limit
        if problem is None and cap is not None and template.gpus > cap:
            problem = f"the job asks for {template.gpus} GPUs, but one user may hold at most {cap} at once"
        if problem:
            raise RequestError(ErrorCode.IMPOSSIBLE, problem)
        self._check_pending(user, len(indices) if indices is not None else 1)
        base_id = self._new_id()
        if indices is None:
            self._new_jobs.append(base_id)
            self.jobs.enqueue(self._record(template, base_id))
            return ({"job_id": base_id},)
        tasks = [f"{base_id}_{i}" for i in indices]
        self._new_jobs.extend(tasks)
        self.state.arrays[base_id] = tasks
        for index, task_id in zip(indices, tasks):
            self.jobs.enqueue(self._record(template, task_id, array_job_id=base_id, array_task_id=index,
                                           array_limit=limit))
        return ({"job_id": base_id, "tasks": tasks},)

    def _capacity(self) -> list[allocator.NodeCapacity]:
        """The registered nodes' GPUs, as the check at submit reads them; rebuilt only when a node registers
        (on a thousand nodes a rebuild took longer than the rest of a submit)."""
        if self._capacity_of != self.state.nodes_version:
            self._capacity_list = [allocator.NodeCapacity(n.node_id, tuple(g.index for g in n.gpus),
                                                          tuple(gpu_room(g.memory_mb, n.reserve_mb, 0, 0)
                                                                for g in n.gpus))
                                   for n in self.state.nodes.values()]
            self._capacity_of = self.state.nodes_version
        return self._capacity_list

    def _check_sizes(self, spec: dict) -> None:
        """Refuse a command over the limit (as the kernel counts it for exec)."""
        command = spec.get("command")
        if isinstance(command, str) and len(command.encode()) > self.limits.max_command_bytes:
            raise RequestError(ErrorCode.TOO_LARGE, f"the command is {len(command.encode())} bytes; this master "
                                                    f"takes at most {self.limits.max_command_bytes} "
                                                    f"(max_command_bytes)")

    def _check_pending(self, user: str, adding: int) -> None:
        waiting, most = self.state.pending.count(user), self.limits.max_pending_per_user
        if waiting + adding > most:
            raise RequestError(ErrorCode.QUEUE_LIMIT,
                               f"user {user} has {waiting} pending job(s) and may have at most {most} "
                               f"(max_pending_per_user); wait for some to start, or cancel some")

    def _template(self, user: str, spec: dict) -> JobRecord:
        """A job record from a SUBMIT body, checked field by field; ValueError names what is wrong."""
        command, cwd = spec.get("command"), spec.get("cwd")
        gpus, pin_spec, priority = spec.get("gpus", 0), spec.get("node_gpu_ids"), spec.get("priority", 0)
        if not isinstance(command, str) or not command.strip():
            raise ValueError("the job has no command")
        if not isinstance(cwd, str) or not os.path.isabs(cwd):
            raise ValueError("the job's working directory must be an absolute path")
        env = self.environments.checked(user, spec.get("env"))
        if not has_type(gpus, int) or gpus < 0:
            raise ValueError("--gpus must be a whole number >= 0")
        if not has_type(priority, int):
            raise ValueError("--priority must be a whole number")
        if priority > 0:
            self._admin(user, "raise a job's priority above 0")
        pins = None
        if pin_spec is not None:
            pins = parse_node_gpu_ids(str(pin_spec))
            pinned = sum(len(v) for v in pins.values())
            if gpus and gpus != pinned:
                raise ValueError(f"--gpus {gpus} does not match the {pinned} GPU(s) named in --node-gpu-ids")
            gpus = pinned
        after = spec.get("after") or []
        if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
            raise ValueError("--after must list job ids")
        # Kept as given, an array id standing for all its tasks (see dependencies.py): an array's tasks are
        # known as long as it is.
        unknown = next((dep for dep in after if dep not in self.state.jobs and dep not in self.state.arrays), None)
        if unknown is not None:
            raise ValueError(f"unknown job id '{unknown}' in --after")
        deps = tuple(dict.fromkeys(after))
        name = spec.get("name")
        if name is not None and not isinstance(name, str):
            raise ValueError("--name must be a string")
        gpu_mem = spec.get("gpu_mem_mb")
        if gpu_mem is not None and (not has_type(gpu_mem, int) or gpu_mem <= 0):
            raise ValueError("--gpu-mem must be a positive size, such as 800M or 12G")
        if gpu_mem is not None and not gpus:
            raise ValueError("--gpu-mem needs --gpus 1 or more: it is the memory the job needs on each of its GPUs")
        return JobRecord(job_id="", seq=0, user=user, command=command, cwd=cwd, env=env.env, env_id=env.env_id,
                         gpus=gpus, gpu_mem_mb=gpu_mem, per_gpu=bool(spec.get("per_gpu")),
                         pins=pins, node_gpu_ids=pin_spec, interactive=bool(spec.get("interactive")),
                         name=name, priority=priority, time_limit=self._time_limit(spec.get("time_limit")),
                         requeue=bool(spec.get("requeue")), after=deps, after_any=bool(spec.get("after_any")))

    def _time_limit(self, asked) -> int | None:
        most = self.limits.max_time_limit
        if asked is None:
            return self.limits.default_time_limit
        if not has_type(asked, int) or asked <= 0:
            raise ValueError("--time must be a positive number of seconds")
        if most is not None and asked > most:
            raise RequestError(ErrorCode.IMPOSSIBLE, f"--time {format_duration(asked)} exceeds this cluster's "
                                                     f"maximum of {format_duration(most)}")
        return asked

    def _new_id(self) -> str:
        job_id = secrets.token_hex(4)
        while job_id in self.state.jobs or job_id in self.state.arrays:
            job_id = secrets.token_hex(4)
        return job_id

    def _record(self, template: JobRecord, job_id: str, **array) -> JobRecord:
        self.state.next_seq += 1
        job = template.copy()
        job.job_id, job.seq, job.submit_time, job.ranks = job_id, self.state.next_seq, time.time(), ()
        for name, value in array.items():
            setattr(job, name, value)
        return job

    def on_queue(self, body: dict) -> tuple:
        """List jobs (active ones, or all with ``all``; filtered by owner, states, ids) and nodes (none with
        ``nodes: false``; with ``nodes: "foreign"`` those with a GPU in use by processes zmgpu did not start).
        With ``collapse: true`` the pending tasks of an array that are consecutive and wait for the same
        reason come as one entry (see :func:`collapsed`), and with ``fields`` each job dict has only those keys
        (a collapsed one also its job_id and tasks)."""
        everything = bool(body.get("all"))
        owner, states, ids = body.get("owner"), body.get("states"), body.get("job_ids")
        if ids is not None:
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise RequestError(ErrorCode.BAD_REQUEST, "job_ids must be a list of job ids")
            # Each job once, however often it is named (an array id and one of its tasks, say).
            named = dict.fromkeys(t for i in ids for t in self.state.expand(i) if t in self.state.jobs)
            candidates = [self.state.jobs[t] for t in named]
        elif everything:
            candidates = self.state.jobs.values()
        else:
            # Only the active jobs, in submission order: finished ones are kept for a day, and skipping them
            # one by one would make every plain `zmgpu queue` (and `zmgpu wait`) pay for the whole history.
            active = (self.state.jobs[job_id] for job_id in (*self.state.pending, *self.state.running))
            candidates = sorted(active, key=lambda job: job.seq)
        if states is not None and not (isinstance(states, list) and all(isinstance(x, str) for x in states)):
            raise RequestError(ErrorCode.BAD_REQUEST, "states must be a list of state names")
        if owner is not None and not isinstance(owner, str):
            raise RequestError(ErrorCode.BAD_REQUEST, "owner must be a user name")
        # A caller that only follows jobs (Client.wait) leaves out the nodes, which are costly on a big cluster,
        # and the queue table asks only for those whose GPUs others use (it has a line for each such GPU).
        choice = True if body.get("nodes") is None else body["nodes"]
        pick_nodes = _NODE_CHOICES.get(choice) if isinstance(choice, (bool, str)) else None
        if pick_nodes is None:
            raise RequestError(ErrorCode.BAD_REQUEST, 'nodes must be true, false or "foreign"')
        collapse, fields = body.get("collapse", False), body.get("fields")
        if not isinstance(collapse, bool):
            raise RequestError(ErrorCode.BAD_REQUEST, "collapse must be true or false")
        if fields is not None:
            if not isinstance(fields, list) or not all(isinstance(name, str) for name in fields):
                raise RequestError(ErrorCode.BAD_REQUEST, "fields must be a list of job dict keys")
            fields = frozenset(fields)
        wanted = set(states) if states is not None else None
        # (The active jobs are never finished ones: a job leaves pending and running before it ends.)
        listed = (j for j in candidates
                  if (owner is None or j.user == owner) and (wanted is None or j.state.value in wanted))
        job_dict = functools.partial(self.jobs.job_dict, fields=fields)
        jobs = collapsed(listed, job_dict) if collapse else [job_dict(j) for j in listed]
        nodes = [n.to_dict() for n in pick_nodes(self.state.nodes.values())]
        return ({"jobs": jobs, "nodes": nodes},)

    def on_job(self, body: dict) -> tuple:
        """One job's dict; with ``read_output`` (attach, logs), only for its owner or an admin."""
        job = self._job(body["job_id"])
        if body.get("read_output"):
            self._readable(job, body["user"])
        return ({"job": self.jobs.job_dict(job)},)

    def on_nodes(self, body: dict) -> tuple:
        """Every registered node with its GPUs, and whether anyone on the network may use this master."""
        return ({"nodes": [n.to_dict() for n in self.state.nodes.values()], "insecure": self.exposed},)

    def on_fetch(self, body: dict) -> tuple:
        """Output bytes the master holds, from an offset (the snapshot half of the Clone pattern)."""
        job = self._readable(self._job(body["job_id"]), body["user"])
        if body["stream"] not in STREAMS or not 0 <= body["rank"] < max(len(job.ranks), 1):
            raise RequestError(ErrorCode.BAD_REQUEST, "no such rank or stream for this job")
        key = (job.job_id, body["rank"], body["stream"])
        offset = max(0, body["offset"])
        spool = self.jobs.spool
        return {"offset": offset, "size": spool.size(key)}, spool.read(key, offset, CHUNK_BYTES)

    def on_cancel(self, body: dict) -> tuple:
        """Cancel each listed job, array task or whole array; one result per id."""
        if not all(isinstance(job_id, str) for job_id in body["job_ids"]):
            raise RequestError(ErrorCode.BAD_REQUEST, "job ids must be strings")
        return ({"results": [self._cancel_one(job_id, body["user"]) for job_id in body["job_ids"]]},)

    def _cancel_one(self, job_id: str, user: str) -> dict:
        tasks = self.state.arrays.get(job_id)
        owner = self.access.owner(job_id)
        if owner is not None and not self.access.may_act(user, owner):
            return {"job_id": job_id, "ok": False, "message": _not_yours(job_id, owner, "cancel it")}
        if tasks is not None:
            live = [self.state.jobs[t] for t in tasks if not self.state.jobs[t].state.finished]
            for job in live:
                self.jobs.cancel(job, user)
            if not live:
                return {"job_id": job_id, "ok": False, "message": f"array {job_id} has no unfinished task"}
            return {"job_id": job_id, "ok": True, "message": f"cancelled {len(live)} task(s) of array {job_id}"}
        job = self.state.jobs.get(job_id) if is_job_id(job_id) else None
        if job is None:
            return {"job_id": job_id, "ok": False, "message": f"unknown job id '{job_id}'"}
        if job.state.finished:
            return {"job_id": job_id, "ok": False, "message": f"job {job_id} already ended ({job.state.value})"}
        self.jobs.cancel(job, user)
        return {"job_id": job_id, "ok": True, "message": f"cancelled job {job_id}"}

    def on_drain(self, body: dict) -> tuple:
        """Admin: place nothing new on a node; what runs there finishes."""
        self._admin(body["user"], "drain nodes")
        node = self._node(body["node_id"])
        self.registry.set_drain(node, body["reason"] or "drained", body["user"])
        return ({"message": f"node {node.node_id} drained"},)

    def on_resume(self, body: dict) -> tuple:
        """Admin: undo a drain."""
        self._admin(body["user"], "resume nodes")
        node = self._node(body["node_id"])
        self.registry.set_drain(node, None, body["user"])
        return ({"message": f"node {node.node_id} resumed"},)


def _not_yours(job_id: str, owner: str, what: str) -> str:
    return f"permission denied: job {job_id} belongs to {owner}; only its owner or an admin may {what}"


def _run_key(job: JobRecord) -> tuple:
    """Consecutive jobs with the same key are listed as one: the pending tasks of an array waiting for the
    same reason; any other job's key is its own."""
    if job.state is JobState.PENDING and job.array_job_id is not None:
        return job.array_job_id, job.reason
    return None, job.job_id


def collapsed(jobs, job_dict) -> list[dict]:
    """The dicts of ``jobs`` (in listing order), each run of pending tasks of one array that wait for the same
    reason as one: the first task's dict, its job_id ``ARRAYID_[ranges%N]`` as squeue shows it, and ``tasks``
    counting them.  The other tasks' dicts are not built: a listing with 100,000 tasks pending costs what one
    with a few does."""
    listed = []
    for _, run in itertools.groupby(jobs, key=_run_key):
        first, rest = next(run), [job.array_task_id for job in run]
        entry = job_dict(first)
        if rest:
            tasks = [first.array_task_id, *rest]
            entry["job_id"] = f"{first.array_job_id}_[{format_array_spec(tasks, first.array_limit)}]"
            entry["tasks"] = len(tasks)
        listed.append(entry)
    return listed
