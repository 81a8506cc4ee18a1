"""End to end: `zmgpu cancel` leaves nothing of the job running, not even processes that left its session.

The job's children call setsid (out of the rank's process group, as PyTorch DataLoader workers and
daemonised servers do), ignore SIGTERM, and fork grandchildren of their own.  The node agent finds
them by the job id in their environment, and the job is reported CANCELLED only once they are gone.
"""

import sys

import pytest

from conftest import KILL_GRACE, pid_alive, poll
from zmgpu.protocol import MsgType

#: A job that leaves its session behind: ``stubborn.py DIR CHILDREN LEADER_IGNORES_TERM``.  Every
#: process records its pid as an empty file ``DIR/<role>.<pid>`` and then sleeps for ever.
STUBBORN = """\
import os, signal, sys, time

out, children, leader_ignores_term = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"


def record(role):
    path = os.path.join(out, f"{role}.{os.getpid()}")
    open(path + ".tmp", "w").close()
    os.replace(path + ".tmp", path)


os.makedirs(out, exist_ok=True)
for _ in range(children):
    if os.fork() == 0:
        os.setsid()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        record("grandchild" if os.fork() == 0 else "child")
        while True:
            time.sleep(1)
if leader_ignores_term:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
record("leader")
while True:
    time.sleep(1)
"""
CHILDREN = 2
#: Time for the kill on a loaded machine, beyond the grace period itself.
MARGIN = 5


def start_stubborn(cluster, workdir, name: str, pin: str, leader_ignores_term: bool, started: list):
    """Submit the stubborn job pinned to ``pin`` (its id goes to ``started`` at once); its id and pids once
    every process has recorded its own."""
    script = workdir / "stubborn.py"
    script.write_text(STUBBORN)
    # exec: the rank's leader is the program itself, not a shell that SIGTERM would end.
    command = f"exec {sys.executable} {script} {name} {CHILDREN} {int(leader_ignores_term)}"
    job_id = cluster.submit(command, "--node-gpu-ids", pin, cwd=workdir)
    started.append(job_id)
    cluster.wait_job_state(job_id, "RUNNING")
    out = workdir / name

    def recorded():
        pids = [int(p.name.split(".")[1]) for p in out.glob("*.*") if not p.name.endswith(".tmp")]
        return pids if len(pids) == 1 + 2 * CHILDREN else None

    return job_id, poll(recorded, 20, f"every process of job {job_id} to record its pid")


@pytest.mark.parametrize("leader_ignores_term", [False, True], ids=["leader-obeys-term", "leader-ignores-term"])
def test_cancel_kills_children_that_left_the_session(pair, workdir, leader_ignores_term):
    started = []
    try:
        victim, victim_pids = start_stubborn(pair, workdir, "victim", "n1:0", leader_ignores_term, started)
        bystander, bystander_pids = start_stubborn(pair, workdir, "bystander", "n1:1", False, started)
        assert all(map(pid_alive, victim_pids + bystander_pids))

        pair.cli("cancel", victim)
        job = pair.wait_job_state(victim, "CANCELLED", timeout=KILL_GRACE + MARGIN)
        # The agent SIGKILLs the leftovers before it reports the end; only their exit may still be under way.
        poll(lambda: not any(map(pid_alive, victim_pids)), 2, "every process of the cancelled job to be gone")
        assert job["end_time"] is not None

        # Another job on the same node keeps every one of its processes.
        assert pair.job(bystander)["state"] == "RUNNING"
        assert all(map(pid_alive, bystander_pids))
        pair.cli("cancel", bystander)
        pair.wait_job_state(bystander, "CANCELLED", timeout=KILL_GRACE + MARGIN)
        poll(lambda: not any(map(pid_alive, bystander_pids)), 2, "every process of the second job to be gone")
    finally:
        # The cluster is shared with the next test: leave it idle whatever happened here.
        pair.request(MsgType.CANCEL, job_ids=started)
