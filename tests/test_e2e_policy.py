"""End to end: queue policy through a real master, real node agents and the real ``zmgpu`` CLI.

Priorities (users may only lower theirs, admins may raise them), EASY backfill (CPU jobs always pass), the
per-user GPU cap, and drain/resume of a node by an admin.  The module's cluster (``policy``: nodes n1 and n2 with four
simulated GPUs each, a master whose admin is the user running the tests) is shared, so every test
leaves it idle and every node resumed; the per-user cap gets a cluster of its own.  Other users are
played by running the CLI with another login name.
"""

import getpass
import json

import pytest

from conftest import FINISHED, as_user, make_cluster, one_line_error, queue_table
from helpers import hold_sh, release
from zmgpu.protocol import MsgType

ADMIN = getpass.getuser()
#: Not in the master's admins list.
ALICE = as_user("zmgpu-alice")


@pytest.fixture(scope="module")
def policy_cluster(tmp_path_factory):
    yield from make_cluster(tmp_path_factory.mktemp("policy"), {"n1": 4, "n2": 4}, {"admins": [ADMIN]})


@pytest.fixture
def policy(policy_cluster):
    """The module's cluster; what a failed test left (jobs, drained nodes) is undone after it."""
    yield policy_cluster
    policy_cluster.cancel_leftovers()
    for node in policy_cluster.queue_json()["nodes"]:
        if node["drain_reason"] is not None:
            policy_cluster.request(MsgType.RESUME, user=ADMIN, node_id=node["node_id"])


def finish(cluster, workdir, names, job_ids):
    """Release every held job and check that all of them completed."""
    release(workdir, *names)
    done = cluster.wait_jobs_ended(job_ids)
    assert {job["state"] for job in done.values()} == {"COMPLETED"}, done


def nodes_of(cluster, job_id) -> list[str]:
    return [a["node_id"] for a in cluster.job(job_id)["allocation"]]


# -- priority -------------------------------------------------------------------------------------

def test_users_may_only_lower_priority_and_admins_may_raise_it(policy, workdir):
    line = one_line_error(policy.cli("submit", "--priority", "5", "true", cwd=workdir, env=ALICE,
                                     check=False))
    assert "permission denied" in line, line
    spec = {"command": "true", "cwd": str(workdir), "env": {}, "gpus": 0, "priority": 5}
    assert policy.request(MsgType.SUBMIT, job=spec)["error"] == "PERMISSION_DENIED"

    # Fill all eight GPUs: 4 on one node, 2 + 1 + 1 on the other, each freed on its own.
    blockers = {name: policy.submit(hold_sh(name), "--gpus", str(gpus), cwd=workdir)
                for name, gpus in (("b4", 4), ("b2", 2), ("b1a", 1), ("b1b", 1))}
    for job_id in blockers.values():
        policy.wait_job_state(job_id, "RUNNING")
    assert nodes_of(policy, blockers["b4"]) != nodes_of(policy, blockers["b2"])

    low = policy.submit(hold_sh("low"), "--gpus", "1", "--priority", "-5", cwd=workdir, env=ALICE)
    default = policy.submit(hold_sh("default"), "--gpus", "1", cwd=workdir)
    assert policy.job(low)["priority"] == -5 and policy.job(low)["user"] == "zmgpu-alice"
    # The later default-priority job is first in line; the lowered one waits behind it.
    assert [policy.job(j)["reason"] for j in (default, low)] == ["Resources", "Priority"]

    release(workdir, "b1a")
    policy.wait_job_state(default, "RUNNING")
    assert policy.job(low)["state"] == "PENDING"

    later = policy.submit(hold_sh("later"), "--gpus", "1", cwd=workdir)
    raised = policy.submit(hold_sh("raised"), "--gpus", "1", "--priority", "5", cwd=workdir)
    assert policy.job(raised)["priority"] == 5
    assert [policy.job(j)["reason"] for j in (raised, later, low)] == ["Resources", "Priority", "Priority"]
    # Behind the job the last pass stopped at, a new job is told why it waits.
    lowest = policy.submit(hold_sh("lowest"), "--gpus", "1", "--priority", "-10", cwd=workdir)
    assert policy.job(lowest)["reason"] == "Priority"

    release(workdir, "b1b")
    policy.wait_job_state(raised, "RUNNING")
    assert [policy.job(j)["state"] for j in (later, low, lowest)] == ["PENDING", "PENDING", "PENDING"]
    release(workdir, "raised")
    policy.wait_job_state(later, "RUNNING")
    assert [policy.job(j)["reason"] for j in (low, lowest)] == ["Resources", "Priority"]

    finish(policy, workdir, ["b4", "b2", "low", "default", "later", "raised", "lowest"],
           [*blockers.values(), low, default, later, raised, lowest])


# -- backfill -------------------------------------------------------------------------------------

