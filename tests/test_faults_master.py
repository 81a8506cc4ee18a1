"""Fault injection on the master: ``kill -9`` with a full queue, a second master on the same state
directory, a state directory that cannot be written, and a clean stop on SIGTERM.

Every daemon is the real one.  A stopped master is started again on the same state directory and
the same ports, so the node agents and clients find it again as they would in a lab.
"""

import getpass
import resource
import signal
import sys
from collections import Counter

import pytest

from conftest import FINISHED, one_line_error, poll
from helpers import wait_for_file_sh
from zmgpu import ClientError
from zmgpu.protocol import MsgType

JOBS = 200
#: Jobs that have started (and so written their ledger line) when the master is killed; most of the
#: 200 are still queued then.
STARTED_AT_KILL = 40
#: Every tenth job also waits for a second gate, opened only after the restart, so some jobs are
#: surely running across the restart (no more than the eight GPUs hold before the kill).
HELD_EVERY = 10
#: After a restart the nodes must register again; a long grace keeps a slow start-up from failing jobs.
RESTART_ARGS = ("--node-dead-timeout", "30")


def start_again(cluster) -> None:
    """Start the stopped master on the same state directory and ports, and wait until every node agent
    has registered again (a restored node is suspect until it does)."""
    port, pub_port = cluster.port, cluster.pub_port
    cluster.start_master(port, pub_port, *RESTART_ARGS)
    assert (cluster.port, cluster.pub_port) == (port, pub_port)
    poll(lambda: all(n["status"] not in ("suspect", "down") for n in cluster.queue_json()["nodes"]), 20,
         "the node agents to register with the restarted master")


def restart_master(cluster, signum: int = signal.SIGKILL) -> int:
    """Stop the master with ``signum`` and :func:`start_again`; the stopped master's exit status."""
    status = cluster.stop(cluster.master, signum)
    start_again(cluster)
    return status


def ledger_lines(workdir) -> list[str]:
    path = workdir / "ledger"
    return path.read_text().splitlines() if path.exists() else []


def jobs_by_id(cluster) -> dict[str, dict]:
    return {job["job_id"]: job for job in cluster.queue_json()["jobs"]}


def changes(before: dict[str, dict], after: dict[str, dict]) -> dict:
    """``{job id: {field: (before, after)}}`` for every field that differs (a missing job: ``None``)."""
    diff = {}
    for job_id in before.keys() | after.keys():
        old, new = before.get(job_id, {}), after.get(job_id, {})
        fields = {key: (old.get(key), new.get(key)) for key in old.keys() | new.keys() if old.get(key) != new.get(key)}
        if fields:
            diff[job_id] = fields
    return diff


# -- kill -9 with 200 jobs -----------------------------------------------------------------------

def ledger_job(index: int) -> str:
    """Job ``index``: record its start in the ledger, wait for the gate(s), then write output of its own."""
    gates = ["gate", "late"] if index % HELD_EVERY == 0 else ["gate"]
    waits = "; ".join(wait_for_file_sh(gate) for gate in gates)
    return (f'echo "$ZMGPU_JOB_ID" >> ledger; {waits}; '
            f'printf "job {index} %s\\n" "$ZMGPU_JOB_ID"; seq {index}; echo "stderr of {index}" >&2')


def expected_output(index: int, job_id: str) -> tuple[bytes, bytes]:
    stdout = f"job {index} {job_id}\n" + "".join(f"{k}\n" for k in range(1, index + 1))
    return stdout.encode(), f"stderr of {index}\n".encode()


