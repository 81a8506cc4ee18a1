"""End to end: what a node agent's registration claims and reports.

One agent per node id: a second agent started under a node id that a live agent holds is refused by
the master and exits with status 2 (so systemd does not restart it in a loop), while the first one
keeps its job and takes new ones.  One agent per state directory: a second one exits with status 1
at once.  And a registration reports the ranks that ended lately, so a master that lost a JOB_ENDED
settles the job as it really ended.
"""

import signal
import sys

from conftest import FINISHED, HEARTBEAT, NODE_TIMEOUT, pid_alive, poll, written
from helpers import wait_for_file_sh

#: The master declares a silent node dead only after this long: the first agent is cut off while the
#: second one holds the node id's connection, and its job must outlive that.
DEAD_TIMEOUT = 60


def agent_argv(cluster, node_id: str, state_dir) -> list[str]:
    return [sys.executable, "-m", "zmgpu.node", "--node-id", node_id, "--master-port", str(cluster.port),
            "--state-dir", str(state_dir), "--simulate-gpus", "2", "--heartbeat-interval", str(HEARTBEAT),
            "--master-timeout", str(NODE_TIMEOUT), "--single-user"]


def test_second_agent_with_a_node_id_in_use_is_refused(bare_cluster, workdir, run_program, tmp_path):
    cluster = bare_cluster
    cluster.start_master(0, 0, "--node-dead-timeout", str(DEAD_TIMEOUT))
    first = cluster.start_node("n1")
    cluster.wait_nodes_up(1)
    job_id = cluster.submit("echo $$ > job.pid; " + wait_for_file_sh("release") + "; echo finished",
                            "--gpus", "1", cwd=workdir)
    cluster.wait_job_state(job_id, "RUNNING")
    pid = int(written(workdir / "job.pid"))

    twin = run_program(agent_argv(cluster, "n1", tmp_path / "twin-state"), timeout=60)
    assert twin.returncode == 2, (twin.returncode, twin.stderr)
    assert "Traceback" not in twin.stderr
    [refusal] = [line for line in twin.stderr.splitlines() if " ERROR " in line]
    assert "refused node n1" in refusal and "in use" in refusal, refusal

    # The first agent and its job carry on, and the node takes new work.
    assert first.alive() and pid_alive(pid)
    assert cluster.job(job_id)["state"] == "RUNNING"
    (workdir / "release").touch()
    assert cluster.wait_job_state(job_id, FINISHED, timeout=30)["state"] == "COMPLETED"
    again = cluster.submit("echo again > again.txt", "--gpus", "1", cwd=workdir)
    assert cluster.wait_job_state(again, FINISHED, timeout=30)["state"] == "COMPLETED"
    assert (workdir / "again.txt").read_text() == "again\n"
    assert "refused" not in first.log.read_text()
    assert first.alive()


def test_second_agent_on_a_state_dir_in_use_exits_at_once(bare_cluster, workdir, run_program):
    cluster = bare_cluster
    cluster.start_master()
    first = cluster.start_node("n1")
    cluster.wait_nodes_up(1)
    state_dir = cluster.root / "node-n1"      # where start_node keeps n1's state

    twin = run_program(agent_argv(cluster, "n1-twin", state_dir), timeout=30)
    assert twin.returncode == 1, (twin.returncode, twin.stderr)
    [line] = twin.stderr.strip().splitlines()
    assert str(state_dir) in line and "in use" in line, line

    assert first.alive()
    job_id = cluster.submit("true", "--gpus", "1", cwd=workdir)
    assert cluster.wait_job_state(job_id, FINISHED)["state"] == "COMPLETED"


def test_job_end_lost_with_the_master_is_settled_from_the_registration(bare_cluster, workdir):
    cluster = bare_cluster
    cluster.start_master(0, 0, "--node-dead-timeout", str(DEAD_TIMEOUT))
    node = cluster.start_node("n1")
    cluster.wait_nodes_up(1)
    job_id = cluster.submit(wait_for_file_sh("release") + "; echo finished; exit 3", "--gpus", "1", cwd=workdir)
    cluster.wait_job_state(job_id, "RUNNING")

    # The master stops reading: the job's output and end go into its socket, and die with it.
    port, pub_port = cluster.port, cluster.pub_port
    cluster.master.signal(signal.SIGSTOP)
    (workdir / "release").touch()
    poll(lambda: f"job {job_id} rank 0 exited with code 3" in node.log.read_text(), 20, "the job to end on the node")
    assert cluster.stop(cluster.master, signal.SIGKILL) == -signal.SIGKILL
    cluster.start_master(port, pub_port, "--node-dead-timeout", str(DEAD_TIMEOUT))

    job = cluster.wait_job_state(job_id, FINISHED, timeout=30)
    assert (job["state"], job["exit_code"], job["signal"]) == ("FAILED", 3, None), job
    poll(lambda: {(o["stream"], o["size"]) for o in cluster.job(job_id)["outputs"]} >= {("stdout", 9)}, 10,
         "the job's output to be sent again")
