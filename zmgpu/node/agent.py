"""The node agent's loop: one thread, one zmq.Poller over the DEALER socket and a signal pipe.

Towards the master the agent follows the Paranoid Pirate pattern: it registers,
sends a heartbeat every interval, counts any message from the master as a sign
of life, and when the master has been silent for ``master_timeout`` it drops the
socket and connects again after a backoff (1 s doubling to 32 s, reset once the
master accepts the registration).  Jobs never wait on the master: ranks are
reaped and their output spooled to disk whether or not a master is listening,
and output goes out with non-blocking sends from the spool files' offsets.

Jobs do not wait on the agent either: an agent that starts takes over the ranks
its predecessor left running and reports them in its REGISTER, and the master
answers with a KILL for those it no longer wants.
"""

from __future__ import annotations

import logging
import math
import signal
import socket
import time

import zmq

from .. import protocol
from ..config import NodeConfig
from ..daemon import SignalPipe
from ..model import GpuInfo
from ..protocol import MsgType, Stream
from .runner import RankProcess, spool_keys, valid_rank_key

#: Poll timeout while a rank runs or has output to send: reaping backstop, kill deadlines, output.
TICK_MS = 10
#: Output bytes sent per loop turn, so heartbeats and master messages keep flowing during a flood.
PUMP_BUDGET = 4 * 1024 * 1024
#: Messages read from the master per loop turn.
RECV_BATCH = 1000
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 32.0
#: How long a closed socket may still try to deliver what it holds.
LINGER_MS = 500
#: Messages queued towards the master at most; beyond that the spool files hold the output.
SEND_HWM = 64

RankKey = tuple[str, int]


