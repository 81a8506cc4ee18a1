"""Property-based fuzzing of the message handlers of a live master and a live node agent.

Random frames (random bytes, and messages of every type with random bodies whose fields have random
types) go to the real master's ROUTER port from a client, and from a node it knows; and to a real
node agent from the ROUTER it connects to.  Properties: the daemons stay up, nothing they hold
changes, and a client request gets exactly one reply, an error with a known code when the request
is bad.  No random message may start a job: a submitted job always asks for more GPUs than exist or
is malformed, and a DISPATCH never carries a string command.

The ROUTER the node agent connects to in the last test is a stand-in for the master, used only to
put arbitrary frames in front of the agent's handlers; every other message it sends is what a
master sends.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import HEARTBEAT, Cluster, make_cluster, poll
from helpers import wait_for_file_sh
from zmgpu.config import NodeConfig
from zmgpu.node.agent import Agent
from zmgpu.node.gpus import SimulatedSource
from zmgpu.node.keeper_link import spool_file
from zmgpu.node.runner import RankKey, spool_keys
from zmgpu.node.sweep import JobProcesses
from zmgpu.node.telemetry import Policy, Telemetry
from zmgpu.model import has_type
from zmgpu.protocol import (GPU_REPORT, MAGIC, REQUIRED, ErrorCode, Message, MsgType, ProtocolError, Stream, decode,
                            encode)

REPLY_TIMEOUT = 10
ERROR_CODES = {code.value for code in ErrorCode}
CLIENT_TYPES = (MsgType.PING, MsgType.SUBMIT, MsgType.QUEUE, MsgType.JOB, MsgType.CANCEL, MsgType.FETCH,
                MsgType.NODES, MsgType.DRAIN, MsgType.RESUME)
NODE_TYPES = (MsgType.REGISTER, MsgType.HEARTBEAT, MsgType.JOB_STARTED, MsgType.OUTPUT, MsgType.JOB_ENDED)
MASTER_TYPES = (MsgType.REGISTERED, MsgType.HEARTBEAT, MsgType.REREGISTER, MsgType.DISPATCH, MsgType.KILL,
                MsgType.RESEND, MsgType.REFUSED)
#: Optional body fields the handlers read, worth giving random values too.
OPTIONAL = {
    MsgType.QUEUE: ("all", "owner", "states", "job_ids", "nodes", "collapse", "fields"),
    MsgType.REGISTER: ("instance", "previous_instance", "telemetry", "gpu_policy"),
    MsgType.HEARTBEAT: ("gpus",),
    MsgType.JOB_STARTED: ("attempt", "master_port"), MsgType.OUTPUT: ("attempt",),
    MsgType.JOB_ENDED: ("attempt", "refused", "dirty_gpus", "peak_gpu_mem_mb"),
    MsgType.DISPATCH: ("attempt", "launch", "gpu_mem_mb"), MsgType.KILL: ("attempt",),
}
#: More GPUs than any test cluster has: a SUBMIT that passes every other check is still refused.
TOO_MANY_GPUS = 10 ** 6

# -- strategies ------------------------------------------------------------------------------------

INTS = st.integers(-(2 ** 70), 2 ** 70)
LEAVES = st.none() | st.booleans() | INTS | st.floats() | st.text(max_size=16)
JSON = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
NOT_A_STRING = JSON.filter(lambda value: not isinstance(value, str))
SMALL = st.integers(-2, 5)
_TYPED = {str: st.text(max_size=16), int: INTS | SMALL, float: st.floats(), bool: st.booleans(),
          dict: st.dictionaries(st.text(max_size=8), JSON, max_size=4), list: st.lists(JSON, max_size=4),
          type(None): st.none()}


def typed(kind) -> st.SearchStrategy:
    """Values of the type(s) a REQUIRED entry names."""
    return st.one_of(*(_TYPED[k] for k in (kind if isinstance(kind, tuple) else (kind,))))


@st.composite
def bodies(draw, msg_type: MsgType, fields: dict) -> dict:
    """A body for ``msg_type``: its required fields of their types (so the handler runs), or in half of
    the bodies each of any type or missing; optional fields now and then; random extra keys.
    ``fields`` pins a field's strategy, whatever is drawn."""
    body = draw(st.dictionaries(st.text(max_size=8), JSON, max_size=2))
    for name in OPTIONAL.get(msg_type, ()):
        if draw(st.booleans()):
            body[name] = draw(fields.get(name, JSON | SMALL))
    mangled = draw(st.booleans())
    for name, kind in REQUIRED[msg_type].items():
        how = draw(st.sampled_from(["typed", "typed", "any", "missing"])) if mangled else "typed"
        if how != "missing":
            body[name] = draw(fields[name] if name in fields else typed(kind) if how == "typed" else JSON)
    return body


