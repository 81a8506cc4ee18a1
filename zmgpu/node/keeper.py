"""The job keeper: the long-lived parent of a node's job ranks, so that how a rank ended outlives the agent.

Only a process's parent learns its exit status (waitpid).  Were the agent the
parent, a rank that ended while no agent ran (a crash, ``kill -9``, an upgrade)
would leave no trace of its exit code.  So the agent has this small process
spawn its ranks: one keeper per state directory, started by an agent that finds
none answering, in a session of its own so that it outlives that agent.

The keeper only spawns, reaps and records.  For a SPAWN it starts the rank as
the runner would (``/bin/sh -c``, a new session, output to the rank's spool
files, as the account the agent names) and answers with its pid, 10 ms later or just before
the rank's end if that comes first (one wake-up of the agent for a short rank, not two); when a rank ends it
writes its exit status beside them (the spool's ``status`` file) and tells the connected agents.
Signals, kills and output stay with the agent, which signals process groups
itself.  A restarted agent connects to the keeper still there (HELLO is
answered with the ranks it runs) and reads from the status files how the
others ended.

The wire format (JSON lines on ``<state_dir>/keeper.sock``) is in
keeper_link.py; connections from another user are refused.  The keeper exits
once it has had no rank and no agent for ``IDLE_EXIT`` seconds, so an agent
stopped for good leaves nothing behind; on SIGTERM, once its last rank ended.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

from ..daemon import SignalPipe, StateDirBusy, lock_state_dir, setup_logging
from .keeper_link import SPOOL_LAYOUT, Op, encode, on_short_path, socket_path, take_messages, write_status
from .runner import RankKey
from .sweep import JobProcesses, boot_ticks, proc_start_time
from .users import START_ERRORS, Account, Started, start_error, start_rank

LOCK_FILE = "keeper.lock"
#: Seconds without ranks or agents before the keeper exits.
IDLE_EXIT = 1.0   # short: a restarting agent with no jobs just starts a new keeper
#: Seconds a new keeper waits for the lock of one that is exiting.
LOCK_WAIT = 2.0
#: A line longer than this is no message of ours: the peer is dropped.
MAX_LINE = 64 << 20
#: Answers queued to an agent that does not read them; beyond this it is dropped (it reconnects).
MAX_BACKLOG = 64 << 20
_PEERCRED = struct.Struct("3i")
#: Seconds the answer to a spawn waits for the rank's end, so that a rank this short costs the agent one
#: wake-up, not two (its end then follows the answer in the same write).  Nothing waits on it: the agent
#: counts the rank as started, and a KILL meanwhile reaches it once the answer is in.
SPAWNED_HOLD = 0.01


@dataclass
class Child:
    popen: Started
    spool: str
    asker: "Peer | None" = None          # the agent that asked for it
    answer_by: float = 0.0               # when the answer goes out if the rank has not ended (monotonic)
    start_time: int | None = None        # its /proc start time, known at the spawn or read before the answer

    def read_start_time(self) -> int | None:
        """Its start time, read from /proc once if the spawn did not give it (its pid must still be its own)."""
        if self.start_time is None:
            self.start_time = proc_start_time(self.popen.pid)
        return self.start_time


@dataclass
class Peer:
    sock: socket.socket
    inbox: bytearray = field(default_factory=bytearray)
    outbox: bytearray = field(default_factory=bytearray)
    writing: bool = False       # registered for EVENT_WRITE: the outbox waits for room


class Keeper:
    """Spawns ranks on request, reaps them, records their ends; one select loop, no threads."""

    def __init__(self, state_dir: str, listener: socket.socket, log):
        self.jobs_dir = os.path.join(state_dir, "jobs")
        self.listener = listener
        self.log = log
        self.children: dict[int, Child] = {}
        # Children whose spawn is still to be answered, in spawn order and so in order of answer_by.
        self.owed: dict[int, Child] = {}
        # Whether this kernel's /proc gives a start time as the clock does (see boot_ticks): checked once.
        self.clock_starts: bool | None = None
        self.peers: dict[socket.socket, Peer] = {}
        self.selector = selectors.DefaultSelector()
        self.devnull = os.open(os.devnull, os.O_RDONLY)
        self.stopping = False
        self.handlers = {Op.HELLO: self._on_hello, Op.SPAWN: self._on_spawn, Op.LEASE: self._on_lease}
        # Seconds ranks may run with no agent: past that the master has declared the node dead and may have
        # run the jobs elsewhere, so they are killed here (None: the agent has not said yet; never).
        self.lease: float | None = None
        self.alone_since: float | None = None

    def run(self) -> int:
        """Serve until idle for IDLE_EXIT seconds, or until SIGTERM and the last rank's end; 0."""
        signals = SignalPipe((signal.SIGCHLD, signal.SIGTERM, signal.SIGINT))
        self.selector.register(signals.fileno(), selectors.EVENT_READ, lambda _: self._on_signals(signals.drain()))
        self.selector.register(self.listener, selectors.EVENT_READ, lambda _: self._accept())
        idle_since = time.monotonic()
        while not (self.stopping and not self.children):
            busy = bool(self.children or self.peers)
            orphan_at = self._orphan_deadline()
            deadlines = [t for t in (None if busy else idle_since + IDLE_EXIT, orphan_at,
                                     next(iter(self.owed.values())).answer_by if self.owed else None)
                         if t is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            for key, mask in self.selector.select(timeout):
                key.data(mask)
            self._answer_spawns(time.monotonic())
            orphan_at = self._orphan_deadline()
            if orphan_at is not None and time.monotonic() >= orphan_at:
                self._kill_orphans()
            # Idle from the end of the last turn that had a rank or an agent.
            if busy or self.children or self.peers:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since >= IDLE_EXIT:
                self.log.info("no job and no agent for %g s: exiting", IDLE_EXIT)
                break
        return 0

    def _on_signals(self, signums: set[int]) -> None:
        if signal.SIGCHLD in signums:
            self._reap()
        if signums & {signal.SIGTERM, signal.SIGINT} and not self.stopping:
            self.log.info("told to stop: exiting once the %d running job rank(s) have ended", len(self.children))
            self.stopping = True

    def _accept(self) -> None:
        try:
            sock, _ = self.listener.accept()
            uid = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[1]
        except OSError:
            return  # the peer gave up meanwhile
        if uid != os.getuid():
            self.log.warning("refused a connection from user id %d: only the agent's user may use the keeper", uid)
            sock.close()
            return
        sock.setblocking(False)
        peer = self.peers[sock] = Peer(sock)
        self.selector.register(sock, selectors.EVENT_READ, lambda mask: self._on_peer(peer, mask))
        self.log.debug("an agent connected")

    def _on_peer(self, peer: Peer, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(peer)
        if not mask & selectors.EVENT_READ or peer.sock not in self.peers:
            return
        try:
            data = peer.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            self.log.warning("connection to an agent failed: %s", exc)
        if not data or len(peer.inbox) > MAX_LINE:
            self._drop(peer)
            return
        peer.inbox += data
        for msg in take_messages(peer.inbox):
            self._handle(peer, msg)

    def _handle(self, peer: Peer, msg: dict | ValueError) -> None:
        """Run the request's handler; a bad message or a failing handler is logged, and the loop goes on."""
        handler = None if isinstance(msg, ValueError) else self.handlers.get(Op(msg["op"]))
        if handler is None:
            self.log.warning("dropped a message: %s", msg if isinstance(msg, ValueError) else "not a request")
            return
        try:
            handler(peer, msg)
        except Exception:
            self.log.exception("handling %s failed", msg["op"])

    def _on_hello(self, peer: Peer, msg: dict) -> None:
        """An agent (re)connected: tell it who we are and which ranks still run."""
        ranks = {child.spool: pid for pid, child in self.children.items()}
        self._send(peer, encode(Op.RANKS, pid=os.getpid(), ranks=ranks, layout=SPOOL_LAYOUT))

    def _on_lease(self, peer: Peer, msg: dict) -> None:
        """The agent passes on the master's dead timeout (see :attr:`lease`)."""
        self.lease = float(msg["seconds"])

    def _orphan_deadline(self) -> float | None:
        """When the ranks, alone since the last agent left, must go; None while that cannot happen."""
        if self.peers or not self.children or self.lease is None:
            self.alone_since = None
            return None
        if self.alone_since is None:
            self.alone_since = time.monotonic()
        return self.alone_since + self.lease

    def _kill_orphans(self) -> None:
        """No agent for the whole lease: the master counts these jobs as lost, so none may run on here."""
        self.log.warning("no node agent for %g s, so the master has declared this node dead: killing %d job "
                         "rank(s) that may already run elsewhere", self.lease, len(self.children))
        for pid, child in list(self.children.items()):
            key = RankKey.parse(child.spool)
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass   # the group is gone already
            JobProcesses(key.job_id, key.attempt).kill()
        self.alone_since = None

    def _on_spawn(self, peer: Peer, msg: dict) -> None:
        """Start one rank with its output going to its spool files; answer with its pid or why not."""
        name = msg["spool"]
        if time.monotonic() > msg["deadline"]:
            self._spawned(peer, name, error="the request came after the agent had stopped waiting")
            return
        if not isinstance(name, str) or RankKey.parse(name) is None:
            self._spawned(peer, name, error=f"{name!r} cannot name a spool")
            return
        account = None
        try:
            account = Account.from_wire(msg.get("run_as"))
            # This loop is the keeper's only thread, so entering the rank's directory around the spawn is safe.
            before = boot_ticks()
            popen = start_rank(os.path.join(self.jobs_dir, name), msg["command"], msg["env"], account, msg["cwd"],
                               devnull=self.devnull)
            after = boot_ticks()
        except START_ERRORS as exc:
            self._spawned(peer, name, error=start_error(exc, account, msg["cwd"]))
            return
        self.children[popen.pid] = self.owed[popen.pid] = Child(popen, name, peer, time.monotonic() + SPAWNED_HOLD,
                                                                self._clock_start(popen.pid, before, after))
        self.log.debug("%s: started pid %d", name, popen.pid)

    def _clock_start(self, pid: int, before: int, after: int) -> int | None:
        """The start time of ``pid``, forked between two clock readings, when they fall in the same tick and
        this kernel's /proc agrees with the clock (an emulated /proc might not); None: /proc is read later."""
        if before != after or self.clock_starts is False:
            return None
        if self.clock_starts is None:
            self.clock_starts = proc_start_time(pid) == before
            if not self.clock_starts:
                self.log.info("start times in /proc do not follow the boot clock here: reading them from /proc")
        return before if self.clock_starts else None

    def _answer_spawns(self, now: float) -> None:
        """Answer the spawns whose hold is over."""
        while self.owed and now >= next(iter(self.owed.values())).answer_by:
            self._answer(next(iter(self.owed)))

    def _read_start_times(self) -> None:
        """The start time of each child still owed an answer, read before any can be reaped (while its pid is
        still its own).  By then its exec is done and the read is cheap; straight after the spawn it waited."""
        for child in self.owed.values():
            child.read_start_time()

    def _answer(self, pid: int, then: bytes = b"") -> None:
        """Send the owed answer to ``pid``'s spawn, and ``then`` in the same write."""
        child = self.owed.pop(pid)
        self._send(child.asker, encode(Op.SPAWNED, spool=child.spool, pid=pid, start_time=child.read_start_time(),
                                       error=None) + then)

    def _spawned(self, peer: Peer, name: str, error: str) -> None:
        """A spawn that failed: say why."""
        self.log.warning("%s: cannot start: %s", name, error)
        self._send(peer, encode(Op.SPAWNED, spool=name, pid=None, start_time=None, error=error))

    def _reap(self) -> None:
        """Collect every ended child: record its exit status, then tell the agents (its asker the answer to
        its spawn first, if still owed)."""
        self._read_start_times()
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return  # the others still run
            child = self.children.pop(pid, None)
            if child is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            child.popen.returncode = code   # reaped here: the Popen object must never wait for it
            exit_code, signum = (code, None) if code >= 0 else (None, -code)
            try:
                write_status(os.path.join(self.jobs_dir, child.spool), exit_code, signum)
            except OSError as exc:
                self.log.error("%s: cannot record its end (exit code %s, signal %s): %s",
                               child.spool, exit_code, signum, exc.strerror or exc)
            self.log.debug("%s: pid %d ended (exit code %s, signal %s)", child.spool, pid, exit_code, signum)
            message = encode(Op.EXITED, spool=child.spool, pid=pid, exit_code=exit_code, signal=signum)
            told = None
            if pid in self.owed:
                told = child.asker
                self._answer(pid, then=message)      # one write, one wake-up of the agent
            for peer in list(self.peers.values()):
                if peer is not told:
                    self._send(peer, message)

    def _send(self, peer: Peer, data: bytes) -> None:
        if peer.sock in self.peers:     # not dropped meanwhile
            peer.outbox += data
            self._flush(peer)

    def _flush(self, peer: Peer) -> None:
        """Send what the socket takes now; wait for room (never block) for the rest."""
        try:
            del peer.outbox[:peer.sock.send(peer.outbox)]
        except BlockingIOError:
            pass
        except OSError:
            self._drop(peer)
            return
        if len(peer.outbox) > MAX_BACKLOG:
            self.log.warning("an agent does not read what it is sent: dropping it")
            self._drop(peer)
        elif bool(peer.outbox) != peer.writing:
            peer.writing = bool(peer.outbox)
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if peer.writing else 0)
            self.selector.modify(peer.sock, events, self.selector.get_key(peer.sock).data)

    def _drop(self, peer: Peer) -> None:
        self.log.debug("an agent disconnected")
        self.selector.unregister(peer.sock)
        del self.peers[peer.sock]
        peer.sock.close()


def listen(state_dir: str) -> socket.socket:
    """The keeper's listening socket, replacing any left by a keeper that died; raises OSError."""
    path = socket_path(state_dir)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    on_short_path(path, listener.bind)
    listener.listen(64)
    listener.setblocking(False)
    return listener


def main(argv: list[str] | None = None) -> int:
    """``python -m zmgpu.node.keeper --state-dir DIR``: serve the agents of DIR; the exit status."""
    parser = argparse.ArgumentParser(prog="zmgpu-keeper", description="Parent of a zmgpu node's job ranks "
                                     "(started by zmgpu-node; not meant to be run by hand).")
    parser.add_argument("--state-dir", required=True, help="the node agent's state directory")
    parser.add_argument("--ready-fd", type=int, default=None, help="write a byte to this fd once listening")
    parser.add_argument("--verbose", action="store_true", help="log every spawn and end (default: off)")
    args = parser.parse_args(argv)
    state_dir = os.path.abspath(args.state_dir)
    log = setup_logging("zmgpu.keeper", args.verbose)
    os.chdir("/")   # hold no job's or user's directory
    deadline = time.monotonic() + LOCK_WAIT
    try:
        # A keeper that is exiting (idle) still holds the lock for a moment.
        while True:
            try:
                lock = lock_state_dir(state_dir, LOCK_FILE)
                break
            except StateDirBusy:
                if time.monotonic() > deadline:
                    log.error("another keeper already serves %s", state_dir)
                    return 1
                time.sleep(0.05)   # a retry interval, not a synchronisation: the holder may be exiting
        listener = listen(state_dir)
    except OSError as exc:
        log.error("cannot serve on %s: %s", state_dir, exc.strerror or exc)
        return 1
    log.info("keeper pid %d serving %s", os.getpid(), state_dir)
    if args.ready_fd is not None:
        # Closed whatever happens: ranks start with posix_spawn, which closes only close-on-exec descriptors.
        try:
            os.write(args.ready_fd, b"1")
        except OSError:
            pass  # the agent stopped waiting (or gave no such fd); the next one finds this keeper listening
        finally:
            try:
                os.close(args.ready_fd)
            except OSError:
                pass
    try:
        return Keeper(state_dir, listener, log).run()
    finally:
        # Unlinked before the lock goes (at exit): a socket file here always belongs to the lock holder.
        try:
            os.unlink(socket_path(state_dir))
        except FileNotFoundError:
            pass  # the state directory went away
        lock.close()


if __name__ == "__main__":
    sys.exit(main())
