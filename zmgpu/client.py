"""The Python API of zmgpu: requests to the master, and following jobs (the CLI is built on it).

Example::

    import sys
    from zmgpu import Client, ClientError

    with Client(host="gpu-master", port=8080) as client:
        job_id = client.submit("python train.py", gpus=2, name="train", time_limit=3600)
        for job in client.queue()["jobs"]:
            print(job["job_id"], job["state"], job["allocation"])
        job = client.stream(job_id)            # the job's output, as it is produced
        print("finished:", job["state"], job["exit_code"])

Every request goes out on a DEALER socket with the user's name and a request
number; the master answers each with one REPLY carrying the same number.  A
failed request raises :class:`ClientError` with the master's error code and
sentence; a master that does not answer raises :class:`MasterUnreachable`.

:meth:`Client.stream` and :meth:`Client.logs` follow a job's output with the
Clone pattern (:mod:`zmgpu.stream`): subscribe first, fetch what the master
already holds, re-fetch any gap by offset, and ride out a master restart.
:meth:`Client.wait` follows the jobs' state topics the same way, and asks the
master once a second in case PUB dropped an event.

``zmq`` is imported only when the first socket is made, so importing this
module costs almost nothing.
"""

from __future__ import annotations

import errno
import getpass
import math
import os
import sys
import time
from typing import BinaryIO, Iterable, Optional, Sequence, Union

from . import iothreads, protocol
from .errors import BadAddress, ClientError, Detached, LocalError, MasterUnreachable
from .model import FINISHED_STATES, JobState
from .protocol import MsgType, Stream
from .stream import (CHECK_INTERVAL, SUB_BATCH, Follower, InterruptHandler, Limits, SignalTrap, View, own_trap,
                     published)

__all__ = ["Client", "ClientError", "MasterUnreachable", "BadAddress", "Detached", "LocalError",
           "InterruptHandler", "SignalTrap", "CHECK_INTERVAL"]


def _nodes_wire(nodes: Union[bool, str]) -> Union[bool, str, None]:
    """A QUEUE's ``nodes`` as sent: left out for every node (what masters before "foreign" understand too)."""
    if isinstance(nodes, str):
        if nodes != "foreign":
            raise ValueError(f'nodes must be True, False or "foreign", not {nodes!r}')
        return nodes
    return None if nodes else False