def test_kill_9_master_with_200_jobs_loses_none_and_runs_none_twice(fresh_pair, workdir):
    cluster = fresh_pair
    with cluster.client() as client:
        ids = [client.submit(ledger_job(index), gpus=1, cwd=str(workdir), env=cluster.env)
               for index in range(1, JOBS + 1)]
    assert len(set(ids)) == JOBS
    poll(lambda: len(ledger_lines(workdir)) >= 8, 20, "the first eight jobs to start")
    (workdir / "gate").touch()
    # Killed while jobs start, run and end as fast as the master can place them.
    poll(lambda: len(ledger_lines(workdir)) >= STARTED_AT_KILL, 20, f"{STARTED_AT_KILL} jobs to start")
    assert cluster.stop(cluster.master, signal.SIGKILL) == -signal.SIGKILL
    started = len(ledger_lines(workdir))
    assert started < HELD_EVERY * 8, f"{started} jobs had started: the master was killed too late"
    start_again(cluster)
    (workdir / "late").touch()

    def all_ended():
        jobs = jobs_by_id(cluster)
        return jobs if all(jobs.get(i, {}).get("state") in FINISHED for i in ids) else None

    jobs = poll(all_ended, 60, "every acknowledged job to end")
    counts = Counter(ledger_lines(workdir))
    assert {i: n for i, n in counts.items() if n != 1} == {}, "jobs that ran more than once"
    assert set(counts) == set(ids), f"jobs that never ran: {sorted(set(ids) - set(counts))}"
    assert {i: jobs[i]["state"] for i in ids if jobs[i]["state"] != "COMPLETED"} == {}
    assert not set(jobs) - set(ids), "jobs nobody submitted appeared"
    for index, job_id in enumerate(ids, start=1):
        stdout, stderr = expected_output(index, job_id)
        assert (cluster.output(job_id), cluster.output(job_id, "stderr")) == (stdout, stderr), job_id


# -- one master per state directory --------------------------------------------------------------

def test_second_master_on_the_same_state_dir_refuses_to_start(bare_cluster, run_program):
    cluster = bare_cluster
    cluster.start_master()
    state_dir = cluster.root / "master-state"
    proc = run_program([sys.executable, "-m", "zmgpu.master", "--port", "0", "--pub-port", "0",
                        "--state-dir", str(state_dir)], timeout=20)
    line = one_line_error(proc)
    assert str(state_dir) in line and "in use" in line, line
    assert cluster.master.alive()
    assert (cluster.request(MsgType.PING) or {}).get("ok"), "the first master stopped answering"


# -- a state directory that cannot be written ----------------------------------------------------

@pytest.fixture
def unwritable_files():
    """Make a process unable to grow any file past its first byte (RLIMIT_FSIZE), as on a full disk.

    A limit works for root too, where permissions do not; Python ignores SIGXFSZ, so the master's
    writes fail with EFBIG.  Yields ``block(pid)``; the limit is lifted again with ``unblock(pid)``
    or at teardown.
    """
    blocked = {}

    def block(pid: int) -> None:
        blocked[pid] = resource.prlimit(pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY))

    def unblock(pid: int) -> None:
        resource.prlimit(pid, resource.RLIMIT_FSIZE, blocked.pop(pid))

    yield block, unblock
    for pid in list(blocked):
        try:
            unblock(pid)
        except ProcessLookupError:
            pass


