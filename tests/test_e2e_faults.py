"""End to end: failures and bad input.  Killed node agents, a restarted master, impossible requests,
an unreachable master and garbage on the master's port, all against the real daemons and CLI."""

import signal
import socket
import subprocess
import time
from dataclasses import dataclass

import pytest
import zmq

from conftest import FINISHED, NODE_TIMEOUT, one_line_error, pid_alive, poll, written
from helpers import wait_for_file_sh
from zmgpu.protocol import MAGIC, MsgType, decode, encode


def stays(cluster, job_id, state, seconds=1.0):
    """Assert the job remains in ``state`` for a while (an observation window, not a synchronisation)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job = cluster.job(job_id)
        assert job["state"] == state, job
        time.sleep(0.1)


# -- a node agent dies ----------------------------------------------------------------------------

def test_killed_node_fails_its_job_and_its_gpus_stay_unused(fresh_pair, workdir):
    cluster = fresh_pair
    wait = wait_for_file_sh
    blocker = cluster.submit(wait("release.blocker"), "--node-gpu-ids", "n1:0,1,2,3", cwd=workdir)
    victim = cluster.submit(wait("release.victim"), "--node-gpu-ids", "n2:0", cwd=workdir)
    cluster.wait_job_state(blocker, "RUNNING")
    cluster.wait_job_state(victim, "RUNNING")

    cluster.stop(cluster.nodes["n2"], signal.SIGKILL)
    # Within the node timeout, plus a margin for a loaded machine.
    job = cluster.wait_job_state(victim, FINISHED, timeout=NODE_TIMEOUT + 3)
    assert job["state"] == "NODE_FAIL" and job["reason"], job
    cluster.wait_node_state("n2", "DOWN", timeout=2)
    assert cluster.node("n1")["state"] == "UP"

    # n1 is full and n2 is down: a 1-GPU job must wait, not be sent to the dead node.
    anywhere = cluster.submit(wait("release.anywhere"), "--gpus", "1", cwd=workdir)
    pinned = cluster.submit("echo $ZMGPU_NODE_ID $CUDA_VISIBLE_DEVICES > pinned.txt", "--node-gpu-ids", "n2:1",
                            cwd=workdir)
    stays(cluster, anywhere, "PENDING")
    assert cluster.job(pinned)["state"] == "PENDING"

    (workdir / "release.blocker").touch()
    cluster.wait_job_state(blocker, "COMPLETED")
    running = cluster.wait_job_state(anywhere, "RUNNING")
    assert [a["node_id"] for a in running["allocation"]] == ["n1"]
    assert cluster.job(pinned)["state"] == "PENDING"

    cluster.start_node("n2")
    cluster.wait_node_state("n2", "UP")
    done = cluster.wait_job_state(pinned, FINISHED)
    assert done["state"] == "COMPLETED", done
    assert (workdir / "pinned.txt").read_text().split() == ["n2", "1"]
    for name in ("release.anywhere", "release.victim"):
        (workdir / name).touch()
    assert cluster.wait_job_state(anywhere, FINISHED)["state"] == "COMPLETED"
    # The victim stays as it ended: a node coming back does not revive a failed job.
    assert cluster.job(victim)["state"] == "NODE_FAIL"


def test_a_failed_jobs_leftovers_stop_when_the_master_gives_its_node_up(fresh_pair, workdir):
    """A job's process outlives its killed agent only until the master gives the node up: the node's keeper
    stops it by then, so once the job is NODE_FAIL nothing of it runs on a GPU the master hands out again."""
    cluster = fresh_pair
    victim = cluster.submit("echo $$ > victim.pid; " + wait_for_file_sh("release"), "--node-gpu-ids", "n2:0",
                            cwd=workdir)
    cluster.wait_job_state(victim, "RUNNING")
    pid = int(written(workdir / "victim.pid"))
    cluster.stop(cluster.nodes["n2"], signal.SIGKILL)
    assert cluster.wait_job_state(victim, FINISHED, timeout=NODE_TIMEOUT + 5)["state"] == "NODE_FAIL"
    poll(lambda: not pid_alive(pid), 5, "the failed job's leftover process to be stopped")


# -- the master restarts --------------------------------------------------------------------------

@pytest.mark.parametrize("downtime", [0, NODE_TIMEOUT + 1.5], ids=["quick", "past-master-timeout"])
def test_node_registers_again_after_master_restart(bare_cluster, workdir, downtime):
    """A quick restart, and one long enough that the node gives the master up and backs off."""
    cluster = bare_cluster
    cluster.start_master()
    cluster.start_node("n1")
    cluster.wait_nodes_up(1)
    assert cluster.wait_job_state(cluster.submit("true", cwd=workdir), FINISHED)["state"] == "COMPLETED"

    port, pub_port = cluster.port, cluster.pub_port
    assert cluster.stop(cluster.master) == 0
    time.sleep(downtime)  # the length of the outage, not a synchronisation
    assert cluster.nodes["n1"].alive()
    cluster.start_master(port, pub_port)
    assert (cluster.port, cluster.pub_port) == (port, pub_port)
    cluster.wait_nodes_up(1, timeout=30)
    job = cluster.wait_job_state(cluster.submit("echo again > again.txt", cwd=workdir), FINISHED)
    assert job["state"] == "COMPLETED" and (workdir / "again.txt").read_text() == "again\n"
    assert cluster.stop(cluster.nodes["n1"]) == 0
    assert cluster.stop(cluster.master) == 0


# -- bad input ------------------------------------------------------------------------------------

def test_impossible_gpu_count_is_rejected_at_submit(pair, workdir):
    before = len(pair.queue_json()["jobs"])
    line = one_line_error(pair.cli("submit", "--gpus", "99", "true", cwd=workdir, check=False))
    assert "99" in line
    assert len(pair.queue_json()["jobs"]) == before


def test_what_is_impossible_follows_the_nodes_that_register(bare_cluster, workdir):
    """The check at submit sees every node that registered since the last submit."""
    cluster = bare_cluster
    cluster.start_master()
    assert "no node agent has registered" in one_line_error(cluster.cli("submit", "true", cwd=workdir, check=False))
    cluster.start_node("n1", 2)
    cluster.wait_nodes_up(1)
    assert "can never be satisfied" in one_line_error(cluster.cli("submit", "--gpus", "4", "true", cwd=workdir,
                                                                  check=False))
    cluster.start_node("n2", 2)
    cluster.wait_nodes_up(2)
    job = cluster.wait_job_state(cluster.submit("true", "--gpus", "4", cwd=workdir), FINISHED)
    assert job["state"] == "COMPLETED" and {a["node_id"] for a in job["allocation"]} == {"n1", "n2"}


@pytest.mark.parametrize("spec, needle", [("nosuch:0", "nosuch"), ("n1:9", "9"), ("n1:0;ghost:1", "ghost")])
def test_impossible_pins_are_rejected_at_submit(pair, workdir, spec, needle):
    line = one_line_error(pair.cli("submit", "--node-gpu-ids", spec, "true", cwd=workdir, check=False))
    assert needle in line


def test_malformed_pin_spec_is_a_usage_error(pair, workdir):
    proc = pair.cli("submit", "--node-gpu-ids", "n1", "true", cwd=workdir, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    # argparse's usual form: the usage, then one line saying what is wrong.
    assert "'n1'" in proc.stderr.strip().splitlines()[-1]


@pytest.fixture
def dead_port():
    """A port bound by nobody's listener: connections to it are refused."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield sock.getsockname()[1]
    sock.close()