def _default_user() -> str:
    """The login name; the numeric uid where the system has no name for it (bare containers)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


class Client:
    """A connection to one zmgpu master.

    :param host: the master's host name or address.
    :param port: the master's request (ROUTER) port.
    :param pub_port: the master's publish (PUB) port for interactive output; ``None``: ask the master
        (its PING reply names it) the first time output or events are followed.
    :param timeout: seconds to wait for the master to answer any request.
    :param user: the name sent with every request; ``None`` means the login name.  A master with keys
        accepts only the name its list gives to this client's key.
    :param secret_key_file: this user's CURVE secret key (``zmgpu keygen user``), for a master with keys;
        ``None``: ``~/.config/zmgpu/user.key_secret`` if it exists.
    :param master_public_key_file: the master's public key; ``None``: ``~/.config/zmgpu/master.key`` if it
        exists.  Without either key file the client talks to a master without keys.
    :param default_keys: False: look for no key file that is not named (for a master known to have no keys).

    Use it as a context manager (or call :meth:`close`) to release its sockets.
    A Client is not thread-safe: use one per thread.  A key file that cannot be used raises
    :class:`zmgpu.keys.KeyFileError` here (a :class:`zmgpu.config.ConfigError`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 8080, pub_port: Optional[int] = None,
                 timeout: float = 30.0, user: Optional[str] = None, *, secret_key_file: Optional[str] = None,
                 master_public_key_file: Optional[str] = None, default_keys: bool = True):
        from .keys import CurveClient

        self.host = host
        self.port = port
        self.pub_port = pub_port
        self.timeout = timeout
        self.user = user or _default_user()
        self.curve = CurveClient.load(secret_key_file, master_public_key_file, defaults=default_keys)
        self._req = 0
        self._ctx = None
        self._dealer = None

    # -- connection -----------------------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the sockets; the Client opens new ones if used again."""
        self._drop_dealer()
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    @property
    def address(self) -> str:
        """The master's request endpoint, e.g. ``tcp://127.0.0.1:8080``."""
        return self._endpoint(self.port)

    def _endpoint(self, port: int) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{port}"

    def _socket(self, kind: int):
        """A new, unconnected socket of ``kind`` with this client's options (connect it with :meth:`_connect`)."""
        import zmq  # lazily: `zmgpu --help` and argument errors never load it

        if self._ctx is None:
            self._ctx = iothreads.context()
        sock = self._ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.PEER_MAX_MESSAGE)
        if ":" in self.host:
            sock.setsockopt(zmq.IPV6, 1)
        if self.curve is not None:
            self.curve.apply(sock)
        return sock

    def _connect(self, sock, port: int):
        """Connect ``sock`` to the master's ``port``; a malformed address is a one-line BadAddress."""
        import zmq

        endpoint = self._endpoint(port)
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            sock.close()
            if exc.errno == errno.EINVAL:
                raise BadAddress(f"invalid zmgpu master address {endpoint} (check --host/--port or "
                                 f"ZMGPU_MASTER=host:port)") from None
            raise MasterUnreachable(f"cannot connect to the zmgpu master at {endpoint}: {exc.strerror}") from None
        return sock

    def _subscriber(self, *topics: bytes):
        """A SUB socket on the master's PUB port, subscribed to ``topics`` (the PUB port must be known)."""
        import zmq

        sock = self._socket(zmq.SUB)
        # A SUB sends only its subscriptions, and past the send high-water mark (1,000) ZeroMQ drops them
        # unsaid: a wait on 3,000 tasks named one by one heard the ends of 1,000 and found the rest by polling.
        sock.setsockopt(zmq.SNDHWM, 0)
        # Subscribed before connecting, so the subscription travels with the connection.
        for topic in topics:
            sock.setsockopt(zmq.SUBSCRIBE, topic)
        return self._connect(sock, self.pub_port)

    def _learn_pub_port(self, timeout: Optional[float] = None) -> int:
        """The master's PUB port: as given, else as its PING reply says (asked once per Client)."""
        if self.pub_port is None:
            # A master too old to say gets the historical default.
            self.pub_port = self._request(MsgType.PING, timeout=timeout).body.get("pub_port") or self.port + 1
        return self.pub_port

    def _drop_dealer(self) -> None:
        if self._dealer is not None:
            self._dealer.close()
            self._dealer = None

    def _request(self, msg_type: MsgType, timeout: Optional[float] = None, **fields) -> protocol.Message:
        """Send one request and return the master's successful REPLY; raise ClientError otherwise."""
        import zmq

        timeout = self.timeout if timeout is None else timeout
        if self._dealer is None:
            self._dealer = self._connect(self._socket(zmq.DEALER), self.port)
        self._req += 1
        req = self._req
        self._dealer.send_multipart(protocol.encode(msg_type, {**fields, "user": self.user, "req": req}))
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                # A fresh socket next time: the old one may still hold this request,
                # which a master coming back would otherwise answer late.
                self._drop_dealer()
                raise MasterUnreachable(f"no answer from the zmgpu master at {self.address} within {timeout:g} s "
                                        f"({self._unreachable_hint()})")
            if not self._dealer.poll(max(1, math.ceil(remaining * 1000))):
                continue   # a signal (Ctrl-C, trapped) can end a poll early: only the deadline decides
            try:
                reply = protocol.decode(self._dealer.recv_multipart())
            except protocol.ProtocolError:
                continue
            # A late reply to an earlier, timed-out request carries another number: drop it.
            if reply.type is MsgType.REPLY and reply.body.get("req") == req:
                break
        if not reply.body["ok"]:
            raise ClientError(str(reply.body.get("error", protocol.ErrorCode.INTERNAL.value)),
                              str(reply.body.get("message", "the master refused the request")))
        return reply

    def _unreachable_hint(self) -> str:
        """What to check when the master does not answer: with keys, the keys too (a refused key gets silence)."""
        hint = "is zmgpu-master running? check --host/--port or ZMGPU_MASTER"
        if self.curve is None:
            return hint + "; a master with keys answers only clients with keys (see zmgpu keygen)"
        return hint + "; and that the master lists this user's public key and master_public_key_file is its key"

    # -- requests -------------------------------------------------------------------

    def ping(self) -> dict:
        """Check that the master answers; returns its reply, e.g. ``{"version": 1}``."""
        body = self._request(MsgType.PING).body
        return {k: v for k, v in body.items() if k not in ("ok", "req")}

    def submit(self, command: str, gpus: int = 0, node_gpu_ids: Optional[str] = None,
               cwd: Optional[str] = None, env: Optional[dict] = None, interactive: bool = False, *,
               name: Optional[str] = None, time_limit: Optional[int] = None, requeue: bool = False,
               after: Sequence[str] = (), after_any: bool = False, array: Optional[str] = None,
               priority: int = 0, gpu_mem_mb: Optional[int] = None, per_gpu: bool = False) -> str:
        """Submit a job and return its id (8 hex characters); for an array, the array id.

        :param command: a command line, run by ``/bin/sh -c`` on the node.
        :param gpus: how many GPUs; more than one node has free spans several nodes (one rank per node).
        :param node_gpu_ids: exact GPUs instead, e.g. ``"node001:0,1;node002:0"``.
        :param cwd: working directory on the node; ``None`` means the current directory.
        :param env: the job's environment; ``None`` means a copy of this process's.
        :param interactive: mark the job as watched by :meth:`stream`.
        :param name: a name shown by ``zmgpu queue``; ``None`` leaves it unnamed.
        :param time_limit: seconds the job may run before it is stopped and ends TIMEOUT
            (:func:`zmgpu.model.parse_time_limit` reads Slurm's formats); ``None``: the master's default.
        :param requeue: put the job back in the queue, same id, when its node fails.
        :param after: job ids (an array id means all its tasks) that must complete first.
        :param after_any: with ``after``, start once those jobs end in any state.
        :param array: an array spec such as ``"0-99%8"`` or ``"1,5,7"``: one task per index,
            with ``ZMGPU_ARRAY_JOB_ID`` and ``ZMGPU_ARRAY_TASK_ID`` set.
        :param priority: queue priority; users may only lower it (``<= 0``), admins may raise it.
        :param gpu_mem_mb: MiB the job needs on each of its GPUs; it may then share GPUs with other such
            jobs while what they declared, plus others' use, fits (:func:`zmgpu.model.parse_size` reads
            ``12G``).  ``None``: the job's GPUs are its own.
        :param per_gpu: one process (rank) per GPU, each with its own ``CUDA_VISIBLE_DEVICES``, ``RANK``
            and ``LOCAL_RANK``; by default one process per node gets all of that node's GPUs.

        Raises ClientError with code ``IMPOSSIBLE`` when no registered set of nodes could ever run it
        (or the time limit exceeds the master's maximum), ``PERMISSION_DENIED`` for a raised priority.
        """
        job = {
            "command": command,
            "cwd": os.getcwd() if cwd is None else cwd,
            "env": dict(os.environ) if env is None else dict(env),
            "gpus": gpus,
            "node_gpu_ids": node_gpu_ids,
            "interactive": interactive,
            "name": name,
            "time_limit": time_limit,
            "requeue": requeue,
            "after": list(after),
            "after_any": after_any,
            "array": array,
            "priority": priority,
            "gpu_mem_mb": gpu_mem_mb,
            "per_gpu": per_gpu,
        }
        return self._request(MsgType.SUBMIT, job=job).body["job_id"]

    def queue(self, all: bool = False, user: Optional[str] = None, states: Optional[Iterable[str]] = None,
              job_ids: Optional[Iterable[str]] = None, nodes: Union[bool, str] = True, collapse: bool = False,
              fields: Optional[Iterable[str]] = None) -> dict:
        """``{"jobs": [job dict], "nodes": [node dict]}``, the jobs filtered as asked.

        :param all: include finished jobs (the master keeps them for its retention time).
        :param user: only this user's jobs.
        :param states: only jobs in these states (:class:`zmgpu.model.JobState` names).
        :param job_ids: only these jobs; an array id matches every task of the array.
        :param nodes: False leaves the nodes out (an empty list), for a caller that only wants jobs;
            ``"foreign"`` gives only the nodes with a GPU in use by processes zmgpu did not start (a master
            older than that option gives every node: a caller filters them all the same).
        :param collapse: list the pending tasks of an array that are consecutive (in submission order) and
            wait for the same reason as one dict, as squeue does: the first task's, with job_id
            ``ARRAYID_[ranges%N]`` and ``tasks`` (how many), whatever ``fields`` says.
        :param fields: only these keys of each job dict (all by default), for a caller that shows a few
            fields of many jobs; a master that does not know a name leaves it out.

        The dict layouts are described in :mod:`zmgpu.model`.
        """
        if isinstance(fields, str):
            raise TypeError("fields must be a list of job dict keys, not a string")
        # "user" on the wire is who asks, so the owner filter travels as "owner".
        filters = {"owner": user, "states": None if states is None else [JobState(s).value for s in states],
                   "job_ids": None if job_ids is None else list(job_ids), "nodes": _nodes_wire(nodes),
                   "collapse": True if collapse else None, "fields": None if fields is None else list(fields)}
        body = self._request(MsgType.QUEUE, all=all,
                             **{key: value for key, value in filters.items() if value is not None}).body
        return {"jobs": body["jobs"], "nodes": body["nodes"]}

    def job(self, job_id: str) -> dict:
        """One job's dict; ClientError with code ``UNKNOWN_JOB`` if the master has no such job."""
        return self._request(MsgType.JOB, job_id=job_id).body["job"]

    def cancel(self, *job_ids: str, timeout: Optional[float] = None) -> list:
        """Cancel jobs; one ``{"job_id", "ok", "message"}`` per id, in order.

        An id may be a job id, an array task id (``ARRAYID_INDEX``) or an array id
        (every unfinished task of the array).  ``timeout`` overrides the client's
        connection timeout for this request.
        """
        return self._request(MsgType.CANCEL, timeout=timeout, job_ids=list(job_ids)).body["results"]

    def nodes(self) -> list:
        """Every node's dict: liveness, ``status`` (a :class:`zmgpu.model.NodeStatus` value), GPUs and holders."""
        return self.cluster()["nodes"]

    def cluster(self) -> dict:
        """``{"nodes": [node dict], "insecure": bool}``: insecure when the master accepts anyone on the
        network without keys (``zmgpu-master --insecure``)."""
        body = self._request(MsgType.NODES).body
        return {"nodes": body["nodes"], "insecure": bool(body.get("insecure"))}

    def drain(self, node_id: str, reason: str) -> None:
        """Place no new jobs on a node (running ones finish); admins only (``PERMISSION_DENIED``)."""
        self._request(MsgType.DRAIN, node_id=node_id, reason=reason)

    def resume(self, node_id: str) -> None:
        """Undo :meth:`drain`; admins only.  An unknown node raises ClientError ``UNKNOWN_NODE``."""
        self._request(MsgType.RESUME, node_id=node_id)

    def wait(self, job_ids: Iterable[str], timeout: Optional[float] = None) -> list:
        """Block until every job has ended; return their final dicts.

        :param job_ids: job ids, array task ids, or array ids (which stand for all their tasks).
        :param timeout: the longest to wait, in seconds (``None``: no limit); then ClientError
            with code ``WAIT_DEADLINE`` is raised and the jobs are left as they are.

        The dicts follow the order of ``job_ids`` (an array's tasks by index), each job once.
        An id the master does not know raises ClientError with code ``UNKNOWN_JOB``.
        """
        return _Waiter(self, list(dict.fromkeys(job_ids)), timeout).run()

    def fetch(self, job_id: str, rank: int, stream: str, offset: int) -> tuple:
        """Up to ``protocol.CHUNK_BYTES`` of one rank's ``"stdout"`` or ``"stderr"`` from ``offset``.

        Returns ``(data, size)`` where ``size`` is how many bytes of that
        stream the master holds now.
        """
        reply = self._request(MsgType.FETCH, job_id=job_id, rank=rank,
                              stream=Stream(stream).value, offset=offset)
        return (reply.payload[0] if reply.payload else b""), reply.body["size"]

    def stream(self, job_id: str, stdout: Optional[BinaryIO] = None, stderr: Optional[BinaryIO] = None,
               session_timeout: float = 7200.0, max_wait_time: float = 300.0,
               max_consecutive_timeouts: int = 30,
               on_interrupt: Optional[InterruptHandler] = None, *, from_now: bool = False,
               detach_on_quit: bool = False, signals: Optional[SignalTrap] = None, label: bool = False) -> dict:
        """Write a job's output as it is produced, until the job ends; return its final dict.

        :param stdout: binary file for every rank's stdout (default ``sys.stdout.buffer``).
        :param stderr: binary file for every rank's stderr (default ``sys.stderr.buffer``).
        :param session_timeout: the longest this call stays attached; then it raises
            :class:`Detached` (code ``SESSION_TIMEOUT``) and leaves the job running.
        :param max_wait_time: the longest the job may stay PENDING; then it is cancelled
            and ClientError (code ``WAIT_TIMEOUT``) is raised (``math.inf``: wait as long as it takes).
        :param max_consecutive_timeouts: each request that gets no answer within a second is
            made again; after this many in a row, :class:`MasterUnreachable` is raised and
            the job is left as it is.  A master that restarts within that time is not noticed.
        :param on_interrupt: ``on_interrupt(job_id, count)`` is called at each Ctrl-C
            (in the main thread); True keeps streaming, False raises :class:`Detached`
            (code ``INTERRUPTED``).  ``None`` leaves Ctrl-C alone (KeyboardInterrupt).
        :param from_now: skip what the job wrote before this call.
        :param detach_on_quit: Ctrl-\\ (SIGQUIT) raises :class:`Detached` (code ``DETACHED``),
            leaving the job running.
        :param signals: a :class:`SignalTrap` the caller opened before (say, before submitting,
            so that a Ctrl-C during the submit is acted on here); ``None``: one is opened for
            the signals asked for, in the main thread.
        :param label: begin each line with ``RANK: `` (srun's --label), for jobs of several ranks.

        Bytes are written byte-exact and flushed as they come, stdout and stderr
        kept apart, ranks in the order their output arrives.  Output the job
        wrote before this call is written too, unless ``from_now``.
        """
        files = {Stream.STDOUT.value: stdout or sys.stdout.buffer,
                 Stream.STDERR.value: stderr or sys.stderr.buffer}
        limits = Limits(session_timeout, max_wait_time, max_consecutive_timeouts)
        trap = signals or own_trap(on_interrupt, detach_on_quit)
        try:
            return Follower(self, job_id, View(files, from_now=from_now, label=label), limits, trap, on_interrupt,
                            detach_on_quit).run()
        finally:
            if signals is None and trap is not None:
                trap.close()

    def logs(self, job_id: str, out: Optional[BinaryIO] = None, stream: str = Stream.STDOUT.value,
             rank: Optional[int] = None, follow: bool = False, max_consecutive_timeouts: int = 30) -> dict:
        """Write one output stream of a job, every rank in rank order; return the job's latest dict.

        :param out: binary file to write to (default ``sys.stdout.buffer``).
        :param stream: ``"stdout"`` or ``"stderr"``.
        :param rank: only this rank (ClientError ``NO_SUCH_RANK`` if the job has no such rank).
        :param follow: keep writing as the job runs, until it has ended and every byte is written
            (a rank's bytes come once the ranks before it are complete); otherwise write what the
            master holds now, or everything for a finished job.
        :param max_consecutive_timeouts: as for :meth:`stream`.
        """
        view = View({Stream(stream).value: out or sys.stdout.buffer}, rank=rank, ordered=True, live=follow)
        return Follower(self, job_id, view, Limits(max_consecutive_timeouts=max_consecutive_timeouts)).run()