def test_unwritable_state_dir_refuses_submits_and_keeps_acknowledged_jobs(fresh_pair, workdir, unwritable_files):
    cluster = fresh_pair
    block, unblock = unwritable_files
    done = cluster.submit("echo kept", cwd=workdir)
    held = cluster.submit(wait_for_file_sh("release") + "; echo held", "--node-gpu-ids", "n1:0", cwd=workdir)
    queued = cluster.submit("echo queued", "--node-gpu-ids", "n1:0", cwd=workdir)
    cluster.wait_job_state(done, "COMPLETED")
    cluster.wait_job_state(held, "RUNNING")
    before = set(jobs_by_id(cluster))

    block(cluster.master.popen.pid)
    line = one_line_error(cluster.cli("submit", "echo refused", cwd=workdir, check=False))
    assert "could not store" in line, line
    with cluster.client(timeout=10) as client, pytest.raises(ClientError) as refused:
        client.submit("echo refused too", cwd=str(workdir), env=cluster.env)
    assert refused.value.code == "STORE_FAILED", refused.value
    # It keeps serving: queries answer, and nothing half-stored shows up.
    assert set(jobs_by_id(cluster)) == before
    assert cluster.master.alive()

    unblock(cluster.master.popen.pid)
    after = cluster.submit("echo after", cwd=workdir)   # queued behind ``queued``: first come, first served
    restart_master(cluster)
    assert set(jobs_by_id(cluster)) == before | {after}
    assert cluster.job(held)["state"] == "RUNNING"
    (workdir / "release").touch()
    ended = cluster.wait_jobs_ended([held, queued, after])
    assert {j: job["state"] for j, job in ended.items()} == dict.fromkeys([held, queued, after], "COMPLETED")
    assert [cluster.output(j) for j in (done, held, queued, after)] == [b"kept\n", b"held\n", b"queued\n",
                                                                        b"after\n"]


# -- SIGTERM ---------------------------------------------------------------------------------------

def test_sigterm_master_exits_0_and_a_restart_shows_every_job_as_it_was(fresh_pair, workdir):
    cluster = fresh_pair
    completed = cluster.submit("echo done", cwd=workdir)
    failed = cluster.submit("echo oops >&2; exit 3", cwd=workdir)
    held = cluster.submit(wait_for_file_sh("release") + "; echo held", "--node-gpu-ids", "n1:0", cwd=workdir)
    pending = cluster.submit("echo later", "--node-gpu-ids", "n1:0", cwd=workdir)
    cancelled = cluster.submit("echo never", "--node-gpu-ids", "n1:0", cwd=workdir)
    cluster.wait_jobs_ended([completed, failed])
    cluster.wait_job_state(held, "RUNNING")
    cluster.cli("cancel", cancelled)
    cluster.wait_job_state(cancelled, "CANCELLED")
    poll(lambda: cluster.job(pending)["reason"], 10, "the pending job's wait reason")
    before = jobs_by_id(cluster)
    assert {j: job["state"] for j, job in before.items()} == {
        completed: "COMPLETED", failed: "FAILED", held: "RUNNING", pending: "PENDING", cancelled: "CANCELLED"}

    assert restart_master(cluster, signal.SIGTERM) == 0
    # A wait reason describes the cluster now: it may take a scheduling pass to be the same again.
    try:
        poll(lambda: not changes(before, jobs_by_id(cluster)), 5, "the restored jobs to be as they were")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: {changes(before, jobs_by_id(cluster))}") from None
    assert (cluster.output(completed), cluster.output(failed, "stderr")) == (b"done\n", b"oops\n")
    (workdir / "release").touch()
    ended = cluster.wait_jobs_ended([held, pending])
    assert {j: job["state"] for j, job in ended.items()} == {held: "COMPLETED", pending: "COMPLETED"}


def test_a_drain_survives_a_master_restart(bare_cluster, tmp_path, workdir):
    cluster = bare_cluster
    config = tmp_path / "master.yaml"
    config.write_text(f"admins: [{getpass.getuser()}]\n")
    cluster.start_master(0, 0, "--config", str(config))
    cluster.start_node("n1")
    cluster.wait_nodes_up(1)
    cluster.cli("drain", "n1", "--reason", "new driver")
    cluster.stop(cluster.master, signal.SIGKILL)
    cluster.start_master(cluster.port, cluster.pub_port, "--config", str(config))
    poll(lambda: cluster.node("n1")["status"] != "suspect", 10, "n1 to register again")
    node = cluster.node("n1")
    assert (node["status"], node["drain_reason"]) == ("drained", "new driver"), node
    job_id = cluster.submit("true", "--gpus", "1", cwd=workdir)
    poll(lambda: cluster.job(job_id)["reason"], 5, "the job's wait reason")
    assert cluster.job(job_id)["state"] == "PENDING"
