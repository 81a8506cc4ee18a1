"""The link between the node agent and its job keeper (keeper.py): the wire format, and the agent's end.

One JSON object per line, both ways, on ``<state_dir>/keeper.sock`` (a Unix
stream socket).  A line that is not a valid message is logged and dropped::

    agent -> keeper   {"op": "hello"}
                      {"op": "spawn", "spool": NAME, "command", "cwd", "env": {str: str}, "deadline",
                       "run_as": null or {"name", "uid", "gid", "groups"}}
    keeper -> agent   {"op": "ranks", "pid": int, "ranks": {NAME: pid}}       (the answer to hello)
                      {"op": "spawned", "spool": NAME, "pid", "start_time", "error": null or a reason}
                      {"op": "exited", "spool": NAME, "pid", "exit_code", "signal"}

NAME is a spool's name under ``<state_dir>/jobs`` (see runner.py).  ``deadline``
(CLOCK_MONOTONIC, the same clock in every process) is when the agent stops
waiting for the answer; the keeper refuses a later SPAWN, so a rank the agent
gave up on and started another way never runs twice.  The agent does not block
on a SPAWN: the answer comes with the ends, from :meth:`KeeperLink.events`.

:class:`KeeperLink` is the agent's end: it connects to the keeper that answers
on the socket, or starts one (in a session of its own, so that it outlives the
agent; its log goes to ``<state_dir>/keeper.log``), spawns ranks through it and
collects its answers and the ends it reports.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from enum import Enum

from ..daemon import module_env, write_whole

SOCKET_FILE = "keeper.sock"
LOG_FILE = "keeper.log"
#: A rank's spool file of how it ended, as JSON {"exit_code", "signal", "reason"}.
STATUS_FILE = "status"
#: How rank spools are laid out (runner.py), as a keeper reports it: an agent upgraded while an older keeper
#: runs on must not ask it to start ranks, which it would spool elsewhere.  1 (no report): a directory per rank.
SPOOL_LAYOUT = 2
#: Seconds the agent waits for an answer: a keeper this slow is taken for gone.
REPLY_TIMEOUT = 10.0
#: Seconds a keeper just started may take to listen.
START_TIMEOUT = 10.0


class Op(str, Enum):
    HELLO = "hello"
    RANKS = "ranks"
    SPAWN = "spawn"
    SPAWNED = "spawned"
    EXITED = "exited"
    LEASE = "lease"


_OPS = {op.value for op in Op}
_OPT_INT = (int, type(None))
#: The fields each message must carry, with their types.
FIELDS = {
    Op.HELLO: {},
    Op.RANKS: {"pid": int, "ranks": dict},
    Op.SPAWN: {"spool": str, "command": str, "cwd": str, "env": dict, "deadline": (int, float)},
    Op.SPAWNED: {"spool": str, "pid": _OPT_INT, "start_time": _OPT_INT, "error": (str, type(None))},
    Op.EXITED: {"spool": str, "pid": int, "exit_code": _OPT_INT, "signal": _OPT_INT},
    Op.LEASE: {"seconds": (int, float)},
}


def encode(op: Op, **fields) -> bytes:
    return json.dumps({"op": op.value, **fields}).encode() + b"\n"


def take_messages(buffer: bytearray) -> list[dict | ValueError]:
    """The complete lines at the front of ``buffer`` (removed from it), each a message or why it is none."""
    end = buffer.rfind(b"\n")
    if end < 0:
        return []
    lines = bytes(buffer[:end]).split(b"\n")
    del buffer[:end + 1]
    return [_parse(line) for line in lines]


def _parse(line: bytes) -> dict | ValueError:
    try:
        msg = json.loads(line)
    except ValueError as exc:
        return ValueError(f"not JSON: {exc}")
    op = msg.get("op") if isinstance(msg, dict) else None
    if op not in _OPS:
        return ValueError(f"no known op in {line[:80]!r}")
    wrong = [name for name, kind in FIELDS[Op(op)].items() if not isinstance(msg.get(name), kind)]
    return ValueError(f"{op} without a valid {', '.join(wrong)}") if wrong else msg


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_FILE)


def on_short_path(path: str, act):
    """``act(address)`` for a socket file at ``path``, whose full name may exceed the kernel's 107 bytes."""
    if len(os.fsencode(path)) < 100:
        return act(path)
    # The directory's fd gives the same file a short name.
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    try:
        return act(f"/proc/self/fd/{fd}/{os.path.basename(path)}")
    finally:
        os.close(fd)


