"""End to end: jobs through a real master, two real node agents and the real ``zmgpu`` command line.

The cluster (``pair``: nodes n1 and n2, four simulated GPUs each) is shared by the whole module, so
every test leaves it idle: jobs that wait are released before the test ends.
"""

import io
import json
import os
import signal
import subprocess

import zmq

from conftest import FINISHED, KILL_GRACE, pid_alive, poll, written
from helpers import (STDERR_MARKER, file_sha256, job_command, pattern_chunks, pattern_sha256,
                     wait_for_file_sh)
from zmgpu.protocol import ENDED_PREFIX, MsgType
from zmgpu.stream import published

#: Each rank of a job records its environment in env.<node id>.json.
RANK_ENVDUMP = job_command("envdump") + ' "env.$ZMGPU_NODE_ID.json"'


def read_json(path):
    """A JSON record a job writes (helpers.py writes it atomically)."""
    return json.loads(written(path))


def allocation(job) -> dict[str, list[int]]:
    return {a["node_id"]: sorted(a["gpu_indices"]) for a in job["allocation"]}


def cvd(indices) -> str:
    return ",".join(str(i) for i in indices)


def release_all(workdir):
    (workdir / "release").touch()


# -- submit / queue / cancel ----------------------------------------------------------------------

def test_job_completes_and_leaves_the_default_queue(pair, workdir):
    job_id = pair.submit("echo hello > out.txt", cwd=workdir)
    job = pair.wait_job_state(job_id, FINISHED)
    assert (job["state"], job["exit_code"], job["signal"]) == ("COMPLETED", 0, None)
    assert (workdir / "out.txt").read_text() == "hello\n"
    assert job["command"] == "echo hello > out.txt" and job["cwd"] == str(workdir)
    assert job["user"] and job["start_time"] and job["end_time"] >= job["start_time"]

    shown = json.loads(pair.cli("queue", "--json", "--all").stdout)
    assert [j["state"] for j in shown["jobs"] if j["job_id"] == job_id] == ["COMPLETED"]
    assert job_id not in {j["job_id"] for j in json.loads(pair.cli("queue", "--json").stdout)["jobs"]}


def test_failing_job_reports_its_exit_code(pair, workdir):
    job = pair.wait_job_state(pair.submit("exit 7", cwd=workdir), FINISHED)
    assert (job["state"], job["exit_code"]) == ("FAILED", 7)


def test_the_ended_feed_carries_each_job_once_at_its_end(pair, workdir):
    """A watcher of many jobs subscribes to ``ended.``: one message per job, with its final state."""
    sub = pair.ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, ENDED_PREFIX)
    sub.connect(f"tcp://127.0.0.1:{pair.pub_port}")
    heard: list = []

    def ended(job_id):
        heard.extend(msg.body for msg in published(sub))
        return [body["state"] for body in heard if body["job_id"] == job_id]

    try:
        # The subscription takes effect some time after connect: probe jobs until one is heard.
        def probe():
            pair.submit("true", cwd=workdir)
            ended(None)     # takes in whatever the feed has carried so far
            return heard

        poll(probe, 20, "a probe job's end on the feed", interval=0.2)
        held = pair.submit(f"{wait_for_file_sh('release')}; exit 3", cwd=workdir)
        quick = pair.submit("true", cwd=workdir)
        poll(lambda: ended(quick), 20, "the quick job's end")
        pair.wait_job_state(held, "RUNNING")
        assert ended(held) == []            # a start is not an end
        release_all(workdir)
        assert poll(lambda: ended(held), 20, "the held job's end") == ["FAILED"]
        assert ended(quick) == ["COMPLETED"]
        assert all(msg["exit_code"] == 3 for msg in heard if msg["job_id"] == held)
    finally:
        release_all(workdir)
        sub.close(0)