@pytest.mark.parametrize("command", [["submit", "--connection-timeout", "1", "true"],
                                     ["queue", "--connection-timeout", "1"]],
                         ids=["submit", "queue"])
def test_unreachable_master_is_one_line_naming_the_address(pair, dead_port, command):
    argv = pair.cli_argv()
    argv[argv.index("--port") + 1] = str(dead_port)
    argv[argv.index("--pub-port") + 1] = str(dead_port)
    started = time.monotonic()
    proc = subprocess.run([*argv, *command], env=pair.env, capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL)
    assert time.monotonic() - started < 10
    line = one_line_error(proc)
    assert f"127.0.0.1:{dead_port}" in line


# -- garbage on the master's port -----------------------------------------------------------------

@dataclass
class Garbage:
    """Frames to send, and the error code a reply must carry (None: a reply is optional)."""

    name: str
    frames: list
    code: str | None = None


def _body(msg_type, **body):
    return encode(msg_type, {"user": "mallory", "req": 7, **body})


def _job(**overrides):
    job = {"command": "true", "cwd": "/", "env": {}, "gpus": 1, "node_gpu_ids": None, "interactive": False}
    return {**job, **overrides}


CLIENT_GARBAGE = [
    Garbage("wrong magic", [b"ZMGPU9", b"PING", b'{"user": "m", "req": 1}'], None),
    Garbage("single frame", [b"hello"], None),
    Garbage("empty frame", [b""], None),
    Garbage("unknown type", [MAGIC, b"LAUNCH_MISSILES", b"{}"], "UNKNOWN_TYPE"),
    Garbage("binary type", [MAGIC, b"\xff\xfe\x00", b"{}"], "UNKNOWN_TYPE"),
    Garbage("bad json", [MAGIC, b"SUBMIT", b"{oops"], "BAD_JSON"),
    Garbage("not utf-8", [MAGIC, b"QUEUE", b"\xff\xfe\xfd"], "BAD_JSON"),
    Garbage("json list", [MAGIC, b"QUEUE", b"[1, 2]"], "BAD_JSON"),
    Garbage("missing fields", encode(MsgType.SUBMIT, {"user": "m", "req": 1}), "BAD_REQUEST"),
    Garbage("wrong field type", _body(MsgType.JOB, job_id=42), "BAD_REQUEST"),
    Garbage("job not a dict", _body(MsgType.SUBMIT, job="rm -rf /"), "BAD_REQUEST"),
    Garbage("job command not a string", _body(MsgType.SUBMIT, job=_job(command=5)), "BAD_REQUEST"),
    Garbage("job without command", _body(MsgType.SUBMIT, job={"gpus": 1}), "BAD_REQUEST"),
    Garbage("negative gpus", _body(MsgType.SUBMIT, job=_job(gpus=-3)), None),
    Garbage("gpus as text", _body(MsgType.SUBMIT, job=_job(gpus="two")), "BAD_REQUEST"),
    Garbage("env not a dict", _body(MsgType.SUBMIT, job=_job(env=["A=1"])), "BAD_REQUEST"),
    Garbage("bad pin spec", _body(MsgType.SUBMIT, job=_job(node_gpu_ids="::;")), None),
    Garbage("collapse not a boolean", _body(MsgType.QUEUE, collapse="yes"), "BAD_REQUEST"),
    Garbage("fields not a list", _body(MsgType.QUEUE, fields="job_id"), "BAD_REQUEST"),
    Garbage("nodes neither a boolean nor foreign", _body(MsgType.QUEUE, nodes="some"), "BAD_REQUEST"),
    Garbage("nodes as a number", _body(MsgType.QUEUE, nodes=1), "BAD_REQUEST"),
    Garbage("unknown job", _body(MsgType.JOB, job_id="ffffffff"), "UNKNOWN_JOB"),
    Garbage("fetch unknown job", _body(MsgType.FETCH, job_id="ffffffff", rank=0, stream="stdout", offset=0),
            "UNKNOWN_JOB"),
    Garbage("a reply sent to the master", encode(MsgType.REPLY, {"ok": True, "req": 1}), None),
    Garbage("huge frame", [MAGIC, b"PING", b" " * (32 << 20) + b"{"], None),
]

