"""Fault injection on node agents: a frozen node that comes back (``kill -9`` of an agent is in
test_node_keeper.py).

A node that stops answering is first suspect (nothing new goes there), then dead (its requeueable job runs
elsewhere); when it answers again its stale attempt must be stopped, and the job must have run to
completion once.
"""

import os
import signal

from conftest import FINISHED, pid_alive, poll, process_state, written
from helpers import wait_for_file_sh

# -- a frozen node: suspect, dead, back ------------------------------------------------------------

#: Suspect after one second of silence, dead after four.
SUSPECT_AFTER, DEAD_AFTER = 1, 4
FROZEN_MASTER = ("--node-timeout", str(SUSPECT_AFTER), "--node-dead-timeout", str(DEAD_AFTER))

#: Each attempt of the requeueable job records its start in the ledger and its pid in
#: ``pid.<attempt>``, waits for ``release.<attempt>``, and records its end.
ATTEMPT = "$ZMGPU_RESTART_COUNT"
REQUEUEABLE = "; ".join([
    f'echo "start {ATTEMPT}" >> ledger', f'echo $$ > "pid.{ATTEMPT}"',
    wait_for_file_sh(f"release.{ATTEMPT}"), f'echo "end {ATTEMPT}" >> ledger', f'echo "attempt {ATTEMPT}"',
])


def freeze(pid: int) -> None:
    """Stop a job's whole process group, as a frozen host would."""
    os.killpg(os.getpgid(pid), signal.SIGSTOP)


def nodes_of(job) -> list[str]:
    return [a["node_id"] for a in job["allocation"]]


def test_frozen_node_is_suspect_then_dead_and_its_stale_attempt_is_stopped(bare_cluster, workdir):
    cluster = bare_cluster
    cluster.start_master(0, 0, *FROZEN_MASTER)
    cluster.start_node("n1")
    cluster.start_node("n2")
    cluster.wait_nodes_up(2)
    # n2 is full, so the requeueable job can only start on n1.
    blocker = cluster.submit(wait_for_file_sh("release.blocker"), "--node-gpu-ids", "n2:0,1,2,3", cwd=workdir)
    cluster.wait_job_state(blocker, "RUNNING")
    job_id = cluster.submit(REQUEUEABLE, "--gpus", "1", "--requeue", cwd=workdir)
    assert nodes_of(cluster.wait_job_state(job_id, "RUNNING")) == ["n1"]
    first = int(written(workdir / "pid.0"))

    # n1 freezes: its agent and the job's processes stop where they are.
    cluster.nodes["n1"].signal(signal.SIGSTOP)
    freeze(first)
    poll(lambda: cluster.node("n1")["status"] == "suspect", SUSPECT_AFTER + 3, "n1 to be suspect")
    # n1 has three free GPUs, n2 none: a new job must wait rather than go to the suspect node.
    waiting = cluster.submit(wait_for_file_sh("release.waiting"), "--gpus", "1", cwd=workdir)

    def down_while_waiting():
        node = cluster.node("n1")
        if node["state"] == "UP":
            assert cluster.job(waiting)["state"] == "PENDING", "a job was placed on a suspect node"
        return node["state"] == "DOWN"

    poll(down_while_waiting, DEAD_AFTER + 3, "n1 to be declared dead")
    requeued = cluster.job(job_id)
    assert (requeued["state"], requeued["requeue_count"]) == ("PENDING", 1), requeued

    # Room on n2: the job's second attempt runs there while the first is frozen on n1.
    (workdir / "release.blocker").touch()
    assert nodes_of(cluster.wait_job_state(job_id, "RUNNING")) == ["n2"]
    second = int(written(workdir / "pid.1"))
    # Frozen, so the two attempts never ran at once.
    assert process_state(first) == "T", "the stale attempt was resumed while its node was frozen"

    # n1 answers again: its stale attempt must go, and the new one must not be disturbed.
    cluster.nodes["n1"].signal(signal.SIGCONT)
    poll(lambda: not pid_alive(first), 15, "the stale attempt on n1 to be stopped")
    cluster.wait_node_state("n1", "UP")
    poll(lambda: cluster.node("n1")["status"] != "suspect", 10, "n1 to register again")
    assert pid_alive(second)
    job = cluster.job(job_id)
    assert (job["state"], nodes_of(job), job["requeue_count"]) == ("RUNNING", ["n2"], 1), job

    for name in ("release.0", "release.1", "release.waiting"):
        (workdir / name).touch()
    job = cluster.wait_job_state(job_id, FINISHED)
    assert (job["state"], job["exit_code"], nodes_of(job)) == ("COMPLETED", 0, ["n2"]), job
    assert (workdir / "ledger").read_text().splitlines() == ["start 0", "start 1", "end 1"]
    assert cluster.output(job_id) == b"attempt 1\n"
    assert cluster.wait_job_state(waiting, FINISHED)["state"] == "COMPLETED"