def test_queue_lists_nodes_and_running_jobs(pair, workdir):
    job_id = pair.submit(wait_for_file_sh("release"), "--gpus", "2", cwd=workdir)
    try:
        pair.wait_job_state(job_id, "RUNNING")
        shown = json.loads(pair.cli("queue", "--json").stdout)
        nodes = {n["node_id"]: n for n in shown["nodes"]}
        assert set(nodes) == {"n1", "n2"}
        for node in nodes.values():
            assert node["state"] == "UP"
            assert [g["index"] for g in node["gpus"]] == [0, 1, 2, 3]
            assert all(g["simulated"] for g in node["gpus"])
        [job] = [j for j in shown["jobs"] if j["job_id"] == job_id]
        [(node_id, indices)] = allocation(job).items()
        held = [g["index"] for g in nodes[node_id]["gpus"] if g["job_id"] == job_id]
        assert len(indices) == 2 and held == indices

        [job_line] = [line for line in pair.cli("queue").stdout.splitlines() if line.startswith(job_id)]
        assert "RUNNING" in job_line and f"{node_id}:{cvd(indices)}" in job_line
        # The nodes are zmgpu nodes' business: each with its GPUs, simulated and marked so.
        text = pair.cli("nodes").stdout
        assert "n1" in text and "n2" in text and "simulated" in text.lower()
    finally:
        release_all(workdir)
    pair.wait_job_state(job_id, "COMPLETED")


def test_cancel_running_job_stops_its_processes(pair, workdir):
    command = "echo $$ > shell.pid; sleep 60 & echo $! > child.pid; wait"
    job_id = pair.submit(command, cwd=workdir)
    pair.wait_job_state(job_id, "RUNNING")
    pids = [int(written(workdir / name)) for name in ("shell.pid", "child.pid")]
    assert all(pid_alive(pid) for pid in pids)

    proc = pair.cli("cancel", job_id)
    assert job_id in proc.stdout and proc.stdout.count("\n") == 1
    job = pair.wait_job_state(job_id, FINISHED, timeout=10)
    assert job["state"] == "CANCELLED"
    poll(lambda: not any(pid_alive(pid) for pid in pids), 5, "the job's processes to be gone")


def test_cancel_kills_a_job_that_ignores_sigterm(pair, workdir):
    job_id = pair.submit("trap '' TERM; echo $$ > shell.pid; sleep 60", cwd=workdir)
    pair.wait_job_state(job_id, "RUNNING")
    pid = int(written(workdir / "shell.pid"))
    pair.cli("cancel", job_id)
    job = pair.wait_job_state(job_id, FINISHED, timeout=KILL_GRACE + 8)
    assert job["state"] == "CANCELLED"
    assert not pid_alive(pid)


def test_cancel_unknown_id_is_an_error(pair):
    proc = pair.cli("cancel", "deadbeef", check=False)
    assert proc.returncode == 1
    assert "deadbeef" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "Traceback" not in proc.stderr + proc.stdout


def test_cancel_known_and_unknown_ids_together(pair, workdir):
    job_id = pair.submit(wait_for_file_sh("release"), cwd=workdir)
    proc = pair.cli("cancel", job_id, "0badf00d", check=False)
    assert proc.returncode == 1
    assert job_id in proc.stdout and "0badf00d" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert pair.wait_job_state(job_id, FINISHED)["state"] == "CANCELLED"


def test_pending_job_can_be_cancelled(pair, workdir):
    blocker = pair.submit(wait_for_file_sh("release"), "--node-gpu-ids", "n1:0", cwd=workdir)
    try:
        pair.wait_job_state(blocker, "RUNNING")
        waiting = pair.submit("touch ran", "--node-gpu-ids", "n1:0", cwd=workdir)
        assert pair.job(waiting)["state"] == "PENDING"
        pair.cli("cancel", waiting)
        assert pair.wait_job_state(waiting, FINISHED)["state"] == "CANCELLED"
    finally:
        release_all(workdir)
    pair.wait_job_state(blocker, "COMPLETED")
    # A later job on the same GPU has run, so the cancelled one would have run before it.
    pair.wait_job_state(pair.submit("true", "--node-gpu-ids", "n1:0", cwd=workdir), "COMPLETED")
    assert not (workdir / "ran").exists()


# -- where and how a job runs ---------------------------------------------------------------------