def test_short_and_cpu_jobs_backfill_but_a_gpu_job_without_time_does_not(policy, workdir):
    # n1 is taken by a job with no time limit; on n2 a 2-GPU job ends within 30 s.
    filler = policy.submit(hold_sh("filler"), "--gpus", "4", cwd=workdir)
    policy.wait_job_state(filler, "RUNNING")
    ending = policy.submit(hold_sh("ending"), "--gpus", "2", "--time", "0:30", cwd=workdir)
    policy.wait_job_state(ending, "RUNNING")
    assert nodes_of(policy, filler) != nodes_of(policy, ending)
    # The 4-GPU job gets n2 once that job ends: it is reserved, not blocked forever.
    big = policy.submit(hold_sh("big"), "--gpus", "4", cwd=workdir)
    short = policy.submit(hold_sh("short"), "--gpus", "1", "--time", "0:05", cwd=workdir)
    backfilled = policy.wait_job_state(short, "RUNNING")
    assert nodes_of(policy, short) == nodes_of(policy, ending)
    # Later jobs that could delay the big one: no limit at all, or one that outlasts the reservation.
    unbounded = policy.submit(hold_sh("unbounded"), "--gpus", "1", cwd=workdir)
    too_long = policy.submit(hold_sh("too_long"), "--gpus", "1", "--time", "1:00", cwd=workdir)
    waiting = [policy.job(j) for j in (big, unbounded, too_long)]
    assert [(j["state"], j["reason"]) for j in waiting] == [("PENDING", "Resources"), ("PENDING", "Priority"),
                                                            ("PENDING", "Priority")], waiting
    assert backfilled["start_time"] > waiting[0]["submit_time"]
    # A CPU job takes no GPU, so it cannot delay the big one: it runs, time limit or not.
    cpu = policy.submit("true", "--gpus", "0", cwd=workdir)
    assert policy.wait_job_state(cpu, FINISHED)["state"] == "COMPLETED"
    assert policy.job(big)["state"] == "PENDING"

    finish(policy, workdir, ["filler", "ending", "big", "short", "unbounded", "too_long"],
           [filler, ending, big, short, unbounded, too_long])


# -- drain and resume -----------------------------------------------------------------------------

def node_status(cluster) -> dict[str, tuple[str, str | None]]:
    """``zmgpu nodes --json``: each node's status and drain reason."""
    nodes = json.loads(cluster.cli("nodes", "--json").stdout)["nodes"]
    return {n["node_id"]: (n["status"], n["drain_reason"]) for n in nodes}


def test_drain_and_resume_are_for_admins_and_let_running_jobs_finish(policy, workdir):
    assert "permission denied" in one_line_error(policy.cli("drain", "n1", "--reason", "maint", env=ALICE,
                                                            check=False))
    assert "nosuch" in one_line_error(policy.cli("drain", "nosuch", "--reason", "maint", check=False))
    running = policy.submit(hold_sh("running"), "--node-gpu-ids", "n1:0", cwd=workdir)
    policy.wait_job_state(running, "RUNNING")

    policy.cli("drain", "n1", "--reason", "maint")
    assert node_status(policy) == {"n1": ("drained", "maint"), "n2": ("idle", None)}
    listing = policy.cli("nodes", env={"COLUMNS": "80"}).stdout
    [n1_line] = [line for line in listing.splitlines() if line.split()[:1] == ["n1"]]
    assert "drained" in n1_line and "maint" in n1_line, listing

    elsewhere = policy.submit("true", "--gpus", "1", cwd=workdir)
    assert policy.wait_job_state(elsewhere, FINISHED)["state"] == "COMPLETED"
    assert nodes_of(policy, elsewhere) == ["n2"]
    pinned = policy.submit("true", "--node-gpu-ids", "n1:1", cwd=workdir)
    assert policy.wait_job_state(pinned, "PENDING")["reason"] == "NodeDown"
    assert queue_table(policy)[1][pinned] == "(NodeDown)"
    assert policy.job(running)["state"] == "RUNNING"

    release(workdir, "running")
    assert policy.wait_job_state(running, FINISHED)["state"] == "COMPLETED"
    assert policy.job(pinned)["state"] == "PENDING"

    assert "permission denied" in one_line_error(policy.cli("resume", "n1", env=ALICE, check=False))
    assert policy.job(pinned)["state"] == "PENDING"
    policy.cli("resume", "n1")
    assert policy.wait_job_state(pinned, FINISHED)["state"] == "COMPLETED"
    assert nodes_of(policy, pinned) == ["n1"]
    assert node_status(policy) == {"n1": ("idle", None), "n2": ("idle", None)}


# -- per-user GPU cap -----------------------------------------------------------------------------

@pytest.fixture
def capped(tmp_path):
    """One 4-GPU node; nobody may hold more than two GPUs at once."""
    yield from make_cluster(tmp_path / "cluster", {"n1": 4}, {"user_gpu_limit": 2})


def test_per_user_gpu_cap_holds_one_user_back_but_not_others(capped, workdir):
    mine = [capped.submit(hold_sh(f"mine{i}"), "--gpus", "1", cwd=workdir) for i in range(3)]
    capped.wait_job_state(mine[0], "RUNNING")
    capped.wait_job_state(mine[1], "RUNNING")
    other = capped.submit(hold_sh("other"), "--gpus", "1", cwd=workdir, env=ALICE)
    capped.wait_job_state(other, "RUNNING")
    third = capped.job(mine[2])
    assert (third["state"], third["reason"]) == ("PENDING", "UserGPULimit"), third
    assert queue_table(capped)[1][mine[2]] == "(UserGPULimit)"

    release(workdir, "mine0")
    capped.wait_job_state(mine[2], "RUNNING")
    finish(capped, workdir, ["mine1", "mine2", "other"], [*mine, other])
