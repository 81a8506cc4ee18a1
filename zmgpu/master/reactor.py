"""The master's event loop: one thread, one zmq.Poller, every socket and timer.

The reactor owns the ROUTER (node agents and clients) and PUB sockets.  Each
incoming message is decoded once and handed to the handler registered for its
type; a bad message gets a typed error reply (clients) or a log line (nodes),
and a failing handler is logged, so one bad message never stops the loop.
Timers come from the poll timeout.  After each turn the ``after_turn`` hook
runs once, however many messages arrived: the scheduler pass lives there.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

import zmq

from ..protocol import ErrorCode, Message, MsgType, ProtocolError, decode, encode, error_reply

Handler = Callable[[bytes, Message], None]

#: Most messages handled in one turn before timers and the scheduler get a go.
BATCH = 512

#: Messages whose loss is expected and harmless (the peer asks again, or is declared dead): logged at debug.
_ROUTINE = frozenset({MsgType.HEARTBEAT, MsgType.REPLY, MsgType.REREGISTER})


@dataclass
class Timer:
    """A periodic callback driven by the poll timeout."""

    interval: float
    callback: Callable[[], None]
    due: float = 0.0


class BindError(Exception):
    """A socket could not be bound; the message names the address."""


class Reactor:
    """Sockets, dispatch and timers for the master."""

    def __init__(self, host: str, port: int, pub_port: int | None, log: logging.Logger):
        self.log = log
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        # An unknown peer must be an error we see, not a silent drop.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A restarted node agent takes its routing id (its node id) back.
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.router.setsockopt(zmq.LINGER, 0)
        # A bounded queue per peer: a client or node that stops reading cannot grow the master's memory.
        self.router.setsockopt(zmq.SNDHWM, 10_000)
        # XPUB rather than PUB: the master sees what clients subscribe to, and builds no event nobody reads.
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        # A slow subscriber costs at most this many queued messages; it re-fetches the rest by offset.
        self.pub.setsockopt(zmq.SNDHWM, 2000)
        self.port = self._bind(self.router, host, port)
        if pub_port is None:
            pub_port = self.port + 1 if port else 0
        self.pub_port = self._bind(self.pub, host, pub_port)
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.pub, zmq.POLLIN)
        self.subscriptions: set[bytes] = set()   # topic prefixes at least one client subscribed to
        self.handlers: dict[MsgType, Handler] = {}
        # Called with each sender before dispatch: refreshes node liveness, True for a node.
        self.peer_seen: Callable[[bytes], bool] = lambda identity: False
        self.timers: list[Timer] = []
        self.fds: dict[int, Callable[[], None]] = {}
        self.after_turn: Callable[[], None] = lambda: None
        self.running = False

    def _bind(self, sock: zmq.Socket, host: str, port: int) -> int:
        address = f"tcp://{host}:{port or '*'}"
        try:
            sock.bind(address)
        except zmq.ZMQError as exc:
            raise BindError(f"cannot listen on {address}: {exc.strerror}") from None
        endpoint = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        return int(endpoint.rsplit(":", 1)[1])

    def add_timer(self, interval: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` every ``interval`` seconds from the loop."""
        self.timers.append(Timer(interval, callback, time.monotonic() + interval))

    def add_fd(self, fd: int, callback: Callable[[], None]) -> None:
        """Watch a plain file descriptor (signals) on the same poller."""
        self.fds[fd] = callback
        self.poller.register(fd, zmq.POLLIN)

    # -- sending -----------------------------------------------------------------------------

    def send(self, identity: bytes, msg_type: MsgType, body: dict, *payload: bytes) -> bool:
        """Send to one peer without blocking; False (and a log line) if it is gone or its queue is full.

        The reactor never waits on a peer: a full per-peer queue (SNDHWM) means
        that peer is not reading, and the caller decides what a failed send means.
        """
        try:
            self.router.send_multipart([identity, *encode(msg_type, body, *payload)], zmq.NOBLOCK)
            return True
        except zmq.Again:
            why = "its send queue is full"
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            why = "it is not connected"
        level = logging.DEBUG if msg_type in _ROUTINE else logging.WARNING
        self.log.log(level, "%s to %s dropped: %s", msg_type.name, identity.decode(errors="replace"), why)
        return False

    def wants(self, topic: bytes) -> bool:
        """Whether any client subscribed to a prefix of ``topic`` (so it is worth building the message)."""
        return any(topic.startswith(prefix) for prefix in self.subscriptions)

    def publish(self, topic: bytes, msg_type: MsgType, make_body: Callable[[], dict], *payload: bytes) -> None:
        """Fan out to subscribers; the body is built only if someone subscribed.  Drops at the high-water
        mark and never blocks."""
        if self.wants(topic):
            self.pub.send_multipart([topic, *encode(msg_type, make_body(), *payload)], zmq.NOBLOCK)

    def _read_subscriptions(self) -> None:
        # XPUB passes each prefix's first subscribe and last unsubscribe on: a set mirrors it exactly.
        while True:
            try:
                frame = self.pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frame[:1] == b"\x01":
                self.subscriptions.add(frame[1:])
            elif frame[:1] == b"\x00":
                self.subscriptions.discard(frame[1:])

    # -- loop ----------------------------------------------------------------------------------

    def run(self) -> None:
        """Poll, dispatch, run due timers and the end-of-turn hook, until :meth:`stop`."""
        self.running = True
        while self.running:
            events = dict(self.poller.poll(self._timeout_ms()))
            if events.get(self.pub):
                self._read_subscriptions()
            if events.get(self.router):
                self._drain_router()
            for fd, callback in self.fds.items():
                if events.get(fd):
                    callback()
            self._run_timers()
            self._guard(self.after_turn)

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self.router.close(0)
        self.pub.close(0)
        self.ctx.term()

    def _timeout_ms(self) -> int:
        if not self.timers:
            return 1000
        wait = min(t.due for t in self.timers) - time.monotonic()
        return max(0, int(wait * 1000) + 1)

    def _run_timers(self) -> None:
        now = time.monotonic()
        for timer in self.timers:
            if now >= timer.due:
                timer.due = now + timer.interval
                self._guard(timer.callback)

    def _drain_router(self) -> None:
        for _ in range(BATCH):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            self._dispatch(frames)

    def _dispatch(self, frames: list[bytes]) -> None:
        """Decode one message and call its handler; refuse what cannot be handled, never raise."""
        identity, rest = frames[0], frames[1:]
        from_node = self.peer_seen(identity)
        try:
            msg = decode(rest)
            handler = self.handlers.get(msg.type)
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_TYPE,
                                    f"the master does not accept {msg.type.name} messages")
        except ProtocolError as exc:
            self._refuse(identity, from_node, rest, exc.code, exc.message)
            return
        try:
            handler(identity, msg)
        except Exception:  # one bad message must never stop the loop
            self.log.exception("handler for %s from %r failed", msg.type.name, identity)
            self._refuse(identity, from_node, rest, ErrorCode.INTERNAL,
                         f"the master failed to handle {msg.type.name}; see its log")

    def _refuse(self, identity: bytes, from_node: bool, frames: list[bytes],
                code: ErrorCode, message: str) -> None:
        """Answer a client with a typed error; node traffic is only logged."""
        if from_node:
            self.log.warning("dropped message from node %s: %s", identity.decode(errors="replace"), message)
            return
        self.log.debug("refused message from %r: %s", identity, message)
        self.send(identity, MsgType.REPLY, error_reply(_req_of(frames), code, message))

    def _guard(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            self.log.exception("%s failed", getattr(callback, "__name__", callback))


def _req_of(frames: list[bytes]) -> int | None:
    """The request number of an undecodable message, when it can still be read."""
    try:
        req = json.loads(frames[2]).get("req")
    except (IndexError, ValueError, AttributeError, UnicodeDecodeError):
        return None
    return req if isinstance(req, int) else None