def test_job_gets_submitters_cwd_and_environment(pair, workdir):
    job_id = pair.submit(job_command("envdump", "env.json"), "--gpus", "1", cwd=workdir,
                         env={"ZMGPU_TEST_SENTINEL": "from the submitter", "LANG": "C.UTF-8"})
    job = pair.wait_job_state(job_id, FINISHED)
    assert job["state"] == "COMPLETED", job
    record = read_json(workdir / "env.json")
    env = record["env"]
    [(node_id, indices)] = allocation(job).items()
    assert os.path.realpath(record["cwd"]) == os.path.realpath(workdir)
    assert env["ZMGPU_TEST_SENTINEL"] == "from the submitter" and env["LANG"] == "C.UTF-8"
    assert env["CUDA_VISIBLE_DEVICES"] == cvd(indices) and len(indices) == 1
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["ZMGPU_JOB_ID"] == job_id
    assert env["ZMGPU_NODE_ID"] == node_id


def test_cpu_job_sees_no_gpus(pair, workdir):
    job = pair.wait_job_state(pair.submit(job_command("envdump", "env.json"), "--gpus", "0", cwd=workdir),
                              FINISHED)
    assert job["state"] == "COMPLETED"
    assert read_json(workdir / "env.json")["env"].get("CUDA_VISIBLE_DEVICES") == ""


def test_missing_working_directory_fails_the_job(pair):
    # Sent as a remote submitter would: the CLI itself cannot run in a directory that does not exist.
    missing = "/nonexistent/zmgpu-test-dir"
    reply = pair.request(MsgType.SUBMIT, job={"command": "true", "cwd": missing, "env": {}, "gpus": 1,
                                              "node_gpu_ids": None, "interactive": False})
    assert reply["ok"], reply
    job = pair.wait_job_state(reply["job_id"], FINISHED)
    assert job["state"] == "FAILED"
    assert missing in (job["reason"] or "")


def test_concurrent_jobs_get_disjoint_gpus(pair, workdir):
    script = 'echo "$ZMGPU_NODE_ID $CUDA_VISIBLE_DEVICES" > gpus.$ZMGPU_JOB_ID; ' \
             + wait_for_file_sh("release.$ZMGPU_JOB_ID")
    jobs = [pair.submit(script, "--gpus", "1", cwd=workdir) for _ in range(8)]
    extra = None
    try:
        for job_id in jobs:
            pair.wait_job_state(job_id, "RUNNING")
        seen = {}
        for job_id in jobs:
            node_id, devices = written(workdir / f"gpus.{job_id}").split()
            assert allocation(pair.job(job_id)) == {node_id: [int(devices)]}
            seen[job_id] = (node_id, int(devices))
        assert sorted(seen.values()) == [(n, i) for n in ("n1", "n2") for i in range(4)]

        extra = pair.submit(script, "--gpus", "1", cwd=workdir)
        assert pair.job(extra)["state"] == "PENDING"
        (workdir / f"release.{jobs[5]}").touch()
        pair.wait_job_state(jobs[5], "COMPLETED")
        pair.wait_job_state(extra, "RUNNING")
        node_id, devices = written(workdir / f"gpus.{extra}").split()
        assert (node_id, int(devices)) == seen[jobs[5]]
    finally:
        for job_id in [*jobs, extra]:
            (workdir / f"release.{job_id}").touch()
    for job_id in [*jobs, extra]:
        pair.wait_job_state(job_id, "COMPLETED")


def _check_ranks(pair, workdir, job_id, expected_total):
    job = pair.wait_job_state(job_id, FINISHED)
    assert job["state"] == "COMPLETED", job
    placed = allocation(job)
    assert len(placed) == 2 and sum(len(v) for v in placed.values()) == expected_total
    for node_id, indices in placed.items():
        env = read_json(workdir / f"env.{node_id}.json")["env"]
        assert env["ZMGPU_NODE_ID"] == node_id
        assert env["CUDA_VISIBLE_DEVICES"] == cvd(indices)
        assert env["ZMGPU_JOB_ID"] == job_id
    return placed


def test_job_spans_two_nodes_by_gpu_count(pair, workdir):
    job_id = pair.submit(RANK_ENVDUMP, "--gpus", "6", cwd=workdir)
    placed = _check_ranks(pair, workdir, job_id, 6)
    assert set(placed) == {"n1", "n2"}