class _Waiter:
    """One :meth:`Client.wait` call: each job's latest dict, in result order, and the deadline."""

    def __init__(self, client: Client, job_ids: list, timeout: Optional[float]):
        self.client = client
        self.job_ids = job_ids
        self.timeout = timeout
        self.deadline = math.inf if timeout is None else time.monotonic() + timeout
        self.jobs: dict[str, dict] = {}   # job or task id -> latest dict
        self.unfinished: set[str] = set()   # of those, the ones not ended yet

    def _take(self, job: dict) -> None:
        """The latest word on one of our jobs."""
        self.jobs[job["job_id"]] = job
        if JobState(job["state"]).finished:
            self.unfinished.discard(job["job_id"])
        else:
            self.unfinished.add(job["job_id"])

    def _expand(self) -> None:
        """The first check: every given id's jobs (an array's tasks in index order); unknown ids fail."""
        found = self.client.queue(all=True, job_ids=self.job_ids, nodes=False)["jobs"]
        # Indexed once: a wait on each of 10,000 tasks by its id must not look through every job for each.
        by_id: dict[str, list] = {}
        for job in found:
            for key in {job["job_id"], job.get("array_job_id")} - {None}:
                by_id.setdefault(key, []).append(job)
        for job_id in self.job_ids:
            matches = sorted(by_id.get(job_id, ()), key=lambda job: job.get("array_task_id") or 0)
            if not matches:
                raise ClientError(protocol.ErrorCode.UNKNOWN_JOB.value, f"unknown job id '{job_id}'")
            for job in matches:
                self._take(job)

    def _check(self) -> None:
        """Ask the master which of the jobs still unfinished here have ended (their events may have been dropped)."""
        for job in self.client.queue(all=True, job_ids=sorted(self.unfinished), states=FINISHED_STATES,
                                     nodes=False)["jobs"]:
            if job["job_id"] in self.jobs:
                self._take(job)

    def _receive(self, sub) -> None:
        """Published ends of our jobs; anything else is dropped."""
        for msg in published(sub, SUB_BATCH):
            if msg.type is MsgType.JOB_STATE and msg.body["job_id"] in self.jobs:
                self._take(msg.body)

    def run(self) -> list:
        """Subscribe, take a snapshot, then follow events and check each interval until all have ended."""
        self.client._learn_pub_port()
        # Subscribed before the snapshot, so an end between the two is not missed; to the ends alone (the
        # topic ended.<ID>.state, and for an id that may be an array's, the prefix of its tasks' ends: one
        # subscription for an array of any size), since only they change what a wait returns.
        topics = [protocol.end_topic(job_id) for job_id in self.job_ids]
        topics += [protocol.array_end_prefix(job_id) for job_id in self.job_ids if "_" not in job_id]
        sub = self.client._subscriber(*topics)
        try:
            self._expand()
            next_check = time.monotonic() + CHECK_INTERVAL
            while self.unfinished:
                now = time.monotonic()
                if now >= self.deadline:
                    raise ClientError(LocalError.WAIT_DEADLINE, f"jobs still unfinished after {self.timeout:g} "
                                                                f"s: {' '.join(sorted(self.unfinished))}")
                if now >= next_check:
                    self._check()   # in case the PUB socket dropped an event
                    next_check = now + CHECK_INTERVAL
                elif sub.poll(max(1, int((min(next_check, self.deadline) - now) * 1000))):
                    self._receive(sub)
            return list(self.jobs.values())
        finally:
            sub.close()
