"""End to end: a job's output after the fact and as it is produced, through the real ``zmgpu`` command.

``zmgpu logs`` (whole, per stream, per rank, and --follow), ``zmgpu attach`` (detach with Ctrl-\\, attach
again), and interactive sessions that must lose nothing and repeat nothing: across a master ``kill -9`` and
restart, while stopped with SIGSTOP, and when the reader of their stdout leaves.  Jobs wait on files the
test creates, so each phase starts when the test says; every wait polls with a deadline.
"""

from __future__ import annotations

import hashlib
import io
import signal
import subprocess
import sys
from contextlib import contextmanager

from conftest import FINISHED, one_line_error, poll
from helpers import STDERR_MARKER, file_sha256, job_command, pattern_chunks, release, wait_for_file_sh

#: How long a test waits for a client process to end once its job can finish.
CLIENT_TIMEOUT = 60


def pattern(*sizes: int) -> bytes:
    """The test pattern's first ``size`` bytes, once per size, one after the other."""
    return b"".join(chunk for size in sizes for chunk in pattern_chunks(size))


def spew(size: int) -> str:
    """Shell for: write ``size`` pattern bytes to stdout and STDERR_MARKER to stderr."""
    return job_command("spew", str(size), "0")


def binary(cluster, *args: str, cwd) -> subprocess.CompletedProcess:
    """``zmgpu ARGS`` with its stdout and stderr as bytes."""
    return cluster.cli(*args, cwd=cwd, check=False, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@contextmanager
def client(cluster, argv: list, cwd, stdout, stderr=subprocess.PIPE):
    """A ``zmgpu`` process running in the background; killed if the test leaves it running."""
    proc = subprocess.Popen(argv, cwd=cwd, env=cluster.env, stdin=subprocess.DEVNULL, stdout=stdout,
                            stderr=stderr)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def has_bytes(path, expected: bytes):
    """A poll condition: the file holds exactly ``expected``."""
    return lambda: path.exists() and path.read_bytes() == expected


# -- zmgpu logs -------------------------------------------------------------------------------------

RANK_SIZES = {"n1": 300_007, "n2": 200_003}
TWO_RANKS = ('case "$ZMGPU_NODE_ID" in n1) n=300007;; *) n=200003;; esac; echo "rank on $ZMGPU_NODE_ID"; '
             + job_command("spew") + ' "$n" 0; echo "err of $ZMGPU_NODE_ID" >&2')


def test_logs_of_a_finished_two_rank_job_is_byte_exact(pair, workdir):
    job_id = pair.submit(TWO_RANKS, "--gpus", "6", cwd=workdir)
    job = pair.wait_job_state(job_id, FINISHED)
    assert job["state"] == "COMPLETED"
    nodes = [rank["node_id"] for rank in job["allocation"]]
    assert sorted(nodes) == ["n1", "n2"]
    outs = [f"rank on {node}\n".encode() + pattern(RANK_SIZES[node]) for node in nodes]
    errs = [STDERR_MARKER + f"err of {node}\n".encode() for node in nodes]

    proc = binary(pair, "logs", job_id, cwd=workdir)
    assert (proc.returncode, proc.stderr) == (0, b"")
    assert proc.stdout == b"".join(outs)                       # every rank, in rank order
    assert binary(pair, "logs", "--stderr", job_id, cwd=workdir).stdout == b"".join(errs)
    assert binary(pair, "logs", "--rank", "1", job_id, cwd=workdir).stdout == outs[1]
    assert binary(pair, "logs", "--stderr", "--rank", "0", job_id, cwd=workdir).stdout == errs[0]
    line = one_line_error(pair.cli("logs", "--rank", "2", job_id, cwd=workdir, check=False))
    assert "2 rank(s)" in line


def test_logs_follow_gets_a_running_job_to_its_end(pair, workdir, tmp_path):
    size = 3 * 1024 * 1024 + 17
    job_id = pair.submit(f"echo first; {wait_for_file_sh('release')}; {spew(size)}", cwd=workdir)
    out = tmp_path / "followed"
    with open(out, "wb") as out_fh, client(pair, pair.cli_argv("logs", "--follow", job_id), workdir, out_fh) as proc:
        poll(has_bytes(out, b"first\n"), 20, "logs --follow to show the first line")
        # Without --follow: what the master holds now, at once.
        now = binary(pair, "logs", job_id, cwd=workdir)
        assert (now.returncode, now.stdout) == (0, b"first\n")
        release(workdir, "release")
        assert proc.wait(CLIENT_TIMEOUT) == 0, proc.stderr.read()
        assert proc.stderr.read() == b""
    assert out.read_bytes() == b"first\n" + pattern(size)
    assert pair.job(job_id)["state"] == "COMPLETED"


# -- zmgpu attach -----------------------------------------------------------------------------------

def test_attach_detach_with_ctrl_backslash_then_attach_again(pair, workdir, tmp_path):
    job_id = pair.submit(f"echo part1; echo err1 >&2; {wait_for_file_sh('release')}; echo part2; exit 3",
                         cwd=workdir)
    pair.wait_job_state(job_id, "RUNNING")
    out = tmp_path / "first.out"
    with open(out, "wb") as out_fh, client(pair, pair.cli_argv("attach", job_id), workdir, out_fh) as proc:
        poll(has_bytes(out, b"part1\n"), 20, "attach to show what the job wrote")
        proc.send_signal(signal.SIGQUIT)
        assert proc.wait(CLIENT_TIMEOUT) == 1
        err = proc.stderr.read().decode()
    assert err.splitlines() == ["err1", f"zmgpu: detached from job {job_id}; it keeps running. "
                                        f"Re-attach with: zmgpu attach {job_id}"]
    assert pair.job(job_id)["state"] == "RUNNING"

    out = tmp_path / "second.out"
    with open(out, "wb") as out_fh, client(pair, pair.cli_argv("attach", job_id), workdir, out_fh) as proc:
        poll(has_bytes(out, b"part1\n"), 20, "the second attach to show the job's history")
        release(workdir, "release")
        assert proc.wait(CLIENT_TIMEOUT) == 3                  # the job's own exit status
        assert proc.stderr.read() == b"err1\n"
    assert out.read_bytes() == b"part1\npart2\n"


def test_interactive_submit_detaches_with_ctrl_backslash_too(pair, workdir):
    command = f"echo started; {wait_for_file_sh('release')} # {workdir.name}-detach"
    try:
        with client(pair, pair.cli_argv("submit", "-i", command), workdir, subprocess.PIPE) as proc:
            assert proc.stdout.readline() == b"started\n"
            proc.send_signal(signal.SIGQUIT)
            assert proc.wait(CLIENT_TIMEOUT) == 1
            [line] = proc.stderr.read().decode().splitlines()
        [job] = [job for job in pair.queue_json()["jobs"] if job["command"] == command]
        assert line == (f"zmgpu: detached from job {job['job_id']}; it keeps running. "
                        f"Re-attach with: zmgpu attach {job['job_id']}")
        assert pair.job(job["job_id"])["state"] == "RUNNING"
        # The session timeout detaches the same way.
        proc = pair.cli("attach", "--session-timeout", "0.5", job["job_id"], cwd=workdir, check=False)
        assert proc.returncode == 1 and proc.stdout == "started\n"
        assert proc.stderr.splitlines() == [f"zmgpu: session timeout (0.5 s): {line[len('zmgpu: '):]}"]
    finally:
        release(workdir, "release")
    assert pair.wait_job_state(job["job_id"], FINISHED)["state"] == "COMPLETED"


# -- interactive sessions that lose nothing ---------------------------------------------------------

def test_interactive_session_outlives_a_master_restart(bare_cluster, workdir, tmp_path):
    cluster = bare_cluster
    cluster.start_master()
    cluster.start_node("n1")
    cluster.wait_nodes_up(1)
    sizes = (1_000_003, 2_000_029, 1_500_007)    # before, during and after the outage
    command = (f"{spew(sizes[0])}; {wait_for_file_sh('down')}; {spew(sizes[1])}; touch written; "
               f"{wait_for_file_sh('up')}; {spew(sizes[2])}")
    # No --pub-port: the session asks the master for it.
    argv = [sys.executable, "-m", "zmgpu.cli.main", "--port", str(cluster.port), "submit", "-i", command]
    out = tmp_path / "session.out"
    with open(out, "wb") as out_fh, client(cluster, argv, workdir, out_fh) as proc:
        poll(has_bytes(out, pattern(sizes[0])), 30, "the output written before the outage")
        port, pub_port = cluster.port, cluster.pub_port
        cluster.stop(cluster.master, signal.SIGKILL)
        release(workdir, "down")
        poll(lambda: (workdir / "written").exists(), 30, "the job to write while the master is down")
        cluster.start_master(port, pub_port)
        release(workdir, "up")
        assert proc.wait(CLIENT_TIMEOUT) == 0, proc.stderr.read()[-2000:]
        assert proc.stderr.read() == STDERR_MARKER * 3
    assert out.read_bytes() == pattern(*sizes)


def test_stopped_follower_resumes_byte_exact_after_a_large_output(pair, workdir, tmp_path):
    size = 50 * 1024 * 1024
    job_id = pair.submit(f"echo ready; {wait_for_file_sh('release')}; {spew(size)}", cwd=workdir)
    out = tmp_path / "followed"
    with open(out, "wb") as out_fh, client(pair, pair.cli_argv("logs", "-f", job_id), workdir, out_fh) as proc:
        poll(has_bytes(out, b"ready\n"), 20, "logs --follow to follow the job")
        proc.send_signal(signal.SIGSTOP)
        try:
            release(workdir, "release")
            job = pair.wait_job_state(job_id, FINISHED, timeout=CLIENT_TIMEOUT)
            assert job["state"] == "COMPLETED"
        finally:
            proc.send_signal(signal.SIGCONT)
        assert proc.wait(CLIENT_TIMEOUT) == 0, proc.stderr.read()
    expected = hashlib.sha256(b"ready\n")
    for chunk in pattern_chunks(size):
        expected.update(chunk)
    assert file_sha256(out) == (size + len(b"ready\n"), expected.hexdigest())


def test_interactive_job_is_cancelled_when_the_reader_of_its_output_leaves(pair, workdir):
    command = f"while :; do echo line; sleep 0.02; done # {workdir.name}-piped"
    with client(pair, pair.cli_argv("submit", "-i", command), workdir, subprocess.PIPE) as proc:
        assert [proc.stdout.readline(), proc.stdout.readline()] == [b"line\n", b"line\n"]   # `| head -2`
        proc.stdout.close()
        assert proc.wait(CLIENT_TIMEOUT) == 128 + signal.SIGPIPE
        assert proc.stderr.read() == b""                        # quietly, as a pipeline's writer ends
    [job] = [job for job in pair.queue_json()["jobs"] if job["command"] == command]
    assert pair.wait_job_state(job["job_id"], FINISHED)["state"] == "CANCELLED"


def test_ctrl_c_while_the_interactive_job_is_pending_cancels_it(pair, workdir):
    blocker = pair.submit(wait_for_file_sh("release"), "--gpus", "8", cwd=workdir)
    command = f"echo never # {workdir.name}-pending"
    try:
        pair.wait_job_state(blocker, "RUNNING")
        with client(pair, pair.cli_argv("submit", "-i", "--gpus", "1", command), workdir,
                    subprocess.PIPE) as proc:
            job = poll(lambda: next((j for j in pair.queue_json()["jobs"] if j["command"] == command), None), 20,
                       "the interactive job to be queued")
            assert job["state"] == "PENDING"
            proc.send_signal(signal.SIGINT)
            assert pair.wait_job_state(job["job_id"], FINISHED)["state"] == "CANCELLED"
            # Cancelled before it started: no exit code of its own, so zmgpu's failure status, and it says why.
            assert proc.wait(CLIENT_TIMEOUT) == 1
            err = proc.stderr.read()
            assert proc.stdout.read() == b"" and b"Traceback" not in err and b"CANCELLED" in err, err
    finally:
        release(workdir, "release")
    pair.wait_job_state(blocker, "COMPLETED")


def test_options_after_a_one_string_command_are_a_usage_error(pair, workdir):
    before = len(pair.queue_json()["jobs"])
    line = one_line_error(pair.cli("submit", "-i", "echo hi", "--gpus", "2", cwd=workdir, check=False), 2)
    assert "'echo hi'" in line and "--gpus 2" in line and "put options before the command" in line
    assert len(pair.queue_json()["jobs"]) == before            # nothing was submitted


def test_client_asks_the_master_for_its_pub_port(pair, workdir):
    from zmgpu import Client

    stdout, stderr = io.BytesIO(), io.BytesIO()
    with Client(host="127.0.0.1", port=pair.port) as api:      # no pub_port: the master names it
        job_id = api.submit("echo hi; echo there >&2", cwd=str(workdir), env=dict(pair.env))
        job = api.stream(job_id, stdout=stdout, stderr=stderr)
        assert api.pub_port == pair.pub_port
    assert (job["state"], stdout.getvalue(), stderr.getvalue()) == ("COMPLETED", b"hi\n", b"there\n")
