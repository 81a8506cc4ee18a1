"""Following a job's output without loss: the Clone pattern behind ``submit -i``, ``attach`` and ``logs``.

A :class:`Follower` subscribes to the job's topics on the master's PUB socket
first, then asks the master for the job and for the bytes it already holds, so
output written before the client arrived is not lost.  Each published chunk
carries its byte offset: bytes already written are dropped, and a chunk that
starts past what was written reveals a gap (PUB drops at its high-water mark, a
stopped client falls behind, a restarted master does not publish again), which
is fetched from the master by offset.  The job's final dict carries each
stream's final size, so the follower knows when it has everything, and keeps
fetching until the master holds it all.

Every request here waits at most :data:`CHECK_INTERVAL`.  One that gets no
answer is counted and made again on a fresh socket at the next turn; only
``max_consecutive_timeouts`` misses in a row give up.  ZeroMQ reconnects the SUB
socket by itself, so a follower rides out a master restart and goes on from its
offsets, without a gap or a repeated byte.  A turn makes at most one request, so
Ctrl-C and Ctrl-\\ (trapped on a pipe the poller watches) are handled within a
second even while the master is away.

``zmq`` is imported only when a follower runs.
"""

from __future__ import annotations

import itertools
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import BinaryIO, Callable, Optional

from . import protocol
from .errors import ClientError, Detached, LocalError, MasterUnreachable
from .model import JobState
from .protocol import MsgType

#: Seconds without news after which a follower asks the master how the job is doing;
#: also the longest any of its requests waits for an answer (one check a second).
CHECK_INTERVAL = 1.0
#: Seconds between FETCHes of a stream the master does not yet hold in full (a finished
#: job's last bytes still on their way from the node).
STALL_RETRY = 0.25
#: Published messages taken in one turn before a due request gets its go.
SUB_BATCH = 64

#: ``on_interrupt(job_id, count)``: called at the ``count``-th Ctrl-C; True keeps following.
InterruptHandler = Callable[[str, int], bool]


def _finished(job: Optional[dict]) -> bool:
    return job is not None and JobState(job["state"]).finished


def reattach_hint(job_id: str) -> str:
    """What a detached session says about the job it leaves."""
    return f"detached from job {job_id}; it keeps running. Re-attach with: zmgpu attach {job_id}"


@dataclass
class Limits:
    """The deadlines and patience of one follower (no deadline by default)."""

    session_timeout: float = math.inf
    max_wait_time: float = math.inf
    max_consecutive_timeouts: int = 30
    start: float = field(default_factory=time.monotonic)

    @property
    def session_deadline(self) -> float:
        return self.start + self.session_timeout

    @property
    def wait_deadline(self) -> float:
        return self.start + self.max_wait_time

    @property
    def patience(self) -> float:
        """Seconds a stream may stay short of its known size with the master answering but not growing."""
        return self.max_consecutive_timeouts * CHECK_INTERVAL


@dataclass(frozen=True)
class View:
    """What a follower follows and where the bytes go."""

    files: dict                  # stream name ("stdout"/"stderr") -> binary file
    rank: Optional[int] = None   # one rank, or every rank
    ordered: bool = False        # ranks one after another (logs), or each byte as it arrives (interactive)
    live: bool = True            # until the job ends, or only what the master holds now
    from_now: bool = False       # skip what the job wrote before the follower arrived
    label: bool = False          # begin each line with its rank (srun --label)


class Labelled:
    """A binary file that begins each line written to it with ``RANK: ``, as srun --label does."""

    def __init__(self, out: BinaryIO, rank: int):
        self.out = out
        self.prefix = f"{rank}: ".encode()
        self.line_start = True

    def write(self, data: bytes) -> None:
        out = []
        lines = data.split(b"\n")
        for i, piece in enumerate(lines):
            last = i == len(lines) - 1
            if last and not piece:
                break     # the data ended with a newline: the next line has not begun
            if self.line_start:
                out.append(self.prefix)
            out.append(piece if last else piece + b"\n")
            self.line_start = not last
        self.out.write(b"".join(out))

    def flush(self) -> None:
        self.out.flush()


@dataclass(eq=False)
class Track:
    """One (rank, stream) being followed: where its bytes go and how far they have got."""

    rank: int
    stream: str
    out: BinaryIO
    have: int = 0            # bytes written (or skipped, from_now)
    known: int = 0           # bytes the master is known to hold; once the job ended, the final size
    confirmed: bool = True   # False until a FETCH reply has told what the master holds (start of a
    #                          dump, end of the job): only then may a stream at its known size be done
    retry_at: float = 0.0    # a FETCH that found nothing new waits until then

    @property
    def wanted(self) -> bool:
        """A FETCH is due: bytes are known to exist past what was written, or the size is unconfirmed."""
        return self.have < self.known or not self.confirmed


