"""Many simulated node agents in one process, for the scale benchmark: one DEALER socket per node.

``python -m bench.loadgen --port P --nodes N --gpus G`` connects N sockets to
the master, each with its node id as routing id.  Each fake node registers
with G simulated GPUs, heartbeats every interval (the nodes spread evenly over
it), answers a DISPATCH at once with JOB_STARTED, and holds the job until a
command ends it (a KILL ends it too).  No process is ever started.

Commands arrive as JSON lines on stdin; each is answered by one JSON line on
stdout once done or past its ``timeout`` (seconds, default 60):

- ``{"cmd": "register"}``: ``{"registered": n, "seconds": s}`` once every node has its REGISTERED.
- ``{"cmd": "fill", "count": n}``: ``{"running": n, "seconds": s}`` once ``n`` jobs run here.
- ``{"cmd": "churn", "count": k, "timeout": t, "budget": b}``: ends the oldest job up to ``k`` times
  (none started after ``b`` seconds), each time timing how long until the next DISPATCH arrives:
  ``{"samples": [s, ...], "timed_out": bool}``.
- ``{"cmd": "end", "count": k}``: ends the ``k`` oldest jobs at once: ``{"ended": n}``, waiting for nothing.
- ``{"cmd": "stats"}``: counters (dispatches, reregisters, kills, refusals, heartbeats sent, jobs
  running, nodes that were told to register again).
"""

from __future__ import annotations

import argparse
import collections
import heapq
import json
import sys
import time

import zmq

from zmgpu import protocol
from zmgpu.model import GpuInfo
from zmgpu.protocol import MsgType


class FakeNode:
    """One simulated node agent: its socket and the job ranks it holds (key -> attempt)."""

    def __init__(self, ctx: zmq.Context, endpoint: str, node_id: str, gpus: int):
        self.node_id = node_id
        self.gpus = [GpuInfo(i, "Simulated GPU", f"GPU-sim-{node_id}-{i}", 81920, simulated=True).to_dict()
                     for i in range(gpus)]
        self.jobs: dict[tuple[str, int], int] = {}
        self.registered = False
        self.beats = 0      # heartbeats sent: each moves every GPU's telemetry from the last
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, node_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, msg_type: MsgType, body: dict) -> None:
        self.sock.send_multipart(protocol.encode(msg_type, body))

    def register(self) -> None:
        jobs = [{"job_id": job_id, "rank": rank, "attempt": attempt}
                for (job_id, rank), attempt in self.jobs.items()]
        self.send(MsgType.REGISTER, {"node_id": self.node_id, "hostname": "loadgen", "address": "127.0.0.1",
                                     "gpus": self.gpus, "jobs": jobs})

    def telemetry(self) -> dict:
        """A heartbeat as a busy node sends it: every GPU's memory, utilization and temperature moved
        past the dead band since this node's last one (the worst case for the master; idle nodes send
        nothing)."""
        self.beats += 1
        beat = self.beats
        return {"gpus": {str(g["index"]): {"used_mb": 1000 + (beat * 97) % 60000, "utilization": (beat * 7) % 100,
                                           "temperature": 40 + (beat * 3) % 30} for g in self.gpus}}

    def end(self, key: tuple[str, int], signal: int | None = None) -> None:
        """Report one held rank as ended (exit 0, or killed by ``signal``)."""
        attempt = self.jobs.pop(key)
        self.send(MsgType.JOB_ENDED, {"job_id": key[0], "rank": key[1], "attempt": attempt,
                                      "exit_code": None if signal else 0, "signal": signal, "reason": None,
                                      "sizes": {"stdout": 0, "stderr": 0}})


class Command:
    """A command in progress: it may react to dispatches and answers once ``result`` returns a dict."""

    def __init__(self, gen: "LoadGenerator", body: dict):
        self.gen = gen
        self.body = body
        self.started = time.perf_counter()
        self.deadline = time.monotonic() + float(body.get("timeout", 60))

    def on_dispatch(self, now: float) -> None:
        """A DISPATCH just arrived."""

    def result(self) -> dict | None:
        raise NotImplementedError

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