NODE_GARBAGE = [
    Garbage("heartbeat from an unknown node", encode(MsgType.HEARTBEAT, {})),
    Garbage("job started for an unknown job", encode(MsgType.JOB_STARTED, {"job_id": "ffffffff", "rank": 0,
                                                                           "pid": 1})),
    Garbage("output for an unknown job", encode(MsgType.OUTPUT, {"job_id": "ffffffff", "rank": 0,
                                                                 "stream": "stdout", "offset": 0}, b"boo")),
    Garbage("output with a negative offset", encode(MsgType.OUTPUT, {"job_id": "ffffffff", "rank": 3,
                                                                     "stream": "stdin", "offset": -5}, b"x")),
    Garbage("job ended for an unknown job", encode(MsgType.JOB_ENDED, {
        "job_id": "ffffffff", "rank": 0, "exit_code": 0, "signal": None, "reason": None, "sizes": {}})),
    Garbage("register with broken gpus", encode(MsgType.REGISTER, {
        "node_id": "ghost", "hostname": "h", "address": "a", "gpus": [{"index": "zero"}, 7], "jobs": [5]})),
    Garbage("register claiming an unknown job", encode(MsgType.REGISTER, {
        "node_id": "ghost", "hostname": "h", "address": "a", "gpus": [],
        "jobs": [{"job_id": "ffffffff", "rank": 0}]})),
    Garbage("output without payload", [MAGIC, b"OUTPUT", b'{"job_id": "ffffffff", "rank": 0, '
                                                        b'"stream": "stdout", "offset": 0}']),
]