def spool_file(spool: str, what: str) -> str:
    """The file of a rank's spool (``<jobs dir>/<name>``) holding ``what``: a Stream's value, STATUS_FILE or
    the spawn record."""
    return f"{spool}.{what}"


def write_status(spool: str, exit_code: int | None, signum: int | None, reason: str | None = None) -> None:
    """Record how a rank ended, in one write (an empty or torn file reads as no status); raises OSError.

    The status of a spool is written once per dispatch (a re-dispatch removes the old one first).
    """
    write_whole(spool_file(spool, STATUS_FILE),
                json.dumps({"exit_code": exit_code, "signal": signum, "reason": reason}))


class KeeperLost(Exception):
    """No keeper answers, or the link to it broke; the message says how."""


@dataclass(frozen=True)
class Spawned:
    """The keeper's answer to a spawn request: the rank's pid and /proc start time, or why it did not start."""

    spool: str
    pid: int | None
    start_time: int | None
    error: str | None


@dataclass(frozen=True)
class Exited:
    """A rank's process has ended, as the keeper saw it."""

    spool: str
    pid: int
    exit_code: int | None
    signal: int | None


class KeeperLink:
    """The agent's connection to the keeper of its state directory."""

    def __init__(self, sock: socket.socket, log: logging.Logger):
        self.sock = sock
        self.log = log
        self.inbox = bytearray()
        self.due: list[Spawned | Exited] = []   # read and not yet handed out by events()
        self.unanswered: dict[str, float] = {}  # spawn requests: spool name -> deadline (monotonic)
        self.pid = 0                        # the keeper's
        self.process: subprocess.Popen | None = None   # the keeper, if this agent started it
        self.ranks: dict[str, int] = {}     # what it ran when we connected and still runs: spool name -> pid
        self.layout = 1                     # the spool layout it knows (SPOOL_LAYOUT for a current keeper)
        self.poller = select.poll()         # select.select cannot watch fds above 1023
        self.poller.register(sock, select.POLLIN)

    @classmethod
    def open(cls, state_dir: str, log: logging.Logger, verbose: bool = False) -> "KeeperLink":
        """Connect to the keeper of ``state_dir``, starting one if none answers; KeeperLost if that fails."""
        try:
            return cls._connect(state_dir, log)
        except KeeperLost as exc:
            log.info("no job keeper answers in %s (%s): starting one", state_dir, exc)
        process = _start_keeper(state_dir, verbose)
        link = cls._connect(state_dir, log)
        link.process = process
        return link

    @classmethod
    def _connect(cls, state_dir: str, log: logging.Logger) -> "KeeperLink":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            on_short_path(socket_path(state_dir), sock.connect)
        except OSError as exc:
            sock.close()
            raise KeeperLost(exc.strerror or str(exc)) from None
        sock.setblocking(False)
        link = cls(sock, log)
        try:
            link._send(encode(Op.HELLO), time.monotonic() + REPLY_TIMEOUT)
            hello = link._answer(Op.RANKS, time.monotonic() + REPLY_TIMEOUT)
        except KeeperLost:
            link.close()
            raise
        link.pid = hello["pid"]
        link.ranks = {name: pid for name, pid in hello["ranks"].items() if isinstance(pid, int)}
        link.layout = hello.get("layout", 1)
        return link

    @property
    def outdated(self) -> bool:
        """A keeper from an older zmgpu (another spool layout): it keeps the ranks it runs and starts none."""
        return self.layout != SPOOL_LAYOUT

    def fileno(self) -> int:
        return self.sock.fileno()

    def lease(self, seconds: float) -> None:
        """Tell the keeper how long its ranks may run with no agent before the master has given up on them."""
        self._send(encode(Op.LEASE, seconds=seconds), time.monotonic() + REPLY_TIMEOUT)

    def spawn(self, spool: str, command: str, cwd: str, env: dict[str, str], run_as: dict | None = None) -> None:
        """Ask for a rank whose spool is named ``spool`` (as the account ``run_as``, if given);
        the answer comes from events() as Spawned.

        Not waiting for it spares the agent a round trip per rank.  KeeperLost when
        the link broke (the rank may then have started: its processes are the
        caller's to stop).
        """
        deadline = time.monotonic() + REPLY_TIMEOUT
        self._send(encode(Op.SPAWN, spool=spool, command=command, cwd=cwd, env=env, deadline=deadline,
                          run_as=run_as), deadline)
        self.unanswered[spool] = deadline

    def events(self) -> list[Spawned | Exited]:
        """Answers and ends since the last call, read without waiting, in order.

        KeeperLost when the keeper is gone, or has not answered a spawn request in time.
        """
        self._receive()
        self._sort(None)
        if self.unanswered and min(self.unanswered.values()) < time.monotonic():
            raise KeeperLost(f"the keeper did not answer within {REPLY_TIMEOUT:g} s")
        due, self.due = self.due, []
        return due

    def close(self) -> None:
        self.sock.close()
        if self.process is not None:
            self.process.poll()     # reaps a keeper that died; one that runs on is left alone

    def _send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                self._wait(select.POLLOUT, deadline)
            except OSError as exc:
                raise KeeperLost(f"the keeper's connection failed: {exc.strerror or exc}") from None

    def _answer(self, op: Op, deadline: float) -> dict:
        """The keeper's next ``op`` message; answers and ends that come first are kept for events()."""
        while True:
            answer = self._sort(op)
            if answer is not None:
                return answer
            self._wait(select.POLLIN, deadline)
            self._receive()

    def _sort(self, op: Op | None) -> dict | None:
        """File the complete messages read so far, up to the first ``op`` message: it is returned."""
        while (end := self.inbox.find(b"\n")) >= 0:
            line = self.inbox[:end + 1]
            del self.inbox[:end + 1]
            [msg] = take_messages(line)
            if isinstance(msg, ValueError):
                self.log.warning("dropped a malformed message from the job keeper: %s", msg)
            elif msg["op"] == Op.EXITED:
                self.ranks.pop(msg["spool"], None)
                self.due.append(Exited(msg["spool"], msg["pid"], msg["exit_code"], msg["signal"]))
            elif msg["op"] == Op.SPAWNED and self.unanswered.pop(msg["spool"], None) is not None:
                self.due.append(Spawned(msg["spool"], msg["pid"], msg["start_time"], msg["error"]))
            elif msg["op"] == op:
                return msg
            else:
                self.log.warning("dropped an unexpected %s message from the job keeper", msg["op"])
        return None

    def _wait(self, event: int, deadline: float) -> None:
        self.poller.modify(self.sock, event)
        if not self.poller.poll(max(0, (deadline - time.monotonic()) * 1000)):
            raise KeeperLost(f"the keeper did not answer within {REPLY_TIMEOUT:g} s")

    def _receive(self) -> None:
        """Read all that has arrived; KeeperLost when the keeper closed the connection."""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                raise KeeperLost(f"the keeper's connection failed: {exc.strerror or exc}") from None
            if not data:
                raise KeeperLost("the keeper closed the connection")
            self.inbox += data