def route_address(host: str, port: int) -> str:
    """This host's IP address on the route to ``host`` (a UDP connect sends nothing); 127.0.0.1 if unknown."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(sockaddr)
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"


class Agent:
    """The node agent: talks to the master and runs the job ranks it dispatches here."""

    def __init__(self, config: NodeConfig, node_id: str, gpus: list[GpuInfo], log: logging.Logger):
        self.config = config
        self.node_id = node_id
        self.gpus = gpus
        self.log = log
        host = config.master_host
        self.ipv6 = ":" in host
        self.endpoint = f"tcp://[{host}]:{config.master_port}" if self.ipv6 else f"tcp://{host}:{config.master_port}"
        self.ranks: dict[RankKey, RankProcess] = {}
        self.context = zmq.Context()
        self.poller = zmq.Poller()
        self.sock: zmq.Socket | None = None
        self.registered = False                 # the master accepted us on the current socket
        self.heartbeat_interval = config.heartbeat_interval
        self.last_heard = 0.0
        self.next_heartbeat = 0.0
        self.backoff = BACKOFF_FIRST
        self.reconnect_at = 0.0
        self.stopping = False
        self.handlers = {
            MsgType.REGISTERED: self._on_registered,
            MsgType.HEARTBEAT: self._on_heartbeat,
            MsgType.REREGISTER: self._on_reregister,
            MsgType.DISPATCH: self._on_dispatch,
            MsgType.KILL: self._on_kill,
            MsgType.RESEND: self._on_resend,
        }

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT; running jobs are left running (they have their own sessions)."""
        signals = SignalPipe((signal.SIGCHLD, signal.SIGTERM, signal.SIGINT))
        self.poller.register(signals.fileno(), zmq.POLLIN)
        self._adopt_leftovers()
        self._connect(time.monotonic())
        try:
            while not self.stopping:
                events = dict(self.poller.poll(self._poll_timeout_ms()))
                if signals.fileno() in events:
                    # SIGCHLD only wakes the loop; the turn below reaps.
                    self._on_signals(signals.drain())
                if self.sock is not None and self.sock in events:
                    self._receive()
                self._turn(time.monotonic())
        finally:
            self._disconnect()
            signals.close()
            self.context.term()
        return 0

    def _turn(self, now: float) -> None:
        """Work that does not wait for a message: reap, escalate kills, send output, keep the link."""
        for rank in self.ranks.values():
            if rank.poll():
                self.log.info("job %s rank %d %s", rank.job_id, rank.rank, rank.describe_end())
            if rank.escalate(now):
                self.log.warning("job %s rank %d outlived its %g s grace period: SIGKILL",
                                 rank.job_id, rank.rank, rank.kill_grace)
        if self.registered:
            self._pump()
        self._keep_alive(now)

    def _adopt_leftovers(self) -> None:
        """Take over the ranks a previous agent started and did not see end, so REGISTER reports them."""
        for job_id, rank in spool_keys(self.config.state_dir):
            try:
                rank_proc = RankProcess.adopt(self.config.state_dir, job_id, rank)
            except ValueError as exc:
                self.log.warning("job %s rank %d: cannot take it over: %s", job_id, rank, exc)
                continue
            if rank_proc is None:
                continue
            self.ranks[(job_id, rank)] = rank_proc
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rank_proc.spawned.spawned_at))
            if rank_proc.running:
                self.log.info("job %s rank %d: taken over from the previous node agent (pid %d, started %s)",
                              job_id, rank, rank_proc.pid, started)
            else:
                self.log.info("job %s rank %d (started %s) %s", job_id, rank, started, rank_proc.describe_end())

    def _poll_timeout_ms(self) -> int:
        if any(rank.running for rank in self.ranks.values()) or (self.registered and self.ranks):
            return TICK_MS
        if self.sock is None:
            deadline = self.reconnect_at
        elif self.registered:
            deadline = min(self.next_heartbeat, self.last_heard + self.config.master_timeout)
        else:
            deadline = self.last_heard + self.config.master_timeout
        return max(0, math.ceil((deadline - time.monotonic()) * 1000))

    def _on_signals(self, signums: set[int]) -> None:
        stops = sorted(signums & {signal.SIGTERM, signal.SIGINT})
        if stops:
            running = sum(rank.running for rank in self.ranks.values())
            self.log.info("received %s: stopping; %d running job rank(s) keep running",
                          signal.Signals(stops[0]).name, running)
            self.stopping = True

    # -- the link to the master ---------------------------------------------------------

    def _connect(self, now: float) -> None:
        """A fresh DEALER socket to the master, and a REGISTER on it."""
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.node_id.encode())
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.IPV6, int(self.ipv6))
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            self._retry_later(now, f"cannot connect to the master at {self.endpoint}: {exc}")
            return
        self.sock = sock
        self.poller.register(sock, zmq.POLLIN)
        self.registered = False
        self.last_heard = now
        self.log.info("connecting to the master at %s as node %s", self.endpoint, self.node_id)
        self._register()

    def _disconnect(self) -> None:
        if self.sock is None:
            return
        self.poller.unregister(self.sock)
        self.sock.close(LINGER_MS)
        self.sock = None
        self.registered = False

    def _retry_later(self, now: float, why: str) -> None:
        self.log.warning("%s; trying again in %g s", why, self.backoff)
        self.reconnect_at = now + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def _keep_alive(self, now: float) -> None:
        """Heartbeat on time; reconnect when the master has gone quiet (Paranoid Pirate)."""
        if self.sock is None:
            if now >= self.reconnect_at:
                self._connect(now)
            return
        silence = now - self.last_heard
        if silence > self.config.master_timeout:
            self._disconnect()
            self._retry_later(now, f"no word from the master at {self.endpoint} for {silence:.1f} s")
            return
        # Until the master answers the REGISTER, a heartbeat would only pile up behind it.
        if self.registered and now >= self.next_heartbeat:
            self._send(MsgType.HEARTBEAT, {})
            self.next_heartbeat = now + self.heartbeat_interval

    def _register(self) -> None:
        self._send(MsgType.REGISTER, {
            "node_id": self.node_id,
            "hostname": socket.gethostname(),
            "address": route_address(self.config.master_host, self.config.master_port),
            "gpus": [gpu.to_dict() for gpu in self.gpus],
            "jobs": [{"job_id": job_id, "rank": rank} for job_id, rank in self.ranks],
        })

    def _send(self, msg_type: MsgType, body: dict, *payload: bytes) -> bool:
        """Queue one message without blocking; False when it could not go now (try again later)."""
        if self.sock is None:
            return False
        try:
            self.sock.send_multipart(protocol.encode(msg_type, body, *payload), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def _receive(self) -> None:
        for _ in range(RECV_BATCH):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.last_heard = time.monotonic()    # any message at all shows the master is alive
            self._dispatch(frames)

    def _dispatch(self, frames: list[bytes]) -> None:
        """Decode one message and run its handler; a bad message or a failing handler is logged, not fatal."""
        try:
            msg = protocol.decode(frames)
        except protocol.ProtocolError as exc:
            self.log.warning("dropped a malformed message from the master: %s", exc.message)
            return
        handler = self.handlers.get(msg.type)
        if handler is None:
            self.log.warning("dropped a %s message: the master does not send those to nodes", msg.type.name)
            return
        try:
            handler(msg.body)
        except Exception as exc:  # one bad message must never stop the loop
            self.log.error("handling %s from the master failed: %s", msg.type.name, exc)
            self.log.debug("traceback of the failed %s handler", msg.type.name, exc_info=True)

    # -- handlers -------------------------------------------------------------------------

    def _on_registered(self, body: dict) -> None:
        """The master accepted the registration: output may flow, the backoff starts over."""
        if body["heartbeat_interval"] > 0:
            self.heartbeat_interval = body["heartbeat_interval"]
        self.registered = True
        self.backoff = BACKOFF_FIRST
        self.next_heartbeat = time.monotonic() + self.heartbeat_interval
        self.log.info("registered with master at %s as node %s (%d GPUs, %d job ranks held)",
                      self.endpoint, self.node_id, len(self.gpus), len(self.ranks))

    def _on_heartbeat(self, body: dict) -> None:
        """The master is alive; receiving the message already counted."""

    def _on_reregister(self, body: dict) -> None:
        """The master does not know this node (it restarted): register again."""
        self.log.info("the master at %s does not know this node; registering again", self.endpoint)
        self.registered = False
        self._register()

    def _on_dispatch(self, body: dict) -> None:
        """Start one rank of a job here; JOB_STARTED (or JOB_ENDED if it cannot start) follows."""
        job_id, rank = body["job_id"], body["rank"]
        indices = body["gpu_indices"]
        if not valid_rank_key(job_id, rank) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            self.log.warning("dropped a DISPATCH with a bad job id, rank or GPU list: %r", body)
            return
        known = self.ranks.get((job_id, rank))
        if known is not None:
            self.log.warning("job %s rank %d is already here; reporting it again", job_id, rank)
            known.start_reported = known.pid is None
            return
        rank_proc = RankProcess.spawn(
            state_dir=self.config.state_dir, node_id=self.node_id, job_id=job_id, rank=rank,
            command=body["command"], cwd=body["cwd"], env=body["env"], gpu_indices=indices,
            kill_grace=body["kill_grace"])
        self.ranks[(job_id, rank)] = rank_proc
        if rank_proc.proc is None:
            self.log.warning("job %s rank %d could not start: %s", job_id, rank, rank_proc.reason)
        else:
            gpus = ",".join(map(str, indices)) or "none"
            self.log.info("job %s rank %d started: pid %d, GPUs %s", job_id, rank, rank_proc.pid, gpus)

    def _on_kill(self, body: dict) -> None:
        """Stop every rank of the job on this node: SIGTERM now, SIGKILL after the grace period."""
        now = time.monotonic()
        for rank in self.ranks.values():
            if rank.job_id == body["job_id"] and rank.kill(now):
                self.log.info("job %s rank %d: stopping (%s); SIGKILL in %g s if still running",
                              rank.job_id, rank.rank, body["reason"], rank.kill_grace)

    def _on_resend(self, body: dict) -> None:
        """The master's copy of a stream has a gap: send again from that offset."""
        job_id, rank, offset = body["job_id"], body["rank"], body["offset"]
        stream = Stream(body["stream"])
        if not valid_rank_key(job_id, rank):
            self.log.warning("dropped a RESEND with a bad job id or rank: %r", body)
            return
        rank_proc = self.ranks.get((job_id, rank))
        if rank_proc is None:
            # Already reported and forgotten: the spool still has the bytes and the exit status.
            rank_proc = RankProcess.revive(self.config.state_dir, job_id, rank)
            if rank_proc is None:
                self.log.warning("cannot resend %s of job %s rank %d: nothing spooled here",
                                 stream.value, job_id, rank)
                return
            self.ranks[(job_id, rank)] = rank_proc
        if rank_proc.rewind(stream, offset):
            self.log.debug("resending %s of job %s rank %d from byte %d", stream.value, job_id, rank, offset)

    # -- output ---------------------------------------------------------------------------

    def _pump(self) -> None:
        """Send each rank's start, new output and end, in that order, within the per-turn budget.

        A send that would block stops the pump until the next turn: the offsets say
        what went out, and the spool files keep the rest.
        """
        budget = PUMP_BUDGET
        for key, rank in list(self.ranks.items()):
            if not rank.start_reported:
                if not self._send(MsgType.JOB_STARTED, {"job_id": rank.job_id, "rank": rank.rank,
                                                        "pid": rank.pid}):
                    return
                rank.start_reported = True
            for stream in Stream:
                while budget > 0:
                    chunk = rank.read_chunk(stream, budget)
                    if not chunk:
                        break
                    header = {"job_id": rank.job_id, "rank": rank.rank, "stream": stream.value,
                              "offset": rank.sent[stream]}
                    if not self._send(MsgType.OUTPUT, header, chunk):
                        return
                    rank.advance(stream, len(chunk))
                    budget -= len(chunk)
            if budget <= 0:
                return
            if rank.ended and not rank.has_unsent():
                if not self._send(MsgType.JOB_ENDED, rank.ended_body()):
                    return
                rank.close()
                del self.ranks[key]
