"""End to end: a node whose agent died: its jobs stop before the master runs them elsewhere, and a
kill the master could not deliver meanwhile is delivered once the agent is back."""

import signal
import time

from conftest import FINISHED, pid_alive, poll, written
from helpers import wait_for_file_sh

SUSPECT, DEAD = 1.0, 4.0


def test_job_of_a_dead_agent_never_runs_twice(bare_cluster, workdir):
    cluster = bare_cluster
    cluster.start_master(0, 0, "--node-timeout", str(SUSPECT), "--node-dead-timeout", str(DEAD))
    cluster.start_node("n1")
    cluster.wait_nodes_up(1)
    command = ('echo "$ZMGPU_NODE_ID $$" >> runs; echo $$ > "pid.$ZMGPU_NODE_ID"; '
               + wait_for_file_sh("release"))
    job_id = cluster.submit(command, "--gpus", "1", "--requeue", cwd=workdir)
    cluster.wait_job_state(job_id, "RUNNING")
    first = int(written(workdir / "pid.n1"))

    # Only the agent dies: its keeper keeps the job running, as an agent restart needs...
    cluster.stop(cluster.nodes["n1"], signal.SIGKILL)
    cluster.start_node("n2")
    # ...until the lease runs out, which is before the master gives n1 up and requeues the job onto n2.
    poll(lambda: (workdir / "pid.n2").exists(), DEAD + 10, "the requeued job to start on n2")
    assert not pid_alive(first), "the first run was still alive when the job started again elsewhere"
    assert cluster.job(job_id)["requeue_count"] == 1

    (workdir / "release").touch()
    job = cluster.wait_job_state(job_id, FINISHED)
    assert job["state"] == "COMPLETED", job
    assert [line.split()[0] for line in (workdir / "runs").read_text().splitlines()] == ["n1", "n2"]


def test_a_time_limit_kill_lost_with_the_agent_is_sent_again(bare_cluster, workdir):
    cluster = bare_cluster
    cluster.start_master(0, 0, "--node-timeout", "1", "--node-dead-timeout", "30")
    cluster.start_node("n1")
    cluster.wait_nodes_up(1)
    job_id = cluster.submit("echo $$ > job.pid; " + wait_for_file_sh("never"), "--time", "0:02", cwd=workdir)
    cluster.wait_job_state(job_id, "RUNNING")
    pid = int(written(workdir / "job.pid"))
    # The agent dies before the limit: the master's KILL at the limit finds no one to take it.
    cluster.stop(cluster.nodes["n1"], signal.SIGKILL)
    poll(lambda: cluster.job(job_id)["state"] == "RUNNING" and _past_limit(cluster.job(job_id)), 10,
         "the time limit to pass while the agent is away")
    assert pid_alive(pid)
    cluster.start_node("n1")
    job = cluster.wait_job_state(job_id, FINISHED, timeout=15)
    assert job["state"] == "TIMEOUT", job
    assert not pid_alive(pid)


def _past_limit(job) -> bool:
    return job["start_time"] is not None and time.time() > job["start_time"] + job["time_limit"] + 1