def _start_keeper(state_dir: str, verbose: bool) -> subprocess.Popen:
    """Start a keeper for ``state_dir`` and wait until it listens; KeeperLost if it does not."""
    state_dir = os.path.abspath(state_dir)
    log_path = os.path.join(state_dir, LOG_FILE)
    env = module_env()   # the keeper runs the same zmgpu code as this agent
    ready, ready_w = os.pipe()
    try:
        with open(log_path, "ab") as log:
            # Its own session: a signal to the agent's process group (Ctrl-C, a supervisor) does not reach it.
            process = subprocess.Popen(
                [sys.executable, "-m", "zmgpu.node.keeper", "--state-dir", state_dir, "--ready-fd", str(ready_w),
                 *(["--verbose"] if verbose else [])],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log, pass_fds=(ready_w,),
                start_new_session=True)
    except OSError as exc:
        os.close(ready)
        raise KeeperLost(f"cannot start a job keeper: {exc.strerror or exc}") from None
    finally:
        os.close(ready_w)
    try:
        poller = select.poll()
        poller.register(ready, select.POLLIN)
        # One byte once it listens; end of file if it gave up.
        started = poller.poll(START_TIMEOUT * 1000) and os.read(ready, 1)
    finally:
        os.close(ready)
    if not started:
        raise KeeperLost(f"the job keeper did not start; see {log_path}")
    return process
