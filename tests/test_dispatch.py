"""End to end: a job placed on a node whose connection just dropped waits instead of failing; jobs held up
behind one that needs a node that is lost start once it is."""

import signal

from conftest import FINISHED, NODE_TIMEOUT, poll
from helpers import hold_sh, release


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


def test_jobs_behind_one_that_needs_a_lost_node_start_once_it_is_lost(fresh_pair, workdir):
    """A node going away, with nothing of its own running, changes what can start: a pass must follow."""
    cluster = fresh_pair
    filler = cluster.submit(hold_sh("filler"), "--gpus", "2", cwd=workdir)
    [busy] = {a["node_id"] for a in cluster.wait_job_state(filler, "RUNNING")["allocation"]}
    # Needs all eight GPUs, and the filler has no time limit: its start is unknown, so nothing behind it starts.
    big = cluster.submit(hold_sh("big"), "--gpus", "8", cwd=workdir)
    small = cluster.submit(hold_sh("small"), "--gpus", "1", cwd=workdir)
    assert [cluster.job(j)["reason"] for j in (big, small)] == ["Resources", "Priority"]

    idle = "n2" if busy == "n1" else "n1"
    # Stopped, not killed: its connection stays up, so only the node going DOWN can bring the pass (a failed
    # send to a dead agent's socket would bring one too).
    cluster.nodes[idle].signal(signal.SIGSTOP)
    try:
        cluster.wait_node_state(idle, "DOWN", timeout=NODE_TIMEOUT + 3)
        # The big job now waits for the lost node, and no longer holds the queue.
        running = cluster.wait_job_state(small, "RUNNING", timeout=10)
        assert running["allocation"][0]["node_id"] == busy and cluster.job(big)["reason"] == "NodeDown"
    finally:
        cluster.nodes[idle].signal(signal.SIGCONT)
        cluster.stop(cluster.nodes[idle], signal.SIGKILL)
    release(workdir, "filler", "small")
    assert cluster.wait_job_state(filler, FINISHED)["state"] == "COMPLETED"
