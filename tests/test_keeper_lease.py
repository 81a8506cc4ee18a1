"""End to end: with only its agent dead, a node's jobs stop before the master runs them elsewhere."""

import signal

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
