"""The master's event loop: one thread, one zmq.Poller, every socket and timer.

The reactor owns the ROUTER (node agents and clients) and PUB sockets.  Each
incoming message is decoded once and handed to the handler registered for its
type; a bad message gets a typed error reply (clients) or a log line (nodes),
and a failing handler is logged, so one bad message never stops the loop.
Timers come from the poll timeout.  After each turn the ``after_turn`` hook
runs once, however many messages arrived: the scheduler pass lives there.
Events published during a turn go out at its end, after its replies and
dispatches (see :meth:`Reactor.publish`).

With keys (:class:`zmgpu.auth.ServerKeys`) both sockets are CURVE servers.
The ZAP handler that admits handshakes is one more socket on the same poller;
each message is then read with its User-Id (the sender's public key) and
passes the ``admit`` check before its handler runs, and each subscription
passes ``may_subscribe`` (the XPUB socket is in manual mode).  Without keys
messages are read as plain bytes, as fast as before.  Either way a peer that
sends a frame over ``max_message_bytes`` is disconnected by ZeroMQ before the
master holds it.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Callable

import zmq

from .. import iothreads
from ..auth import ServerKeys, ZapHandler
from ..protocol import ErrorCode, Message, MsgType, ProtocolError, decode, encode, error_reply

Handler = Callable[[bytes, Message], None]
#: ``admit(routing id, sender's key, message)``: None to go on, else why the message is refused.
Admit = Callable[[bytes, bytes, Message], "str | None"]

#: Most messages handled in one turn before timers and the scheduler get a go.
BATCH = 512

#: Events queued for one subscriber at most; a slow one re-fetches the rest by offset.
PUB_HWM = 2000

#: A subscription is a topic prefix of a few dozen bytes; a bigger frame is no subscription of ours.
MAX_SUBSCRIPTION_BYTES = 4096

#: Messages whose loss is expected and harmless (the peer asks again, or is declared dead): logged at debug.
_ROUTINE = frozenset({MsgType.HEARTBEAT, MsgType.REPLY, MsgType.REREGISTER})


@dataclass
class Timer:
    """A periodic callback driven by the poll timeout."""

    interval: float
    callback: Callable[[], None]
    due: float = 0.0


class Prefixes:
    """Topic prefixes that clients subscribed to, asked whether any begins a topic.

    Kept by length, so a question costs one set lookup per distinct prefix
    length, however many prefixes: a client waiting on 10,000 tasks named one
    by one subscribes to each one's end, and a scan of every prefix at each
    event made the master's CPU per job double.
    """

    def __init__(self):
        self.by_length: dict[int, set[bytes]] = {}

    def add(self, prefix: bytes) -> None:
        self.by_length.setdefault(len(prefix), set()).add(prefix)

    def discard(self, prefix: bytes) -> None:
        same = self.by_length.get(len(prefix))
        if same is not None:
            same.discard(prefix)
            if not same:
                del self.by_length[len(prefix)]

    def match(self, topic: bytes) -> bool:
        """Whether a prefix begins ``topic`` (a length over the topic's slices the topic whole, which is in the
        set only as a prefix of its own length, so it needs no check)."""
        return any(topic[:length] in same for length, same in self.by_length.items())


class BindError(Exception):
    """A socket could not be bound; the message names the address."""


class Reactor:
    """Sockets, dispatch and timers for the master."""

    def __init__(self, host: str, port: int, pub_port: int | None, log: logging.Logger,
                 max_message_bytes: int = 8 << 20, keys: ServerKeys | None = None):
        self.log = log
        self.keys = keys
        self.ctx = iothreads.context()
        self.poller = zmq.Poller()
        # Bound first: libzmq asks whatever handler exists when a handshake starts.
        self.zap = ZapHandler(self.ctx, keys, log) if keys is not None else None
        self.router = self.ctx.socket(zmq.ROUTER)
        # An unknown peer must be an error we see, not a silent drop.
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Without keys a restarted node agent takes its routing id (its node id) back.  With keys nobody
        # may take over a connected peer's routing id (a guessed one would receive that peer's messages):
        # node agents use a fresh, secret routing id per connection instead.
        self.router.setsockopt(zmq.ROUTER_HANDOVER, int(keys is None))
        self.router.setsockopt(zmq.LINGER, 0)
        # A bounded queue per peer: a client or node that stops reading cannot grow the master's memory.
        self.router.setsockopt(zmq.SNDHWM, 10_000)
        self.router.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        # XPUB rather than PUB: the master sees what clients subscribe to, and builds no event nobody reads.
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.setsockopt(zmq.SNDHWM, PUB_HWM)
        self.pub.setsockopt(zmq.MAXMSGSIZE, MAX_SUBSCRIPTION_BYTES)
        if keys is not None:
            keys.serve(self.router)
            keys.serve(self.pub)
            # Each subscription is granted (or not) by may_subscribe, subscriber by subscriber.
            self.pub.setsockopt(zmq.XPUB_MANUAL, 1)
            self.poller.register(self.zap.sock, zmq.POLLIN)
        self.port = self._bind(self.router, host, port)
        if pub_port is None:
            pub_port = self.port + 1 if port else 0
        self.pub_port = self._bind(self.pub, host, pub_port)
        self.poller.register(self.router, zmq.POLLIN)
        self.poller.register(self.pub, zmq.POLLIN)
        self.subscriptions = Prefixes()          # topic prefixes at least one client subscribed to
        self.unpublished: list[list[bytes]] = []   # this turn's events, sent at its end (see publish)
        self.admit: Admit = lambda identity, key, msg: None
        self.may_subscribe: Callable[[bytes, bytes], bool] = lambda key, topic: True
        self.handlers: dict[MsgType, Handler] = {}
        # Called with each sender before dispatch: refreshes node liveness, True for a node.
        self.peer_seen: Callable[[bytes], bool] = lambda identity: False
        self.peer_known: Callable[[bytes], bool] = lambda identity: False   # the same, without the refresh
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
        """Whether any client subscribed to a prefix of ``topic`` (so it is worth building the message).

        Always True with keys: in manual mode the master cannot tell which grants are still in force.
        """
        return self.keys is not None or self.subscriptions.match(topic)

    def publish(self, topics: bytes | list[bytes], msg_type: MsgType, make_body: Callable[[], dict],
                *payload: bytes) -> None:
        """Fan out under each of ``topics`` that someone subscribed to; the message is built only then, and
        once, but sent at the end of the turn (:meth:`send_published`).  Drops at the high-water mark and never
        blocks.

        Why at the end: each send that finds ZeroMQ's I/O thread asleep wakes it,
        which costs more than the send itself.  Sent together with the turn's
        replies and dispatches, the events share their wake-up, and the dispatches,
        which start jobs, go first.
        """
        frames = None
        for topic in [topics] if isinstance(topics, bytes) else topics:
            if self.wants(topic):
                frames = frames or encode(msg_type, make_body(), *payload)
                self.unpublished.append([topic, *frames])
        if len(self.unpublished) >= PUB_HWM:
            # A burst (a big array submitted, a pass over a long queue) is not held whole in memory: past the
            # high-water mark the subscriber of them all would lose the rest anyway (a client re-fetches by offset).
            self.send_published()

    def send_published(self) -> None:
        """Send the events published since the last call, in order."""
        unpublished, self.unpublished = self.unpublished, []
        for frames in unpublished:
            self.pub.send_multipart(frames, zmq.NOBLOCK)

    def _read_subscriptions(self) -> None:
        """Take each (un)subscription: without keys mirror them; with keys grant or refuse each one."""
        while True:
            try:
                frame = self.pub.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            kind, topic = frame.bytes[:1], frame.bytes[1:]
            if self.keys is not None:
                self._grant(kind, topic, frame)
            elif kind == b"\x01":
                # XPUB passes each prefix's first subscribe and last unsubscribe on: a set mirrors it exactly.
                self.subscriptions.add(topic)
            elif kind == b"\x00":
                self.subscriptions.discard(topic)

    def _grant(self, kind: bytes, topic: bytes, frame: zmq.Frame) -> None:
        """Manual mode: every (un)subscription of every subscriber comes here, with the subscriber's key."""
        if kind == b"\x00":
            self.pub.setsockopt(zmq.UNSUBSCRIBE, topic)
            return
        if kind != b"\x01":
            return
        key = _sender_key(frame)
        if self.may_subscribe(key, topic):
            # Applies to the subscriber whose message was read last, and only to it.
            self.pub.setsockopt(zmq.SUBSCRIBE, topic)
        else:
            self.log.warning("refused a subscription to %r: key %s may not read it",
                             topic.decode(errors="replace"), key.decode(errors="replace"))

    # -- loop ----------------------------------------------------------------------------------

    def run(self) -> None:
        """Poll, dispatch, run due timers and the end-of-turn hook, until :meth:`stop`."""
        self.running = True
        while self.running:
            events = dict(self.poller.poll(self._timeout_ms()))
            if self.zap is not None and events.get(self.zap.sock):
                self.zap.answer()
            if events.get(self.pub):
                self._read_subscriptions()
            if events.get(self.router):
                self._drain_router()
            for fd, callback in self.fds.items():
                if events.get(fd):
                    callback()
            self._run_timers()
            self._guard(self.after_turn)
            self._guard(self.send_published)

    def stop(self) -> None:
        self.running = False

    def close(self) -> None:
        self.router.close(0)
        self.pub.close(0)
        if self.zap is not None:
            self.zap.close()
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
        with_keys = self.keys is not None
        for _ in range(BATCH):
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=not with_keys)
            except zmq.Again:
                return
            if with_keys:
                # With the sender's key, the User-Id the ZAP handler set (the last frame came from the peer;
                # the routing id frame is the ROUTER's own).
                self._dispatch([frame.bytes for frame in frames], _sender_key(frames[-1]))
            else:
                self._dispatch(frames)

    def _dispatch(self, frames: list[bytes], key: bytes = b"") -> None:
        """Decode one message and call its handler; refuse what cannot be handled, never raise."""
        identity, rest = frames[0], frames[1:]
        # With keys only an admitted message is a sign of life: a node whose key was taken off the list
        # must go quiet, then down, however often its open connection still speaks.
        from_node = self.peer_seen(identity) if self.keys is None else self.peer_known(identity)
        try:
            msg = decode(rest)
            handler = self.handlers.get(msg.type)
            if handler is None:
                raise ProtocolError(ErrorCode.UNKNOWN_TYPE,
                                    f"the master does not accept {msg.type.name} messages")
            refusal = self.admit(identity, key, msg)
            if refusal is not None:
                self.log.warning("refused %s from key %s: %s", msg.type.name, key.decode(errors="replace"), refusal)
                raise ProtocolError(ErrorCode.PERMISSION_DENIED, f"permission denied: {refusal}")
        except ProtocolError as exc:
            self._refuse(identity, from_node, rest, exc.code, exc.message)
            return
        if self.keys is not None:
            self.peer_seen(identity)
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


def _sender_key(frame: zmq.Frame) -> bytes:
    """The key the ZAP handler gave the sender's connection; b"" (no one's) for a message without one,
    such as the unsubscriptions XPUB makes up itself when a subscriber leaves."""
    try:
        return frame.get("User-Id").encode()
    except zmq.ZMQError:
        return b""


def _req_of(frames: list[bytes]) -> int | None:
    """The request number of an undecodable message, when it can still be read."""
    try:
        req = json.loads(frames[2]).get("req")
    except (IndexError, ValueError, AttributeError, UnicodeDecodeError):
        return None
    return req if isinstance(req, int) else None
