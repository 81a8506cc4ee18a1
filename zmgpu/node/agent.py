"""The node agent's loop: one thread, one zmq.Poller over the DEALER socket and a signal pipe.

Towards the master the agent follows the Paranoid Pirate pattern: it registers,
sends a heartbeat every interval, counts any message from the master as a sign
of life, and when the master has been silent for ``master_timeout`` it drops the
socket and connects again after a backoff (1 s doubling to 32 s, reset once the
master accepts the registration).  Jobs never wait on the master: ranks are
reaped and their output spooled to disk whether or not a master is listening,
and output goes out with non-blocking sends from the spool files' offsets.

Jobs do not wait on the agent either.  Their parent is the node's job keeper
(keeper.py), a small process that outlives the agent and records each rank's
exit status; the agent asks it to spawn ranks and hears from it when one ends.
An agent that starts connects to the keeper still running (or starts one) and
takes over the ranks its predecessor left unreported, running or ended while no
agent ran, and reports them in its REGISTER, with the ranks whose end it sent in
the last hour (in case the master missed their JOB_ENDED); the master answers with a
KILL for those it no longer wants.  Without a keeper the agent spawns ranks
itself, and their exit status would not survive its restart.

A KILL stops the whole job, not only the ranks' process groups: every process on
this host marked with the job's id gets SIGTERM, and SIGKILL after the grace
period or as soon as the rank's leader has ended (see sweep.py).

While ranks run the loop polls their spool files for output: every 10 ms while
output moves, backing off to 100 ms while it does not.  A message from the
keeper (or SIGCHLD, for a rank the agent spawned itself) wakes the loop at once
when a rank ends, and the poll never sleeps past a kill's SIGKILL deadline.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import socket
import time

import zmq

from .. import iothreads, protocol
from ..config import NodeConfig
from ..daemon import SignalPipe
from ..model import format_duration, is_count, is_job_id
from ..protocol import MsgType, Stream
from ..keys import CurveClient
from .identity import new_instance, read_instance, route_address, routing_id, write_instance
from .keeper_link import Exited, KeeperLink, KeeperLost, Spawned
from .pump import pump, rewind
from .runner import RankKey, RankProcess, declared_memory, free_port
from .spools import SpoolIndex, adopt_leftovers
from .sweep import JobProcesses, PendingKills
from .telemetry import Telemetry
from .users import UserPolicy

#: Poll timeout while ranks run or have output to send: right after output moved, and at most when idle.
TICK_MIN_MS = 10
TICK_MAX_MS = 100
TICK_BACKOFF = 1.5
#: Messages read from the master per loop turn.
RECV_BATCH = 1000
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 32.0
#: How long a closed socket may still try to deliver what it holds.
LINGER_MS = 500
#: Messages queued towards the master at most; beyond that the spool files hold the output.
SEND_HWM = 64
#: Ranks whose end went to the master this long ago (seconds) or less are listed in REGISTER, for a master that
#: missed it.
ENDED_LOOKBACK = 3600.0
#: Grace period of a KILL for a job none of whose ranks is held here (its DISPATCH carried the real one).
DEFAULT_KILL_GRACE = 10.0
#: Exit status when the master refuses this agent's node id: a restart would be refused again.
EXIT_REFUSED = 2
#: Seconds before trying again to reach a job keeper, after none could be reached or started.
KEEPER_RETRY = 60.0
#: Seconds an older keeper left with no rank and no agent takes to exit (its IDLE_EXIT, and some).
OLD_KEEPER_EXIT = 3.0
#: Seconds between looks for spools old enough to remove.
PRUNE_INTERVAL = 3600.0
#: Seconds between looks at a dirty GPU: a GPU freed a moment after its job ended goes back at once.
DIRTY_RECHECK = 0.1


class Agent:
    """The node agent: talks to the master and runs the job ranks it dispatches here."""

    def __init__(self, config: NodeConfig, node_id: str, telemetry: Telemetry, log: logging.Logger,
                 curve: CurveClient | None = None):
        self.config = config
        self.node_id = node_id
        self.telemetry = telemetry
        self.gpus = telemetry.devices
        self.next_dirty_check = 0.0
        self.next_prune = 0.0
        self.log = log
        self.curve = curve          # this node's keys and the master's, when the master has keys
        self.users = UserPolicy.here(node_id, config.single_user)
        host = config.master_host
        self.ipv6 = ":" in host
        self.endpoint = f"tcp://[{host}]:{config.master_port}" if self.ipv6 else f"tcp://{host}:{config.master_port}"
        self.ranks: dict[RankKey, RankProcess] = {}
        self.kills = PendingKills()
        self.keeper: KeeperLink | None = None   # None: ranks are spawned as the agent's own children
        self.keeper_retry_at = 0.0
        # What the keeper was asked to start and has not answered: redone if the request is lost.
        self.unanswered: dict[RankKey, tuple[dict, list[int], int | None]] = {}
        self.spools = SpoolIndex(config.state_dir)   # the spools on disk (read when the loop starts)
        self.instance = new_instance()
        self.previous_instance = read_instance(config.state_dir)
        self.instance_saved = False
        self.exit_status = 0
        self.tick_ms = float(TICK_MIN_MS)
        self.context = iothreads.context()
        self.poller = zmq.Poller()
        self.sock: zmq.Socket | None = None
        self.registered = False                 # the master accepted us on the current socket
        self.heartbeat_interval = config.heartbeat_interval
        self.master_timeout = config.master_timeout   # raised if the master's heartbeats come slower
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
            MsgType.REFUSED: self._on_refused,
        }

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT (0) or a refused registration (2); running jobs are left running."""
        signals = SignalPipe((signal.SIGCHLD, signal.SIGTERM, signal.SIGINT))
        self.poller.register(signals.fileno(), zmq.POLLIN)
        adopted, self.spools = adopt_leftovers(self.config.state_dir, self._open_keeper(time.monotonic()), self.log)
        self.ranks.update(adopted)
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
            if self.keeper is not None:
                self.keeper.close()
            signals.close()
            self.context.term()
        return self.exit_status

    def _turn(self, now: float) -> None:
        """Work that does not wait for a message: reap, escalate kills, send output, keep the link."""
        self._take_keeper_events()
        busy = False
        for rank in self.ranks.values():
            if rank.poll():
                busy = True
                self.log.info("%s %s", rank.key, rank.describe_end())
                if rank.killed:
                    self._kill_leftovers(JobProcesses(rank.key.job_id, rank.key.attempt), "its leader ended")
                self.telemetry.release_check(rank.key.job_id, rank.gpu_indices)
            if rank.escalate(now):
                self.log.warning("%s outlived its %g s grace period: SIGKILL", rank.key, rank.kill_grace)
        for target in self.kills.due(now):
            self._kill_leftovers(target, "the grace period ran out")
        if self.telemetry.dirty and now >= self.next_dirty_check:
            self.next_dirty_check = now + DIRTY_RECHECK
            if self.telemetry.recheck_dirty():
                self._send_heartbeat(now)
        if self.registered:
            moved, reported = pump(self.ranks, self._send, self.telemetry.dirty_for, now)
            busy |= moved
            for rank in reported:
                self.spools.mark_reported(rank.key, time.time())
                # The master now holds these GPUs dirty: their cleaning will be news.
                self.telemetry.delivered({str(i): {"dirty": rank.key.job_id} for i in rank.dirty_gpus})
        self._keep_alive(now)
        # Output that moved may go on moving; quiet ranks are looked at less and less often.
        self.tick_ms = TICK_MIN_MS if busy else min(self.tick_ms * TICK_BACKOFF, TICK_MAX_MS)

    # -- the job keeper -----------------------------------------------------------------

    def _open_keeper(self, now: float) -> dict[str, int]:
        """Connect to this node's job keeper, starting one if none answers; the ranks it runs (name -> pid)."""
        try:
            self.keeper = KeeperLink.open(self.config.state_dir, self.log, self.config.verbose)
        except KeeperLost as exc:
            self.keeper_retry_at = now + KEEPER_RETRY
            self.log.warning("no job keeper (%s): the agent starts jobs itself, and a job that ends while the "
                             "agent is down will have no exit status; trying again in %g s", exc, KEEPER_RETRY)
            return {}
        self.poller.register(self.keeper.fileno(), zmq.POLLIN)
        self.log.info("job keeper: pid %d, running %d job rank(s)", self.keeper.pid, len(self.keeper.ranks))
        if self.keeper.outdated:
            self.log.warning("the job keeper is from an older zmgpu: it keeps the ranks it runs, and the agent "
                             "starts new ones itself until they have ended and a new keeper can start")
        return dict(self.keeper.ranks)

    def _keeper_lost(self, why: str) -> None:
        """The link to the keeper broke: reconnect (or start a new keeper) and learn how its ranks are doing."""
        self.log.warning("lost the job keeper (pid %d): %s", self.keeper.pid, why)
        self.poller.unregister(self.keeper.fileno())
        self.keeper.close()
        self.keeper = None
        kept = self._open_keeper(time.monotonic())
        unanswered, self.unanswered = self.unanswered, {}
        for key, (body, indices, port) in unanswered.items():
            rank = self.ranks[key]
            if key.name in kept:
                rank.started(kept[key.name], None, None)
            else:
                # The request was lost, or its rank orphaned by a keeper that died: it must not run twice.
                JobProcesses(key.job_id, key.attempt).kill()
                killed = rank.killed
                rank = self.ranks[key] = self._spawn(key, body, indices, port)
                if killed:
                    rank.kill(time.monotonic())
            self._log_start(rank)
        for rank in self.ranks.values():
            rank.rejoin(kept)

    def _take_keeper_events(self) -> None:
        """Hand each answer and end the keeper reported to its rank; poll() then ends an ended rank."""
        if self.keeper is None:
            return
        try:
            events = self.keeper.events()
        except KeeperLost as exc:
            self._keeper_lost(str(exc))
            return
        for event in events:
            key = RankKey.parse(event.spool)
            rank = self.ranks.get(key)
            if rank is None:
                continue
            if isinstance(event, Spawned):
                if self.unanswered.pop(key, None) is not None:
                    rank.started(event.pid, event.start_time, event.error)
                    self._log_start(rank)
            elif isinstance(event, Exited) and rank.pid == event.pid:
                rank.exited(event.exit_code, event.signal)
        if self.keeper.outdated and not self.keeper.ranks:
            # Left alone, it exits; the next rank that starts starts a keeper of this agent's zmgpu.
            self.poller.unregister(self.keeper.fileno())
            self.keeper.close()
            self.keeper, self.keeper_retry_at = None, time.monotonic() + OLD_KEEPER_EXIT

    def _spawn(self, key: RankKey, body: dict, indices: list[int], port: int | None = None,
               fresh: bool = False) -> RankProcess:
        """Start a rank through the keeper (reached again if need be), or as the agent's own child.

        A rank asked of the keeper comes back pending: see :meth:`_take_keeper_events`.
        ``fresh``: no file of the rank can be in its spool yet (see RankProcess.spawn).
        """
        if self.keeper is None and time.monotonic() >= self.keeper_retry_at:
            self._open_keeper(time.monotonic())
        spawn = functools.partial(
            RankProcess.spawn, state_dir=self.config.state_dir, node_id=self.node_id, key=key,
            command=body["command"], cwd=body["cwd"], env=body["env"], gpu_indices=indices,
            kill_grace=body["kill_grace"], master_port=port, gpu_mem_mb=body.get("gpu_mem_mb"),
            hosts_rendezvous=port is not None and (body.get("launch") or {}).get("NNODES", "1") != "1",
            run_as=self.users.run_as(body.get("user"), body.get("allow_root") is True))
        for _ in range(2):      # the keeper reached again after a broken link gets one more try
            if self.keeper is None or self.keeper.outdated:
                break
            try:
                rank_proc = spawn(keeper=self.keeper, fresh=fresh)
            except KeeperLost as exc:
                self._keeper_lost(str(exc))
                # The lost request may have started the rank: it must not run twice, and may have left files.
                JobProcesses(key.job_id, key.attempt).kill()
                fresh = False
                continue
            if rank_proc.pending:
                self.unanswered[key] = (body, indices, port)
            return rank_proc
        return spawn(keeper=None, fresh=fresh)

    def _poll_timeout_ms(self) -> int:
        if self.sock is None:
            deadline = self.reconnect_at
        elif self.registered:
            deadline = min(self.next_heartbeat, self.last_heard + self.master_timeout)
        else:
            deadline = self.last_heard + self.master_timeout
        kills = self.kills.deadlines()
        if self.telemetry.dirty:
            kills.append(self.next_dirty_check)
        kills += [r.kill_deadline for r in self.ranks.values() if r.running and r.kill_deadline is not None]
        now = time.monotonic()
        # A start held back for its rank's end goes out when the hold is over, not at the next slow tick.  (A
        # rank still waiting for the keeper's answer is not due: the keeper holds that answer as long.)
        kills += [r.announce_by for r in self.ranks.values()
                  if not r.start_reported and not r.pending and r.announce_by > now]
        timeout = math.ceil((min([deadline, *kills]) - now) * 1000)
        if any(rank.running for rank in self.ranks.values()) or (self.registered and self.ranks):
            # Adopted ranks are not our children (no SIGCHLD), and output is found only by looking.
            timeout = min(timeout, math.ceil(self.tick_ms))
        return max(0, timeout)

    def _kill_leftovers(self, target: JobProcesses, why: str) -> None:
        """SIGKILL whatever of a stopped job still runs on this host, children that left its group included."""
        killed = target.kill()
        if killed:
            self.log.warning("%s: SIGKILL to %d process(es) still running after %s", target, killed, why)

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
        sock.setsockopt(zmq.IDENTITY, routing_id(self.node_id, self.curve is not None))
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        sock.setsockopt(zmq.IPV6, int(self.ipv6))
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.PEER_MAX_MESSAGE)
        if self.curve is not None:
            self.curve.apply(sock)
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
        if silence > self.master_timeout:
            self._disconnect()
            self._retry_later(now, f"no word from the master at {self.endpoint} for {silence:.1f} s")
            return
        # Until the master answers the REGISTER, a heartbeat would only pile up behind it.
        if self.registered and now >= self.next_heartbeat:
            self._prune(now)
            self.telemetry.sample()
            for rank in self.ranks.values():
                if rank.running and rank.gpu_indices:
                    used = self.telemetry.job_memory(rank.key.job_id, rank.gpu_indices)
                    if used:
                        rank.peak_gpu_mem_mb = max(rank.peak_gpu_mem_mb or 0, used)
            self._send_heartbeat(now)

    def _prune(self, now: float) -> None:
        """Now and then, remove the spools of ranks reported long ago, so that the node's disk does not fill."""
        if now < self.next_prune:
            return
        self.next_prune = now + PRUNE_INTERVAL
        removed = self.spools.prune(time.time() - self.config.spool_retention, self.ranks)
        if removed:
            self.log.info("removed the output spools of %d job rank(s) reported over %s ago", len(removed),
                          format_duration(self.config.spool_retention))

    def _send_heartbeat(self, now: float) -> None:
        """A heartbeat, carrying whatever changed on the GPUs since the master last heard."""
        changes = self.telemetry.changes()
        if self._send(MsgType.HEARTBEAT, {"gpus": changes} if changes else {}):
            self.telemetry.delivered(changes)
        self.next_heartbeat = now + self.heartbeat_interval

    def _register(self) -> None:
        self.telemetry.sample()
        self._send(MsgType.REGISTER, {
            "node_id": self.node_id,
            "hostname": socket.gethostname(),
            "address": route_address(self.config.master_host, self.config.master_port),
            # How this node reaches the master's host: a job's other nodes reach a node beside the master so.
            "master_host": self.config.master_host,
            "gpus": [gpu.to_dict() for gpu in self.gpus],
            "telemetry": self.telemetry.snapshot(),
            "gpu_policy": self.telemetry.policy.to_dict(),
            "jobs": [key.wire() for key in self.ranks]
                    + self.spools.recent_ends(time.time() - ENDED_LOOKBACK, skip=self.ranks),
            "instance": self.instance,
            "previous_instance": self.previous_instance,
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
            # The master heartbeats at this interval too: a shorter silence limit would reconnect in a loop.
            self.master_timeout = max(self.config.master_timeout, 3 * self.heartbeat_interval)
            if self.master_timeout > self.config.master_timeout:
                self.log.warning("the master heartbeats every %g s: waiting %g s of silence before reconnecting, "
                                 "not the configured %g s", self.heartbeat_interval, self.master_timeout,
                                 self.config.master_timeout)
        self.registered = True
        self.backoff = BACKOFF_FIRST
        for rank in self.ranks.values():
            # A JOB_STARTED still queued on the last connection died with it: the next JOB_STARTED, or the
            # JOB_ENDED, carries it again (the master takes a start twice; a rank that never ran has none).
            rank.start_reported = rank.start_reported and rank.pid is None
        if self.keeper is not None and isinstance(body.get("dead_timeout"), (int, float)):
            try:
                self.keeper.lease(body["dead_timeout"])
            except KeeperLost as exc:
                self._keeper_lost(str(exc))
        self.next_heartbeat = time.monotonic() + self.heartbeat_interval
        self.log.info("registered with master at %s as node %s (%d GPUs, %d job ranks held)",
                      self.endpoint, self.node_id, len(self.gpus), len(self.ranks))
        if not self.instance_saved:
            # From now on the master knows this instance: the next agent here names it as its predecessor.
            try:
                write_instance(self.config.state_dir, self.instance)
                self.instance_saved = True
            except OSError as exc:
                self.log.warning("cannot record this agent's instance id in %s: %s; a restarted agent will be "
                                 "refused until the master declares this node down", self.config.state_dir,
                                 exc.strerror or exc)

    def _on_refused(self, body: dict) -> None:
        """The master refused the registration (another live agent holds this node id): stop, status 2."""
        if self.registered:
            # Accepted registrations stand; this answer was meant for another agent using the same node id.
            self.log.warning("ignored a refusal from the master while registered as node %s (%s): another "
                             "agent is trying to use this node id", self.node_id, body["reason"])
            return
        self.log.error("the master at %s refused node %s: %s", self.endpoint, self.node_id, body["reason"])
        self.exit_status = EXIT_REFUSED
        self.stopping = True

    def _on_heartbeat(self, body: dict) -> None:
        """The master is alive; receiving the message already counted."""

    def _on_reregister(self, body: dict) -> None:
        """The master does not know this node (it restarted): register again."""
        self.log.info("the master at %s does not know this node; registering again", self.endpoint)
        self.registered = False
        self._register()

    def _on_dispatch(self, body: dict) -> None:
        """Start one rank of a job here; JOB_STARTED (or JOB_ENDED if it cannot start) follows."""
        key = RankKey(body["job_id"], body["rank"], body.get("attempt", 0))
        indices = body["gpu_indices"]
        launch, gpu_mem = body.get("launch") or {}, body.get("gpu_mem_mb")
        if not (key.valid() and all(is_count(i) for i in indices) and (gpu_mem is None or is_count(gpu_mem))
                and isinstance(launch, dict) and all(isinstance(v, str) for v in launch.values())):
            self.log.warning("dropped a DISPATCH with a bad job id, rank, attempt, GPU list or launch: %r", body)
            return
        if not self.registered:
            # Before REGISTERED it may be meant for another agent with this node id (the master hands a
            # node id's connection to the newest agent); the master's reconciliation settles the rank.
            self.log.warning("dropped a DISPATCH of %s: the master has not accepted this agent yet", key)
            return
        known = self.ranks.get(key)
        if known is not None:
            self.log.warning("%s is already here; reporting it again", key)
            # Once more, unless it never started (or has not yet: JOB_STARTED is still to come).
            known.start_reported = known.pid is None and known.ended
            return
        self.kills.spare(key.job_id, key.attempt)
        refused = self.telemetry.refuse_start(indices, gpu_mem, declared_memory(self.ranks.values()))
        if refused is not None:
            self._refuse(key, indices, refused)
            return
        launch = dict(launch)
        port = None
        if launch.get("NODE_RANK") == "0" and "MASTER_PORT" not in launch:
            # This node hosts the job's rendezvous: its other nodes learn the port from JOB_STARTED, and its
            # other ranks here (--per-gpu) share the port the first of them got.
            port = next((r.master_port for k, r in self.ranks.items()
                         if (k.job_id, k.attempt) == (key.job_id, key.attempt) and r.master_port), None) or free_port()
            launch["MASTER_PORT"] = str(port)
        # A rank dispatched again (the master lost a commit in a power cut) would find its earlier end on disk.
        fresh = self.spools.add(key)
        rank_proc = self.ranks[key] = self._spawn(key, {**body, "env": {**body["env"], **launch}}, indices, port,
                                                  fresh=fresh)
        self._log_start(rank_proc)

    def _refuse(self, key: RankKey, indices: list[int], why: str) -> None:
        """Its GPUs were taken meanwhile: the master hears the GPUs' state, then puts the job back in line.

        The GPUs' whole state goes out, not only what moved past the dead band: the master must not
        place the job there again on a view a few MiB off.  The refusal is a rank that ended without
        starting, so the pump delivers it however busy the link is.
        """
        self.log.warning("%s not started: %s; the master puts it back in the queue", key, why)
        self.telemetry.report_in_full(indices)
        self._send_heartbeat(time.monotonic())
        self.ranks[key] = RankProcess.refused(self.config.state_dir, key, why)

    def _log_start(self, rank_proc: RankProcess) -> None:
        """Say how the start of a rank went, once it is known."""
        if rank_proc.pending:
            return
        if rank_proc.pid is None:
            self.log.warning("%s could not start: %s", rank_proc.key, rank_proc.reason)
        else:
            gpus = ",".join(map(str, rank_proc.gpu_indices)) or "none"
            self.log.info("%s started: pid %d, GPUs %s", rank_proc.key, rank_proc.pid, gpus)

    def _on_kill(self, body: dict) -> None:
        """Stop the job here (one attempt of it if given): SIGTERM now, SIGKILL after the grace period."""
        job_id, attempt = body["job_id"], body.get("attempt")
        if not is_job_id(job_id) or not (attempt is None or is_count(attempt)):
            self.log.warning("dropped a KILL with a bad job id or attempt: %r", body)
            return
        now = time.monotonic()
        ranks = [rank for key, rank in self.ranks.items()
                 if key.job_id == job_id and attempt in (None, key.attempt)]
        for rank in ranks:
            rank.kill(now)
        grace = max((rank.kill_grace for rank in ranks), default=DEFAULT_KILL_GRACE)
        pending = self.kills.start(job_id, attempt, grace, now)
        # Every process of the job, not only the ranks' groups: children that called setsid left those.
        signalled = pending.target.terminate()
        self.log.info("%s: stopping (%s): SIGTERM to %d process(es), SIGKILL to any left in %g s",
                      pending.target, body["reason"], signalled, pending.deadline - now)

    def _on_resend(self, body: dict) -> None:
        """The master's copy of a stream has a gap: send again from that offset (of the newest attempt here)."""
        if not RankKey(body["job_id"], body["rank"], 0).valid():
            self.log.warning("dropped a RESEND with a bad job id or rank: %r", body)
            return
        rewind(self.ranks, self.spools, body["job_id"], body["rank"], Stream(body["stream"]), body["offset"],
               self.log)