def messages(types, fields: dict) -> st.SearchStrategy:
    """Well-framed messages of ``types`` with random bodies (and a random payload frame or two)."""
    return st.one_of(*(st.builds(lambda body, payload, t=msg_type: encode(t, body, *payload),
                                 bodies(msg_type, fields), st.lists(st.binary(max_size=32), max_size=2))
                       for msg_type in types))


def fuzz(strategy: st.SearchStrategy, check, examples: int = 200) -> None:
    """Call ``check`` with ``examples`` values drawn from ``strategy``, the same ones on every run
    (a failure shrinks to a small example, which the report shows)."""
    run = settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(given(strategy)(check))
    run()


#: Frames of every shape: random bytes, a magic and a type (real or not) before random bytes, JSON
#: that is not an object, and whole messages.
RAW = st.lists(st.binary(max_size=48), min_size=1, max_size=5)
ALMOST = st.builds(lambda kind, body: [MAGIC, kind, body],
                   st.sampled_from([t.value for t in MsgType]) | st.binary(max_size=12),
                   st.binary(max_size=48) | JSON.map(lambda v: json.dumps(v).encode()))


#: The one GPU a fuzzing node registers with, so that its GPU reports are read, not skipped.
FUZZ_GPU = {"index": 0, "name": "fuzz", "uuid": "fuzz-0", "memory_mb": 1000}


def gpu_reports() -> st.SearchStrategy:
    """HEARTBEAT "gpus": known and unknown GPU indices, each with known fields of any value, or junk."""
    fields = st.dictionaries(st.sampled_from([*GPU_REPORT, "other"]), JSON | SMALL, min_size=1, max_size=5)
    return st.dictionaries(st.sampled_from(["0", "0", "1", "x"]), fields | JSON, min_size=1, max_size=3) | JSON


def harmless_jobs() -> st.SearchStrategy:
    """SUBMIT job specs with every field random, but never one that could run: its command is empty
    or not a string, or it asks for more GPUs than exist (a valid count) or an invalid count."""
    runnable_command = st.sampled_from(["true", "echo fuzz"])
    spec = st.fixed_dictionaries({}, optional={
        "cwd": st.sampled_from(["/tmp", "relative"]) | JSON, "env": JSON | st.just({}),
        "node_gpu_ids": st.sampled_from(["n1:0", "n1:0,1;n2:0", "::;", "ghost:1"]) | JSON,
        "array": st.sampled_from(["0-3", "0-99%8", "1,5", "bad"]) | JSON,
        "after": st.lists(st.text(max_size=10), max_size=2) | JSON, "priority": SMALL | JSON,
        "time_limit": SMALL | JSON, "name": JSON, "interactive": JSON, "requeue": JSON,
    })
    # Any count a node could hold (a missing one means 0) would make a job with a command runnable.
    no_count = JSON.filter(lambda v: not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < TOO_MANY_GPUS))
    unrunnable = st.one_of(
        st.fixed_dictionaries({"command": st.sampled_from(["", "  "]) | NOT_A_STRING, "gpus": SMALL | JSON}),
        st.fixed_dictionaries({"command": runnable_command, "gpus": st.just(TOO_MANY_GPUS) | no_count}),
    )
    return st.builds(lambda fields, pinned: {**fields, **pinned}, spec, unrunnable)


# -- a master with jobs of every kind --------------------------------------------------------------

@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """A master and node n1 (two GPUs) holding a finished, a running and a pending job; and their ids."""
    workdir = tmp_path_factory.mktemp("fuzz-work")
    # Patient with silent nodes, so n1 (whose state is compared) stays as it is on a loaded machine,
    # and the fuzzing nodes, which send no heartbeats, stay registered.
    patient = ("--node-timeout", "60", "--node-dead-timeout", "60")
    for cluster in make_cluster(tmp_path_factory.mktemp("fuzz"), {"n1": 2}, master_args=patient):
        done = cluster.submit("echo done", cwd=workdir)
        cluster.wait_job_state(done, "COMPLETED")
        held = cluster.submit(wait_for_file_sh("release"), "--node-gpu-ids", "n1:0", cwd=workdir)
        cluster.wait_job_state(held, "RUNNING")
        # Pinned behind the held job, so it can go nowhere else (a fuzzed node has no claim on it).
        pending = cluster.submit("echo later", "--node-gpu-ids", "n1:0", cwd=workdir)
        poll(lambda: cluster.job(pending)["reason"], 10, "the pending job's wait reason")
        yield cluster, [done, held, pending]
        (workdir / "release").touch()


