"""A node upgraded across the spool layout change while a job runs: the older keeper keeps that job, which
ends with its exit status and output; the new agent starts jobs itself meanwhile, and a keeper of its own
once the older one is gone.

The older zmgpu is the real one, taken from this repository's history (skipped without it).
"""

import io
import subprocess
import tarfile

import pytest

from conftest import FINISHED, REPO, poll
from helpers import wait_for_file_sh

#: The last zmgpu with a spool directory per rank (spool layout 1).
OLDER = "fc80c7f"


@pytest.fixture
def older_zmgpu(tmp_path):
    """The ``zmgpu`` package as it was at OLDER, extracted under ``tmp_path``."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", OLDER, "zmgpu"], capture_output=True,
                                 check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip(f"this checkout has no history with {OLDER}")
    dest = tmp_path / "older"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest)
    return dest


def test_an_upgraded_agent_leaves_the_older_keepers_job_alone(bare_cluster, workdir, older_zmgpu):
    cluster = bare_cluster
    cluster.start_master()
    today = cluster.env
    cluster.env = {**today, "PYTHONPATH": str(older_zmgpu)}
    try:
        cluster.start_node("n1", 2)      # the older agent, which starts the older keeper
    finally:
        cluster.env = today
    cluster.wait_nodes_up(1)
    old = cluster.submit("echo before; " + wait_for_file_sh("release") + "; echo after; exit 7", "--gpus", "1",
                         cwd=workdir)
    cluster.wait_job_state(old, "RUNNING")
    cluster.stop(cluster.nodes["n1"])    # the agent stops; its keeper and the job run on
    log = cluster.start_node("n1", 2).log
    poll(lambda: "the job keeper is from an older zmgpu" in log.read_text(), 20, "today's agent to meet it")

    # Started by the agent itself: the older keeper would spool it where today's agent does not look.
    new = cluster.submit("echo new", "--gpus", "1", cwd=workdir)
    assert cluster.wait_job_state(new, FINISHED)["state"] == "COMPLETED"
    assert cluster.cli("logs", new).stdout == "new\n"
    (workdir / "release").touch()
    ended = cluster.wait_job_state(old, FINISHED)
    assert (ended["state"], ended["exit_code"]) == ("FAILED", 7)
    assert cluster.cli("logs", old).stdout == "before\nafter\n"

    # Once the older keeper has gone, today's agent starts a keeper of its own for the next jobs.
    def new_keeper():
        job = cluster.submit("true", "--gpus", "1", cwd=workdir)
        assert cluster.wait_job_state(job, FINISHED)["state"] == "COMPLETED"
        return "job keeper: pid" in log.read_text().split("older zmgpu", 1)[1]

    poll(new_keeper, 30, "a keeper of today's zmgpu", interval=0.5)
