"""End to end: a job placed on a node whose connection just dropped waits instead of failing."""

import signal

from conftest import FINISHED, NODE_TIMEOUT, poll


def test_job_for_a_just_killed_node_waits_and_runs_when_it_returns(fresh_pair, workdir):
    cluster = fresh_pair
    cluster.stop(cluster.nodes["n2"], signal.SIGKILL)
    # Submitted before the master's node timeout: the node still counts as up, but its socket is gone.
    job_id = cluster.submit("echo $ZMGPU_NODE_ID > where.txt", "--node-gpu-ids", "n2:1", cwd=workdir)
    cluster.wait_node_state("n2", "DOWN", timeout=NODE_TIMEOUT + 3)
    job = cluster.job(job_id)
    assert job["state"] == "PENDING", job

    cluster.start_node("n2")
    done = cluster.wait_job_state(job_id, FINISHED)
    assert done["state"] == "COMPLETED", done
    poll(lambda: (workdir / "where.txt").exists(), 5, "job output file")
    assert (workdir / "where.txt").read_text().strip() == "n2"