class Register(Command):
    """Every node registers; done when each has its REGISTERED."""

    def __init__(self, gen: "LoadGenerator", body: dict):
        super().__init__(gen, body)
        for node in gen.nodes:
            node.register()

    def result(self) -> dict | None:
        count = sum(node.registered for node in self.gen.nodes)
        if count == len(self.gen.nodes) or time.monotonic() > self.deadline:
            return {"registered": count, "seconds": self.seconds}
        return None


class Fill(Command):
    """Done when ``count`` jobs run on the fake nodes."""

    def result(self) -> dict | None:
        running = self.gen.running_count()
        if running >= self.body["count"] or time.monotonic() > self.deadline:
            return {"running": running, "seconds": self.seconds}
        return None


class Churn(Command):
    """End the oldest job, time until the next DISPATCH, ``count`` times.

    ``timeout`` bounds each sample; no new sample starts after ``budget`` seconds.
    """

    def __init__(self, gen: "LoadGenerator", body: dict):
        super().__init__(gen, body)
        self.timeout = float(body.get("timeout", 60))
        self.budget = float(body.get("budget", self.timeout * body["count"]))
        self.samples: list[float] = []
        self.ended_at: float | None = None
        self._end_one()

    def _end_one(self) -> None:
        wanted = len(self.samples) < self.body["count"] and self.seconds < self.budget
        if wanted and self.gen.end_oldest():
            self.ended_at = time.perf_counter()
            self.deadline = time.monotonic() + self.timeout
        else:
            self.ended_at = None

    def on_dispatch(self, now: float) -> None:
        if self.ended_at is not None:
            self.samples.append(now - self.ended_at)
            self._end_one()

    def result(self) -> dict | None:
        timed_out = self.ended_at is not None and time.monotonic() > self.deadline
        if self.ended_at is None or timed_out:
            return {"samples": self.samples, "timed_out": timed_out}
        return None


class End(Command):
    """End the ``count`` oldest jobs at once; what the master makes of it is the caller's to see."""

    def __init__(self, gen: "LoadGenerator", body: dict):
        super().__init__(gen, body)
        self.ended = sum(gen.end_oldest() for _ in range(body["count"]))

    def result(self) -> dict | None:
        return {"ended": self.ended}


class Stats(Command):
    """The counters, at once."""

    def result(self) -> dict | None:
        return {**self.gen.counts, "running": self.gen.running_count(), "declared_dead": len(self.gen.declared_dead)}


COMMANDS = {"register": Register, "fill": Fill, "churn": Churn, "end": End, "stats": Stats}