def snapshot(cluster: Cluster) -> dict:
    """Every job the master holds, and node n1 without its ever-changing last-seen time."""
    listing = cluster.queue_json()
    n1 = next(n for n in listing["nodes"] if n["node_id"] == "n1")
    return {"jobs": {job["job_id"]: job for job in listing["jobs"]},
            "n1": {key: value for key, value in n1.items() if key != "last_seen"}}


class Prober:
    """A DEALER on the master's port that sends frames, then a PING, and returns what came back
    before the PING's answer: everything the master sent in reply to the frames."""

    SENTINEL = 2 ** 80   # beyond any request number a strategy draws

    def __init__(self, cluster: Cluster, identity: bytes):
        self.sock = cluster.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        self.sock.connect(f"tcp://127.0.0.1:{cluster.port}")
        self.sent = 0

    def exchange(self, frames: list[bytes]) -> list[Message]:
        self.sent += 1
        req = self.SENTINEL + self.sent
        self.sock.send_multipart(frames)
        self.sock.send_multipart(encode(MsgType.PING, {"user": "fuzzer", "req": req}))
        before = []
        while self.sock.poll(REPLY_TIMEOUT * 1000):
            msg = decode(self.sock.recv_multipart())
            if msg.type is MsgType.REPLY and msg.body.get("req") == req:
                assert msg.body["ok"], msg.body
                return before
            before.append(msg)
        raise AssertionError(f"the master did not answer a PING within {REPLY_TIMEOUT} s after {frames!r}")

    def close(self) -> None:
        self.sock.close()


def expected_answer(frames: list[bytes]):
    """What the master owes a client for ``frames``: an error code (decoding fails, or a type the
    master does not accept), "REPLY" (a request: one reply, success or typed error), None (node traffic)."""
    try:
        msg = decode(frames)
    except ProtocolError as exc:
        return exc.code.value
    if msg.type in CLIENT_TYPES:
        return "REPLY"
    if msg.type in NODE_TYPES:
        return None
    return ErrorCode.UNKNOWN_TYPE.value


def check_reply(frames: list[bytes], back: list[Message]) -> None:
    """Node traffic gets no reply; anything else exactly one: a request's echoes its number, and an
    error carries a known code (the one decoding names, for what is not a request) and a sentence."""
    replies = [m.body for m in back if m.type is MsgType.REPLY]
    due = expected_answer(frames)
    if due is None:
        assert replies == [], (frames, replies)
        return
    assert len(replies) == 1, (frames, replies)
    reply = replies[0]
    if due == "REPLY":
        msg = decode(frames)
        assert reply["req"] == msg.body["req"], (frames, reply)
        # No fuzzed submit is runnable, so none may be acknowledged.
        assert not (reply["ok"] and msg.type is MsgType.SUBMIT), (frames, reply)
    else:
        assert (reply["ok"], reply["error"]) == (False, due), (frames, reply)
    if not reply["ok"]:
        assert reply["error"] in ERROR_CODES and isinstance(reply["message"], str) and reply["message"], reply
        # INTERNAL means a handler failed on input it should have refused as BAD_REQUEST.
        assert reply["error"] != ErrorCode.INTERNAL.value, (frames, reply)


def client_fields(job_ids) -> dict:
    """Field strategies for requests: existing job ids as often as not, values near the edges."""
    return {"job": harmless_jobs(), "job_id": st.sampled_from(job_ids) | st.text(max_size=10),
            "stream": st.sampled_from(["stdout", "stderr", "stdin"]), "rank": SMALL | INTS,
            "offset": SMALL | INTS, "node_id": st.sampled_from(["n1", "ghost"]),
            "job_ids": st.lists(st.text(max_size=10) | JSON, max_size=3) | JSON,
            "states": st.lists(st.sampled_from(["PENDING", "RUNNING"]) | JSON, min_size=1, max_size=3)}


def fuzz_master(cluster: Cluster, identity: bytes, strategy: st.SearchStrategy, check, examples: int) -> None:
    """Fuzz the master from a DEALER named ``identity``; its jobs and node n1 must not change."""
    before = snapshot(cluster)
    prober = Prober(cluster, identity)

    def one(frames):
        check(frames, prober.exchange(frames))
        assert cluster.master.alive()

    try:
        fuzz(strategy, one, examples)
    finally:
        prober.close()
    assert snapshot(cluster) == before


