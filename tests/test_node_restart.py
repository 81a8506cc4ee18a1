"""End to end: a node agent that restarts while its job runs takes the job over.

The job runs in its own session, so it outlives a SIGKILLed agent; the agent started in its place
finds it in the spool directory, reports it to the master, forwards its output and reports its end.
"""

import io
import signal

from conftest import FINISHED, poll
from helpers import STDERR_MARKER, job_command, pattern_chunks, wait_for_file_sh

#: Long enough that the master still counts the job as running when the new agent registers.
NODE_TIMEOUT = 30
BEFORE = 300 * 1024 + 5     # written before the agent is killed; more than one output chunk
DOWN_LINE = "written while the node agent was down"
AFTER_LINE = "written after the node agent came back"


def stdout_size(cluster, job_id) -> int:
    """Bytes of the job's stdout the master holds."""
    return next((o["size"] for o in cluster.job(job_id)["outputs"] if (o["rank"], o["stream"]) == (0, "stdout")), 0)


def test_restarted_node_agent_keeps_the_running_job(bare_cluster, workdir):
    from zmgpu import Client

    cluster = bare_cluster
    cluster.start_master(0, 0, "--node-timeout", str(NODE_TIMEOUT))
    cluster.start_node("n1")
    cluster.wait_nodes_up(1)
    command = "; ".join([
        job_command("spew", str(BEFORE), "0"),
        wait_for_file_sh("agent.killed"), f"echo '{DOWN_LINE}'", "touch down.done",
        wait_for_file_sh("agent.back"), f"echo '{AFTER_LINE}'",
    ])
    job_id = cluster.submit(command, "--gpus", "1", cwd=workdir)
    cluster.wait_job_state(job_id, "RUNNING")
    # The master holds the first part: the new agent sends it again from offset 0, as duplicates.
    poll(lambda: stdout_size(cluster, job_id) == BEFORE, 20, "the first part of the output to reach the master")

    cluster.stop(cluster.nodes["n1"], signal.SIGKILL)
    (workdir / "agent.killed").touch()
    poll((workdir / "down.done").exists, 20, "the job to write while no agent runs")
    cluster.start_node("n1")
    # Only the new agent can forward what the job wrote while no agent was running.
    poll(lambda: stdout_size(cluster, job_id) == BEFORE + len(DOWN_LINE) + 1, 20,
         "the output written while the agent was down to reach the master")
    job = cluster.job(job_id)
    assert job["state"] == "RUNNING", job
    assert [g["job_id"] for g in cluster.node("n1")["gpus"]].count(job_id) == 1

    (workdir / "agent.back").touch()
    job = cluster.wait_job_state(job_id, FINISHED)
    assert (job["state"], job["exit_code"]) == ("COMPLETED", 0), job
    client = Client(host="127.0.0.1", port=cluster.port, pub_port=cluster.pub_port)
    stdout, stderr = io.BytesIO(), io.BytesIO()
    try:
        client.stream(job_id, stdout=stdout, stderr=stderr)
    finally:
        client.close()
    assert stdout.getvalue() == b"".join(pattern_chunks(BEFORE)) + f"{DOWN_LINE}\n{AFTER_LINE}\n".encode()
    assert stderr.getvalue() == STDERR_MARKER
    poll(lambda: all(g["job_id"] is None for g in cluster.node("n1")["gpus"]), 10, "the job's GPU to be released")
    assert cluster.nodes["n1"].alive()