def published(sub, limit: Optional[int] = None):
    """The messages waiting on a SUB socket (topic frame dropped), at most ``limit`` read; malformed ones
    are skipped."""
    import zmq

    for _ in itertools.repeat(None) if limit is None else range(limit):
        try:
            frames = sub.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        try:
            yield protocol.decode(frames[1:])
        except protocol.ProtocolError:
            continue


class SignalTrap:
    """Ctrl-C (SIGINT) and Ctrl-\\ (SIGQUIT) as bytes on a pipe the poller watches.

    No KeyboardInterrupt lands in the middle of a write or a request, and a signal
    that arrives before the follower runs (during the submit request) waits in the
    pipe until it does.  Only one trap may be open at a time (one wakeup fd per process).
    """

    def __init__(self, signums=(signal.SIGINT, signal.SIGQUIT)):
        from .daemon import SignalPipe

        self.previous = {signum: signal.getsignal(signum) for signum in signums}
        self.pipe = SignalPipe(signums)

    def __enter__(self) -> "SignalTrap":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def fileno(self) -> int:
        return self.pipe.fileno()

    def fired(self) -> set:
        """The signals received since the last call."""
        return self.pipe.drain()

    def close(self) -> None:
        """Give the signals back to whoever handled them before."""
        self.pipe.close()
        for signum, previous in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)


def own_trap(on_interrupt: Optional[InterruptHandler], detach_on_quit: bool) -> Optional[SignalTrap]:
    """A trap for the signals a follower acts on, where it may set one (the main thread only)."""
    signums = [signum for signum, wanted in ((signal.SIGINT, on_interrupt is not None),
                                             (signal.SIGQUIT, detach_on_quit)) if wanted]
    if not signums or threading.current_thread() is not threading.main_thread():
        return None
    return SignalTrap(signums)


