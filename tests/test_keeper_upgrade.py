"""An agent upgraded while a keeper of an older zmgpu runs on: it keeps that keeper's ranks, asks it for no new
ones, and lets it go once they have ended.

The older keeper here is a socket that speaks the older keeper's side of the wire (its RANKS answer has no
spool layout): an older zmgpu's code is not part of this one.  The agent is the real one, in this process.
"""

import json
import logging
import math
import os
import socket
import threading
import time

from conftest import HEARTBEAT, poll
from helpers import wait_for_file_sh
from zmgpu.config import NodeConfig
from zmgpu.node.agent import OLD_KEEPER_EXIT, Agent
from zmgpu.node.gpus import SimulatedSource
from zmgpu.node.keeper_link import on_short_path, socket_path
from zmgpu.node.runner import RankKey
from zmgpu.node.sweep import JobProcesses
from zmgpu.node.telemetry import Policy, Telemetry
from zmgpu.protocol import MsgType, encode

ITS_RANK = "0000000e.0.0"     # what the older keeper still runs
JOB = "0000000f"


class OlderKeeper(threading.Thread):
    """Answers HELLO as a keeper before SPOOL_LAYOUT did, then reports its rank's end when told to."""

    def __init__(self, state_dir: str):
        super().__init__(daemon=True)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        on_short_path(socket_path(state_dir), self.listener.bind)
        self.listener.listen(1)
        self.end = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        conn, _ = self.listener.accept()
        with conn, conn.makefile("rb") as lines:
            assert json.loads(lines.readline())["op"] == "hello"
            conn.sendall(json.dumps({"op": "ranks", "pid": os.getpid(), "ranks": {ITS_RANK: 4242}}).encode() + b"\n")
            conn.setblocking(False)
            self.end.wait(30)
            conn.sendall(json.dumps({"op": "exited", "spool": ITS_RANK, "pid": 4242, "exit_code": 0,
                                     "signal": None}).encode() + b"\n")
            self.done.wait(30)    # the link stays open until the test ends: the agent is the one to close it


def test_an_upgraded_agent_starts_ranks_itself_until_the_older_keeper_is_done(tmp_path):
    state_dir = str(tmp_path / "node")
    os.makedirs(os.path.join(state_dir, "jobs"))
    older = OlderKeeper(state_dir)
    older.start()
    log = logging.getLogger("test.upgrade")
    node = Agent(NodeConfig(node_id="up1", state_dir=state_dir, single_user=True), "up1",
                 Telemetry(SimulatedSource("up1", count=1), Policy(), log), log)
    node.reconnect_at = math.inf     # no master: the frames under test are all it hears
    try:
        assert node._open_keeper(time.monotonic()) == {ITS_RANK: 4242} and node.keeper.outdated
        node._dispatch(encode(MsgType.REGISTERED, {"heartbeat_interval": HEARTBEAT}))
        node._dispatch(encode(MsgType.DISPATCH, {
            "job_id": JOB, "rank": 0, "attempt": 0, "cwd": str(tmp_path), "env": dict(os.environ),
            "command": wait_for_file_sh(str(tmp_path / "go")), "gpu_indices": [0], "kill_grace": 1,
            "user": "tester", "allow_root": True}))
        rank = node.ranks[RankKey(JOB, 0, 0)]
        assert rank.proc is not None and not rank.kept and rank.running     # the agent's own child
        older.end.set()
        poll(lambda: node._turn(time.monotonic()) or node.keeper is None, 10, "the agent to let the keeper go")
        assert node.keeper_retry_at > time.monotonic() + OLD_KEEPER_EXIT - 1
        (tmp_path / "go").touch()
        poll(lambda: node._turn(time.monotonic()) or rank.ended, 10, "the agent's own rank to end")
        assert (rank.exit_code, rank.signal) == (0, None)
    finally:
        JobProcesses(JOB).kill()
        older.done.set()
        node.context.term()
        older.listener.close()