@pytest.mark.parametrize("msg_type", CLIENT_TYPES, ids=lambda t: t.name)
def test_master_answers_random_requests_and_keeps_its_state(seeded, msg_type):
    cluster, job_ids = seeded
    fuzz_master(cluster, b"fuzz-client", messages((msg_type,), client_fields(job_ids)), check_reply, 40)


def test_master_answers_random_frames_and_keeps_its_state(seeded):
    cluster, job_ids = seeded
    others = messages(NODE_TYPES + MASTER_TYPES + (MsgType.REPLY, MsgType.JOB_STATE, MsgType.NODE_STATE),
                      client_fields(job_ids))
    fuzz_master(cluster, b"fuzz-client", st.one_of(RAW, ALMOST, others), check_reply, 200)


def no_reply(frames: list[bytes], back: list[Message]) -> None:
    """Node traffic is never answered with a REPLY: a bad message is only logged."""
    assert [m.body for m in back if m.type is MsgType.REPLY] == [], (frames, back)


@pytest.mark.parametrize("msg_type", NODE_TYPES, ids=lambda t: t.name)
def test_master_ignores_random_traffic_from_a_node_and_keeps_its_state(seeded, msg_type):
    cluster, job_ids = seeded
    # A node of this test's own: a fuzzed REGISTER may leave it owned by an agent "instance" of its choosing.
    node_id = f"fz-{msg_type.name.lower()}"
    joining = Prober(cluster, node_id.encode())
    try:
        welcome = joining.exchange(encode(MsgType.REGISTER, {"node_id": node_id, "hostname": "fz", "address": "fz",
                                                             "gpus": [FUZZ_GPU], "jobs": []}))
    finally:
        joining.close()
    assert [m.type for m in welcome] == [MsgType.REGISTERED], welcome
    gpu = st.fixed_dictionaries({"index": SMALL, "name": st.text(max_size=6), "uuid": st.text(max_size=6),
                                 "memory_mb": SMALL}) | JSON
    # Reports about the real jobs, which this node does not run.
    report = st.fixed_dictionaries({"job_id": st.sampled_from(job_ids), "rank": SMALL},
                                   optional={"attempt": SMALL | JSON, "ended": JSON, "exit_code": JSON,
                                             "sizes": JSON}) | JSON
    fields = {"job_id": st.sampled_from(job_ids) | st.text(max_size=10), "rank": SMALL | INTS,
              "offset": SMALL | INTS, "stream": st.sampled_from(["stdout", "stderr", "stdin"]) | JSON,
              "node_id": st.sampled_from([node_id, "n1"]) | st.text(max_size=6),
              # A REGISTER's GPU list, or a HEARTBEAT's report on them (index -> fields, anything at all).
              "gpus": gpu_reports() if msg_type is MsgType.HEARTBEAT else st.lists(gpu, max_size=3),
              "jobs": st.lists(report, max_size=3), "sizes": st.dictionaries(
                  st.sampled_from(["stdout", "stderr", "x"]), SMALL | INTS | JSON, max_size=3) | JSON}
    reports = messages((msg_type,), fields)
    if msg_type is MsgType.HEARTBEAT:
        # Every heartbeat with a GPU report, most of them about the GPU the node has.
        reports = reports | st.builds(lambda report: encode(MsgType.HEARTBEAT, {"gpus": report}), gpu_reports())
    fuzz_master(cluster, node_id.encode(), st.one_of(RAW, ALMOST, reports, reports, reports), no_reply, 60)
    # What the allocator does arithmetic on kept its type, whatever the reports held.
    gpus = cluster.node(node_id)["gpus"]
    for gpu in gpus:
        assert all(has_type(gpu[key], kind) for key, kind in GPU_REPORT.items() if key in gpu), gpu
    if msg_type is MsgType.HEARTBEAT:
        # ...and some reports were taken in at all: a check that kept nothing would pass the one above.
        assert gpus and any(key in gpu for gpu in gpus for key in GPU_REPORT), gpus


# -- a node agent in front of random frames ----------------------------------------------------------

HELD_JOB = "0badc0de"
HELD_KEY = RankKey(HELD_JOB, 0, 0)
HELD_OUTPUT = b"hello\nbye\n"