class LoadGenerator:
    """The fake nodes, their heartbeats, and the command being served."""

    def __init__(self, endpoint: str, nodes: int, gpus: int, interval: float):
        self.ctx = zmq.Context()
        self.ctx.set(zmq.MAX_SOCKETS, nodes + 64)
        self.nodes = [FakeNode(self.ctx, endpoint, f"sim{i:05d}", gpus) for i in range(nodes)]
        self.by_sock = {node.sock: node for node in self.nodes}
        self.interval = interval
        start = time.monotonic()
        # (due, node index): a heap, so each turn touches only the nodes whose heartbeat is due.
        self.heartbeats = [(start + interval * i / nodes, i) for i in range(nodes)]
        self.oldest: collections.deque = collections.deque()   # (node, key) in dispatch order
        self.counts = collections.Counter()
        self.declared_dead: set[str] = set()   # nodes that were told to register again
        self.command: Command | None = None
        self.poller = zmq.Poller()
        for node in self.nodes:
            self.poller.register(node.sock, zmq.POLLIN)
        self.poller.register(sys.stdin.fileno(), zmq.POLLIN)
        self.handlers = {MsgType.REGISTERED: self._on_registered, MsgType.HEARTBEAT: self._ignore,
                         MsgType.RESEND: self._ignore, MsgType.REREGISTER: self._on_reregister,
                         MsgType.DISPATCH: self._on_dispatch, MsgType.KILL: self._on_kill,
                         MsgType.REFUSED: self._on_refused}

    def running_count(self) -> int:
        return sum(len(node.jobs) for node in self.nodes)

    def end_oldest(self) -> bool:
        """End the longest-held job still held; False when none is."""
        while self.oldest:
            node, key = self.oldest.popleft()
            if key in node.jobs:
                node.end(key)
                return True
        return False

    # -- master messages ------------------------------------------------------------------------

    def _ignore(self, node: FakeNode, body: dict, now: float) -> None:
        """Nothing to do (master heartbeats; no output is ever sent, so nothing to resend)."""

    def _on_registered(self, node: FakeNode, body: dict, now: float) -> None:
        """The master accepted a registration."""
        node.registered = True

    def _on_reregister(self, node: FakeNode, body: dict, now: float) -> None:
        """The master thinks this node dead: register again, with the jobs it holds."""
        self.counts["reregisters"] += 1
        self.declared_dead.add(node.node_id)
        node.register()

    def _on_refused(self, node: FakeNode, body: dict, now: float) -> None:
        """The master refused a registration."""
        self.counts["refused"] += 1

    def _on_dispatch(self, node: FakeNode, body: dict, now: float) -> None:
        """Start the rank at once (no process) and hold it."""
        key = (body["job_id"], body["rank"])
        attempt = body.get("attempt", 0)
        node.jobs[key] = attempt
        self.oldest.append((node, key))
        self.counts["dispatches"] += 1
        node.send(MsgType.JOB_STARTED, {"job_id": key[0], "rank": key[1], "pid": 100000 + self.counts["dispatches"],
                                        "attempt": attempt})
        if self.command is not None:
            self.command.on_dispatch(now)

    def _on_kill(self, node: FakeNode, body: dict, now: float) -> None:
        """Stop every held rank of the job, as SIGTERM would."""
        self.counts["kills"] += 1
        for key in [k for k in node.jobs if k[0] == body["job_id"]]:
            node.end(key, signal=15)

    # -- loop -------------------------------------------------------------------------------------

    def _receive(self, node: FakeNode) -> None:
        while True:
            try:
                frames = node.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            now = time.perf_counter()
            try:
                msg = protocol.decode(frames)
            except protocol.ProtocolError:
                self.counts["bad_messages"] += 1
                continue
            handler = self.handlers.get(msg.type)
            if handler is not None:
                handler(node, msg.body, now)

    def _heartbeat(self, now: float) -> None:
        while self.heartbeats and self.heartbeats[0][0] <= now:
            _, index = heapq.heappop(self.heartbeats)
            node = self.nodes[index]
            if node.registered:
                node.send(MsgType.HEARTBEAT, node.telemetry())
                self.counts["heartbeats"] += 1
            heapq.heappush(self.heartbeats, (now + self.interval, index))

    def _read_command(self) -> bool:
        """Start the command on stdin; False at end of input."""
        line = sys.stdin.readline()
        if not line:
            return False
        body = json.loads(line)
        self.command = COMMANDS[body["cmd"]](self, body)
        return True

    def run(self) -> None:
        while True:
            timeout = max(0.0, self.heartbeats[0][0] - time.monotonic()) if self.heartbeats else 0.1
            events = dict(self.poller.poll(int(min(timeout, 0.05) * 1000) + 1))
            for sock in events:
                node = self.by_sock.get(sock)
                if node is not None:
                    self._receive(node)
            if sys.stdin.fileno() in events and self.command is None and not self._read_command():
                return
            self._heartbeat(time.monotonic())
            if self.command is not None:
                answer = self.command.result()
                if answer is not None:
                    print(json.dumps(answer), flush=True)
                    self.command = None

    def close(self) -> None:
        for node in self.nodes:
            node.sock.close(0)
        self.ctx.term()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="the master's ROUTER port on 127.0.0.1")
    parser.add_argument("--nodes", type=int, default=1000, help="simulated nodes (default 1000)")
    parser.add_argument("--gpus", type=int, default=8, help="simulated GPUs per node (default 8)")
    parser.add_argument("--heartbeat-interval", type=float, default=1.0, help="seconds (default 1)")
    args = parser.parse_args(argv)
    gen = LoadGenerator(f"tcp://127.0.0.1:{args.port}", args.nodes, args.gpus, args.heartbeat_interval)
    try:
        gen.run()
    finally:
        gen.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