class Follower:
    """One following of a job's output: tracks, the job's latest dict, deadlines and liveness."""

    def __init__(self, client, job_id: str, view: View, limits: Limits, trap: Optional[SignalTrap] = None,
                 on_interrupt: Optional[InterruptHandler] = None, detach_on_quit: bool = False):
        self.client = client
        self.job_id = job_id
        self.view = view
        self.limits = limits
        self.trap = trap
        self.on_interrupt = on_interrupt
        self.detach_on_quit = detach_on_quit
        self.tracks: dict[tuple[int, str], Track] = {}
        self.job: Optional[dict] = None      # the latest word on the job; None before the first answer
        self.sub = None                      # SUB socket (live only), once the PUB port is known
        self.poller = None
        self.misses = 0                      # unanswered requests in a row
        self.interrupts = 0
        self.last_news = time.monotonic()
        self.stalled_since: Optional[float] = None   # since when no byte came while one was known
        self.handlers = {MsgType.OUTPUT: self._on_output, MsgType.JOB_STATE: self._on_job_state}
        self.signal_handlers = {signal.SIGINT: self._on_ctrl_c, signal.SIGQUIT: self._on_quit}

    # -- tracks and bytes -------------------------------------------------------------------------

    def _track(self, rank: int, stream: str) -> Optional[Track]:
        """The track of (rank, stream), made on first sight; None for what the view leaves out."""
        key = (rank, stream)
        track = self.tracks.get(key)
        if track is None and stream in self.view.files and self.view.rank in (None, rank):
            # A dump confirms every size it starts from; a live view only what it sees at the end.
            out = self.view.files[stream]
            if self.view.label:
                out = Labelled(out, rank)
            last = next(reversed(self.tracks), None)
            track = self.tracks[key] = Track(rank, stream, out, confirmed=self.view.live)
            if self.view.ordered and last is not None and key < last:
                # Rank order, which only an ordered view needs (it follows one stream).  Tracks mostly come in
                # that order: sorting at each new one made the first look at a 4,096-rank job take 5 s, and
                # so did sorting both streams' tracks (stderr sorts before stdout) for an unordered one.
                self.tracks = dict(sorted(self.tracks.items()))
        return track

    def _settled(self, track: Track) -> bool:
        """Nothing more will come for this track."""
        return not track.wanted and (not self.view.live or _finished(self.job))

    def _open_tracks(self):
        """Tracks whose bytes may be written now, in order: all, or in an ordered view the first unsettled and
        those before."""
        for track in self.tracks.values():
            yield track
            if self.view.ordered and not self._settled(track):
                return

    def _is_open(self, track: Track) -> bool:
        """Whether ``track``'s bytes may be written now (every track's may in an unordered view: no walk over
        the tracks for each chunk)."""
        return not self.view.ordered or any(opened is track for opened in self._open_tracks())

    def _write(self, track: Track, offset: int, data: bytes) -> None:
        """Write the part of a chunk the track lacks; a chunk past its end is left to a FETCH."""
        if offset > track.have:
            return
        new = data[track.have - offset:]
        if new:
            track.out.write(new)
            track.out.flush()
            track.have += len(new)
            self.stalled_since = None

    def _absorb(self, job: dict) -> None:
        """Take a job dict as the latest word: its ranks, their sizes, and whether it has ended."""
        first, was_finished = self.job is None, _finished(self.job)
        if not first and job.get("attempt") != self.job.get("attempt"):
            # A requeued job starts its output over: follow the new attempt from its first byte.
            for track in self.tracks.values():
                track.have = track.known = 0
        self.job = job
        ranks = len(job.get("allocation") or ())
        if self.view.rank is not None and ranks and self.view.rank >= ranks:
            raise ClientError(LocalError.NO_SUCH_RANK,
                              f"job {self.job_id} has {ranks} rank(s), numbered from 0: no rank {self.view.rank}")
        for out in job.get("outputs", ()):
            track = self._track(out["rank"], out["stream"])
            if track is not None:
                track.known = max(track.known, out["size"])
                if first and self.view.from_now:
                    track.have = track.known
        if _finished(job) and not was_finished:
            # The final sizes are in; each stream is done once a FETCH confirms the master holds them.
            for track in self.tracks.values():
                track.confirmed = False

    # -- requests (each a single try: a miss is retried at the next turn) ------------------------

    def _ask(self, msg_type: MsgType, **fields) -> protocol.Message:
        """One try of a request, waiting at most CHECK_INTERVAL (MasterUnreachable otherwise)."""
        return self.client._request(msg_type, timeout=CHECK_INTERVAL, **fields)

    def _learn_pub_port(self) -> None:
        """Ask the master for its PUB port, then subscribe."""
        self.client._learn_pub_port(CHECK_INTERVAL)
        self._subscribe()

    def _subscribe(self) -> None:
        """Subscribe to the job's topics on the master's PUB socket (ZeroMQ reconnects it by itself)."""
        import zmq

        self.sub = self.client._subscriber(protocol.job_prefix(self.job_id))
        self.poller.register(self.sub, zmq.POLLIN)

    def _check(self) -> None:
        """Ask the master for the job: the snapshot at the start, then whenever nothing came for a while."""
        # read_output: the master answers only the job's owner or an admin, as for its output.
        self._absorb(self._ask(MsgType.JOB, job_id=self.job_id, read_output=True).body["job"])

    def _fetch(self, track: Track) -> None:
        """FETCH the track's next bytes; when the master has none yet, try again a little later."""
        reply = self._ask(MsgType.FETCH, job_id=self.job_id, rank=track.rank, stream=track.stream,
                          offset=track.have)
        if self.view.live or not track.confirmed:
            # A dump stops at the size the master first reports; a live view grows with the job.
            track.known = max(track.known, reply.body["size"])
        track.confirmed = True
        data = reply.payload[0] if reply.payload else b""
        self._write(track, reply.body.get("offset", track.have), data)
        if not data and track.have < track.known:
            self._starved(track)

    def _starved(self, track: Track) -> None:
        """The master answers but does not hold the bytes yet: wait for them, within the patience."""
        now = time.monotonic()
        track.retry_at = now + STALL_RETRY
        if self.stalled_since is None:
            self.stalled_since = now
        elif now - self.stalled_since >= self.limits.patience:
            raise ClientError(LocalError.INCOMPLETE,
                              f"job {self.job_id}: after {self.limits.patience:g} s the master still holds only "
                              f"{track.have} of the {track.known} bytes of rank {track.rank}'s {track.stream}")

    def _next(self):
        """The next request and when it is due: ``(monotonic time, callable)``, or None."""
        if self.view.live and self.sub is None:
            return 0.0, self._learn_pub_port      # subscribe before the snapshot: nothing falls between
        if self.job is None:
            return 0.0, self._check
        plans = [(track.retry_at, partial(self._fetch, track)) for track in self._open_tracks() if track.wanted]
        if self.view.live:
            plans.append((self.last_news + CHECK_INTERVAL, self._check))
        return min(plans, key=lambda plan: plan[0]) if plans else None

    def _missed(self) -> None:
        """Count one unanswered request; give up after too many in a row."""
        self.misses += 1
        if self.misses >= self.limits.max_consecutive_timeouts:
            raise MasterUnreachable(
                f"lost contact with the zmgpu master at {self.client.address}: {self.misses} requests in a row "
                f"went unanswered; job {self.job_id} was left as it is")

    # -- published messages -----------------------------------------------------------------------

    def _on_output(self, msg: protocol.Message) -> None:
        """A published chunk: note how far the stream reaches, and write it if it follows on."""
        body = msg.body
        track = self._track(body["rank"], body["stream"]) if body["job_id"] == self.job_id else None
        if track is None:
            return
        data = msg.payload[0]
        track.known = max(track.known, body["offset"] + len(data))
        if self._is_open(track):
            self._write(track, body["offset"], data)

    def _on_job_state(self, msg: protocol.Message) -> None:
        """A state change: the dict carries the sizes, final once the job has ended."""
        if msg.body["job_id"] == self.job_id:
            self._absorb(msg.body)

    def _receive(self) -> None:
        """Handle what the PUB socket has queued, up to a batch; anything malformed is dropped."""
        for msg in published(self.sub, SUB_BATCH):
            handler = self.handlers.get(msg.type)
            if handler is not None:
                handler(msg)
        self.last_news = time.monotonic()

    # -- signals and deadlines --------------------------------------------------------------------

    def _on_ctrl_c(self) -> None:
        """Ctrl-C: the caller decides whether to keep following."""
        if self.on_interrupt is None:
            raise KeyboardInterrupt
        self.interrupts += 1
        if not self.on_interrupt(self.job_id, self.interrupts):
            raise Detached(LocalError.INTERRUPTED, f"stopped watching job {self.job_id}, which was left as it "
                                                   f"is (zmgpu queue shows it)")

    def _on_quit(self) -> None:
        """Ctrl-\\: detach, leaving the job running."""
        if self.detach_on_quit:
            raise Detached(LocalError.DETACHED, reattach_hint(self.job_id))

    def _pending(self) -> bool:
        """The job is known to be waiting in the queue."""
        return self.job is not None and self.job["state"] == JobState.PENDING.value

    def _enforce_limits(self, now: float) -> None:
        """Detach at the session timeout; cancel a job pending past the longest wait."""
        limits = self.limits
        if now >= limits.session_deadline:
            raise Detached(LocalError.SESSION_TIMEOUT,
                           f"session timeout ({limits.session_timeout:g} s): {reattach_hint(self.job_id)}")
        if self._pending() and now >= limits.wait_deadline:
            self.client.cancel(self.job_id)
            reason = f" ({self.job['reason']})" if self.job.get("reason") else ""
            raise ClientError(LocalError.WAIT_TIMEOUT,
                              f"job {self.job_id} was still pending after {limits.max_wait_time:g} s"
                              f"{reason}: cancelled it")

    # -- the loop ---------------------------------------------------------------------------------

    def _done(self) -> bool:
        """The view is complete: for a live one, the job has ended and every byte is written."""
        if self.job is None or (self.view.live and not _finished(self.job)):
            return False
        return all(self._settled(track) for track in self.tracks.values())

    def run(self) -> dict:
        """Follow until the view is complete; return the job's latest dict."""
        import zmq

        self.poller = zmq.Poller()
        if self.trap is not None:
            self.poller.register(self.trap.fileno(), zmq.POLLIN)
        try:
            if self.view.live and self.client.pub_port is not None:
                self._subscribe()
            while not self._done():
                self._turn()
            return self.job
        finally:
            if self.sub is not None:
                self.sub.close()

    def _turn(self) -> None:
        """Wait for a message, a signal or the next due request; then make that request once."""
        now = time.monotonic()
        self._enforce_limits(now)
        plan = self._next()
        wake = min(plan[0] if plan else math.inf, self.limits.session_deadline,
                   self.limits.wait_deadline if self._pending() else math.inf)
        timeout = None if wake == math.inf else max(0, math.ceil((wake - now) * 1000))
        events = dict(self.poller.poll(timeout))
        if self.trap is not None and self.trap.fileno() in events:
            for signum in sorted(self.trap.fired()):
                handler = self.signal_handlers.get(signum)
                if handler is not None:
                    handler()
        if self.sub is not None and self.sub in events:
            self._receive()
        plan = self._next()
        if plan is None or plan[0] > time.monotonic() or self._done():
            return
        try:
            plan[1]()
        except MasterUnreachable:
            # The request goes again at the next turn, on a fresh socket: one try a second.
            self._missed()
            return
        self.misses = 0
        self.last_news = time.monotonic()