@pytest.fixture
def agent(tmp_path):
    """A real node agent, in this process, that a master accepted and gave one held job.

    Frames "from its master" go straight into its dispatcher; it has no socket, so it
    never reconnects or answers, and what it would report is read from its own state.
    """
    config = NodeConfig(node_id="fz1", state_dir=str(tmp_path / "node"), single_user=True)
    os.makedirs(os.path.join(config.state_dir, "jobs"))
    log = logging.getLogger("test.fuzz.agent")
    node = Agent(config, "fz1", Telemetry(SimulatedSource("fz1", count=2), Policy(), log), log)
    node.reconnect_at = math.inf     # no master to reach: the frames under test are all it hears
    node._open_keeper(time.monotonic())
    workdir = tmp_path / "work"
    workdir.mkdir()
    try:
        node._dispatch(encode(MsgType.REGISTERED, {"heartbeat_interval": HEARTBEAT}))
        node._dispatch(encode(MsgType.DISPATCH, {
            "job_id": HELD_JOB, "rank": 0, "attempt": 0, "cwd": str(workdir), "env": dict(os.environ),
            "command": f"echo hello; {wait_for_file_sh('go')}; echo bye", "gpu_indices": [0], "kill_grace": 1,
            "user": "tester", "allow_root": True, "gpu_mem_mb": 100}))
        # Declared by every start of the rank (_spawn), so a rank started again still counts on its GPU.
        assert node.ranks[HELD_KEY].gpu_mem_mb == 100
        spool = HELD_KEY.spool(config.state_dir)
        poll(lambda: turn(node) and os.path.exists(f"{spool}.stdout") and open(f"{spool}.stdout", "rb").read(),
             REPLY_TIMEOUT, "the held job's first line")
        yield node, workdir
    finally:
        JobProcesses(HELD_JOB).kill()
        if node.keeper is not None:
            os.kill(node.keeper.pid, signal.SIGTERM)
            node.keeper.close()
        node.context.term()


def turn(node: Agent) -> bool:
    """One turn of the agent's loop, as after its poller woke (keeper events, reaping, timers)."""
    node._turn(time.monotonic())
    return True


def test_node_agent_survives_random_frames_from_its_master(agent):
    node, workdir = agent
    held = node.ranks[HELD_KEY]
    unknown_job = st.sampled_from(["deadbeef", "0000000a_3", "ffffffff"]) | st.text(max_size=10)
    fields = {
        # A DISPATCH is never valid: whatever else it says, nothing may run.
        "command": NOT_A_STRING,
        "job_id": unknown_job, "rank": SMALL | INTS, "offset": SMALL | INTS, "attempt": SMALL | JSON,
        "stream": st.sampled_from(["stdout", "stderr", "stdin"]) | JSON,
        "heartbeat_interval": st.sampled_from([HEARTBEAT, 0, -1]) | st.floats(),
    }
    # RESEND may name the real job: the agent must then rewind to a sane offset of its true bytes.
    resend = messages((MsgType.RESEND,), {**fields, "job_id": st.just(HELD_JOB), "rank": st.just(0)}) | st.builds(
        lambda stream, offset: encode(MsgType.RESEND, {"job_id": HELD_JOB, "rank": 0, "stream": stream,
                                                       "offset": offset}),
        st.sampled_from(["stdout", "stderr"]), SMALL | INTS)
    runs = [(messages((msg_type,), fields), 40) for msg_type in MASTER_TYPES]
    runs += [(resend, 60), (st.one_of(RAW, ALMOST, messages(CLIENT_TYPES + NODE_TYPES, fields)), 100)]

    def one(frames):
        node._dispatch(frames)
        turn(node)
        # What its next REGISTER would report: the one held rank, still running, and nothing else.
        assert list(node.ranks) == [HELD_KEY] and node.ranks[HELD_KEY] is held and held.running
        assert all(0 <= held.sent[stream] <= held.size(stream) for stream in held.sent), held.sent
        assert not node.stopping
        node._dispatch(encode(MsgType.REGISTERED, {"heartbeat_interval": HEARTBEAT}))   # as a master would

    for strategy, examples in runs:
        fuzz(strategy, one, examples)
    (workdir / "go").touch()
    poll(lambda: turn(node) and held.ended, REPLY_TIMEOUT, "the held job to end")
    assert (held.exit_code, held.signal) == (0, None)
    assert held.read_chunk(Stream.STDOUT, 1 << 20) == HELD_OUTPUT[held.sent[Stream.STDOUT]:]
    with open(spool_file(HELD_KEY.spool(node.config.state_dir), "stdout"), "rb") as fh:
        assert fh.read() == HELD_OUTPUT
    assert spool_keys(node.config.state_dir) == [HELD_KEY]