def test_job_spans_two_nodes_by_pinned_gpus(pair, workdir):
    job_id = pair.submit(RANK_ENVDUMP, "--node-gpu-ids", "n1:0,1;n2:3",
                         cwd=workdir)
    assert _check_ranks(pair, workdir, job_id, 3) == {"n1": [0, 1], "n2": [3]}


# -- interactive output ---------------------------------------------------------------------------

def test_interactive_large_output_is_byte_exact(pair, workdir, tmp_path):
    size = 100 * 1024 * 1024 + 12345  # not a multiple of any chunk size
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    with open(out, "wb") as out_fh, open(err, "wb") as err_fh:
        proc = pair.cli("submit", "--interactive", job_command("spew", str(size), "3"), cwd=workdir,
                        check=False, stdout=out_fh, stderr=err_fh, timeout=180)
    assert proc.returncode == 3, err.read_bytes()[-2000:]
    assert file_sha256(out) == (size, pattern_sha256(size))
    assert STDERR_MARKER in err.read_bytes()


def test_interactive_small_output_and_exit_code(pair, workdir):
    proc = pair.cli("submit", "--interactive", "printf 'a\\nb'; printf 'oops' >&2; exit 5", cwd=workdir,
                    check=False)
    assert proc.returncode == 5
    assert proc.stdout == "a\nb"
    assert "oops" in proc.stderr


def test_interactive_job_killed_by_signal(pair, workdir):
    proc = pair.cli("submit", "--interactive", "echo before; kill -KILL $$", cwd=workdir, check=False)
    assert proc.returncode == 128 + 9, proc.stderr
    assert proc.stdout == "before\n"


def test_interactive_job_across_two_nodes_shows_both_ranks(pair, workdir):
    proc = pair.cli("submit", "--interactive", "--gpus", "6", 'echo "rank on $ZMGPU_NODE_ID"', cwd=workdir)
    assert sorted(proc.stdout.splitlines()) == ["rank on n1", "rank on n2"]


def test_ctrl_c_cancels_an_interactive_job(pair, workdir):
    command = f"echo started; exec sleep 60 # {workdir.name}-ctrl-c"
    cli = subprocess.Popen(pair.cli_argv("submit", "--interactive", command), cwd=workdir, env=pair.env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        job = poll(lambda: next((j for j in pair.queue_json()["jobs"] if j["command"] == command
                                 and j["state"] == "RUNNING"), None), 20, "the interactive job to run")
        assert cli.stdout.readline() == b"started\n"  # attached: the job's output reaches the terminal
        cli.send_signal(signal.SIGINT)
        assert pair.wait_job_state(job["job_id"], FINISHED)["state"] == "CANCELLED"
        out, err = cli.communicate(timeout=20)
    finally:
        cli.kill()
    assert cli.returncode == 128 + signal.SIGTERM, err
    assert b"Traceback" not in err and job["job_id"].encode() in err


def test_stream_returns_output_written_before_subscribing(pair, workdir):
    from zmgpu import Client

    size = 3 * 1024 * 1024 + 17
    err_size = len(STDERR_MARKER)
    command = f"{job_command('spew', str(size), '0')}; {wait_for_file_sh('release')}"
    client = Client(host="127.0.0.1", port=pair.port, pub_port=pair.pub_port)
    try:
        job_id = client.submit(command, cwd=str(workdir), env=dict(pair.env))

        def master_has_all():
            sizes = {(o["rank"], o["stream"]): o["size"] for o in pair.job(job_id)["outputs"]}
            return sizes.get((0, "stdout")) == size and sizes.get((0, "stderr")) == err_size

        poll(master_has_all, 30, "the master to hold the job's output")
        stdout, stderr = io.BytesIO(), io.BytesIO()
        release_all(workdir)
        job = client.stream(job_id, stdout=stdout, stderr=stderr)
    finally:
        release_all(workdir)
        client.close()
    assert (job["state"], job["exit_code"]) == ("COMPLETED", 0)
    assert stderr.getvalue() == STDERR_MARKER
    data = stdout.getvalue()
    assert len(data) == size
    assert data == b"".join(pattern_chunks(size))