def _send_then_ping(ctx, port, identity: bytes, frames, timeout=10):
    """Send ``frames``, then a PING; return every message that came back before the PING's reply."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(f"tcp://127.0.0.1:{port}")
    try:
        sock.send_multipart(frames)
        sock.send_multipart(encode(MsgType.PING, {"user": "tester", "req": 424242}))
        before = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not sock.poll(100):
                continue
            msg = decode(sock.recv_multipart())
            if msg.type is MsgType.REPLY and msg.body.get("req") == 424242:
                assert msg.body["ok"] and msg.body["version"] == 1, msg.body
                return before
            before.append(msg)
        raise AssertionError("the master did not answer a PING sent after the garbage")
    finally:
        sock.close()


@pytest.mark.parametrize("case", CLIENT_GARBAGE, ids=lambda c: c.name)
def test_master_answers_garbage_with_typed_errors(pair, case):
    replies = [m for m in _send_then_ping(pair.ctx, pair.port, f"mallory-{case.name}".encode(), case.frames)
               if m.type is MsgType.REPLY]
    if case.code is not None:
        assert len(replies) == 1, replies
    assert len(replies) <= 1, replies
    for reply in replies:
        assert reply.body["ok"] is False and reply.body["message"], reply.body
        if case.code is not None:
            assert reply.body["error"] == case.code, reply.body


def test_cancel_of_ids_that_are_not_strings_fails_each(pair):
    frames = _body(MsgType.CANCEL, job_ids=[1, None, {}])
    back = _send_then_ping(pair.ctx, pair.port, b"mallory-cancel", frames)
    [reply] = [m for m in back if m.type is MsgType.REPLY]
    assert (reply.body["ok"], reply.body["error"]) == (False, "BAD_REQUEST"), reply.body


@pytest.mark.parametrize("case", NODE_GARBAGE, ids=lambda c: c.name)
def test_master_drops_bogus_node_traffic(pair, case):
    _send_then_ping(pair.ctx, pair.port, b"ghost", case.frames)
    assert pair.master.alive()


def test_master_still_serves_after_garbage(pair, workdir):
    """Runs after the garbage tests: the master and both nodes carry on as before."""
    assert pair.master.alive()
    states = {n["node_id"]: n["state"] for n in pair.queue_json()["nodes"]}
    assert states["n1"] == states["n2"] == "UP", states
    # One GPU: a node "ghost" registered with none by the garbage above has no connection any more.
    job = pair.wait_job_state(pair.submit("echo fine > fine.txt", "--gpus", "1", cwd=workdir), FINISHED)
    assert job["state"] == "COMPLETED" and (workdir / "fine.txt").read_text() == "fine\n"
