"""End to end: a job's lifecycle through a real master, real node agents and the real ``zmgpu`` CLI.

Time limits, dependencies, arrays, requeue after a node failure, finished-job retention, and what
``zmgpu queue``, ``show`` and ``wait`` print.  The module's cluster (``life``: nodes n1 and n2 with two
simulated GPUs each, a master with a default and a maximum time limit) is shared, so every test
leaves it idle; the requeue and retention tests start clusters of their own.
"""

import json
import re
import signal
import subprocess

import pytest

from conftest import (FINISHED, KILL_GRACE, NODE_TIMEOUT, as_user, make_cluster, one_line_error, pid_alive,
                      poll, queue_table, written)
from helpers import hold_sh, release
from zmgpu.protocol import MsgType

DEFAULT_LIMIT, MAX_LIMIT = 300, 600
#: A time limit of 2 s ends after the limit, the job's reaction to SIGTERM (at most the grace) and
#: a margin for a loaded machine.
TIMEOUT_DEADLINE = 2 + KILL_GRACE + 8


@pytest.fixture(scope="module")
def life_cluster(tmp_path_factory):
    config = {"default_time_limit": "5:00", "max_time_limit": "10:00"}
    yield from make_cluster(tmp_path_factory.mktemp("life"), {"n1": 2, "n2": 2}, config)


@pytest.fixture
def life(life_cluster):
    """The module's cluster; whatever a failed test left running is cancelled after it."""
    yield life_cluster
    life_cluster.cancel_leftovers()


def jobs_of(cluster, *ids) -> dict[str, dict]:
    """The master's current dicts of these jobs (an array id stands for its tasks), by job id."""
    reply = cluster.request(MsgType.QUEUE, all=True, job_ids=list(ids))
    assert reply is not None and reply["ok"], reply
    return {job["job_id"]: job for job in reply["jobs"]}


# -- time limits ----------------------------------------------------------------------------------

def test_time_limit_ends_the_job_timeout_with_nothing_left_running(life, workdir):
    plain = life.submit("echo $$ > plain.pid; sleep 60 & echo $! > child.pid; wait", "--time", "0:02",
                        cwd=workdir)
    # A job that catches SIGTERM and exits 0 still ran out of time.
    trapping = life.submit("trap 'echo term > got.term; exit 0' TERM; sleep 60 & echo $! > trap.pid; wait",
                           "--time", "0:02", cwd=workdir)
    pids = [int(written(workdir / name)) for name in ("plain.pid", "child.pid", "trap.pid")]
    for job_id in (plain, trapping):
        job = life.wait_job_state(job_id, FINISHED, timeout=TIMEOUT_DEADLINE)
        assert job["state"] == "TIMEOUT", job
        assert job["time_limit"] == 2
        assert "time limit" in job["reason"] and "0:02" in job["reason"], job["reason"]
        assert 2 <= job["end_time"] - job["start_time"] < 2 + KILL_GRACE + 3, job
    assert written(workdir / "got.term") == "term"
    poll(lambda: not any(pid_alive(pid) for pid in pids), 5, "every process of the timed-out jobs to be gone")


def test_time_over_the_maximum_is_refused_at_submit(life, workdir):
    proc = life.cli("submit", "--time", "10:01", "echo never-queued", cwd=workdir, check=False)
    line = one_line_error(proc)
    assert "maximum" in line and "10:00" in line, line
    assert not [j for j in life.queue_json()["jobs"] if j["command"] == "echo never-queued"]


def test_default_time_limit_applies_to_a_job_without_time(life, workdir):
    unlimited = life.submit("true", cwd=workdir)
    limited = life.submit("true", "--time", "1:30", cwd=workdir)
    at_max = life.submit("true", "--time", "10:00", cwd=workdir)
    done = life.wait_jobs_ended([unlimited, limited, at_max])
    assert [done[j]["time_limit"] for j in (unlimited, limited, at_max)] == [DEFAULT_LIMIT, 90, MAX_LIMIT]
    assert all(job["state"] == "COMPLETED" for job in done.values()), done


# -- dependencies ---------------------------------------------------------------------------------

def test_after_starts_only_once_the_dependency_completed(life, workdir):
    first = life.submit(hold_sh("release"), "--gpus", "1", cwd=workdir)
    second = life.submit("true", "--gpus", "1", "--after", first, cwd=workdir)
    life.wait_job_state(first, "RUNNING")
    waiting = life.job(second)
    # GPUs are free: only the dependency holds it back.
    assert (waiting["state"], waiting["reason"], waiting["after"]) == ("PENDING", "Dependency", [first])

    release(workdir, "release")
    done = life.wait_jobs_ended([first, second])
    assert done[first]["state"] == "COMPLETED" and done[second]["state"] == "COMPLETED", done
    assert done[second]["start_time"] >= done[first]["end_time"]


def test_failed_dependency_cancels_after_but_not_after_any(life, workdir):
    first = life.submit(hold_sh("release", "exit 3"), cwd=workdir)
    strict = life.submit("echo ran > strict.txt", "--after", first, cwd=workdir)
    lenient = life.submit("echo ran > lenient.txt", "--after", first, "--after-any", cwd=workdir)
    life.wait_job_state(first, "RUNNING")
    assert [life.job(j)["reason"] for j in (strict, lenient)] == ["Dependency", "Dependency"]

    release(workdir, "release")
    done = life.wait_jobs_ended([first, strict, lenient])
    assert (done[first]["state"], done[first]["exit_code"]) == ("FAILED", 3)
    assert done[strict]["state"] == "CANCELLED" and first in done[strict]["reason"], done[strict]
    assert done[strict]["start_time"] is None and not (workdir / "strict.txt").exists()
    assert done[lenient]["state"] == "COMPLETED", done[lenient]
    assert (workdir / "lenient.txt").read_text() == "ran\n"


# -- arrays ---------------------------------------------------------------------------------------

ARRAY_TASK = ('echo "$ZMGPU_ARRAY_JOB_ID $ZMGPU_ARRAY_TASK_ID $(date +%s.%N)" > start.$ZMGPU_ARRAY_TASK_ID; '
              + hold_sh("release.$ZMGPU_ARRAY_TASK_ID", "date +%s.%N > end.$ZMGPU_ARRAY_TASK_ID"))


def test_an_array_after_an_array_waits_for_every_task_and_one_failure_cancels_it(life, workdir):
    first = life.submit(hold_sh("release.$ZMGPU_ARRAY_TASK_ID", 'test "$ZMGPU_ARRAY_TASK_ID" != 2'),
                        "--array", "0-2", cwd=workdir)
    strict = life.submit("true", "--array", "0-3", "--after", first, cwd=workdir)
    lenient = life.submit("true", "--array", "0-1", "--after", first, "--after-any", cwd=workdir)
    waiting = [f"{strict}_{i}" for i in range(4)] + [f"{lenient}_{i}" for i in range(2)]
    release(workdir, "release.0", "release.1")
    life.wait_jobs_ended([f"{first}_0", f"{first}_1"])
    # The array id stands for every task, and one of them still runs.
    assert {(job["state"], job["reason"], tuple(job["after"])) for job in map(life.job, waiting)} == {
        ("PENDING", "Dependency", (first,))}

    release(workdir, "release.2")
    done = life.wait_jobs_ended([f"{first}_2", *waiting])
    assert done[f"{first}_2"]["state"] == "FAILED"
    assert {(done[j]["state"], done[j]["reason"]) for j in waiting[:4]} == {
        ("CANCELLED", f"dependency {first}_2 ended FAILED")}
    assert {done[j]["state"] for j in waiting[4:]} == {"COMPLETED"}


def test_array_never_runs_more_than_its_limit(life, workdir):
    """Four GPUs are free, so only the %2 keeps the array at two tasks at once."""
    array_id = life.submit(ARRAY_TASK, "--array", "0-7%2", "--gpus", "1", cwd=workdir)
    life.wait_job_state(f"{array_id}_0", "RUNNING")
    life.wait_job_state(f"{array_id}_1", "RUNNING")
    cells = queue_table(life, "--array")[1]
    assert [cells[f"{array_id}_{i}"] for i in range(2, 8)] == ["(ArrayLimit)"] * 6, cells
    # Without --array, as squeue does: the tasks waiting for the same reason share one line.
    lines, cells = queue_table(life)
    assert cells[f"{array_id}_[2-7%2]"] == "(ArrayLimit)", lines
    assert sorted(job_id for job_id in cells if job_id.startswith(array_id)) == [
        f"{array_id}_0", f"{array_id}_1", f"{array_id}_[2-7%2]"], lines
    # Named twice (the array, and a task of it), a task is listed once.
    listed = life.request(MsgType.QUEUE, user="tester", job_ids=[array_id, f"{array_id}_5"], collapse=True,
                          fields=["job_id", "state"])
    assert listed is not None and listed["ok"], listed
    assert listed["jobs"] == [{"job_id": f"{array_id}_0", "state": "RUNNING"},
                              {"job_id": f"{array_id}_1", "state": "RUNNING"},
                              {"job_id": f"{array_id}_[2-7%2]", "state": "PENDING", "tasks": 6}]
    most_running = 0

    def all_done():
        nonlocal most_running
        tasks = jobs_of(life, array_id)
        assert len(tasks) == 8, sorted(tasks)
        running = [t for t in tasks.values() if t["state"] == "RUNNING"]
        assert len(running) <= 2, [t["job_id"] for t in running]
        most_running = max(most_running, len(running))
        for task in tasks.values():
            if task["state"] == "PENDING":
                assert task["reason"] == "ArrayLimit", task
        for task in running:
            release(workdir, f"release.{task['array_task_id']}")
        return all(t["state"] in FINISHED for t in tasks.values()) and tasks

    tasks = poll(all_done, 40, "every task of the array to end")
    assert most_running == 2
    assert sorted(tasks) == [f"{array_id}_{i}" for i in range(8)]
    for task_id, task in tasks.items():
        assert task["state"] == "COMPLETED", task
        assert (task["array_job_id"], f"{array_id}_{task['array_task_id']}") == (array_id, task_id)

    intervals = []
    for index in range(8):
        job_id, task_index, started = (workdir / f"start.{index}").read_text().split()
        assert (job_id, task_index) == (array_id, str(index))
        intervals.append((float(started), float((workdir / f"end.{index}").read_text())))
    overlaps = max(sum(1 for s, e in intervals if s <= start < e) for start, _ in intervals)
    assert overlaps <= 2, intervals


def test_cancel_one_array_task_then_the_whole_array(life, workdir):
    array_id = life.submit(hold_sh("release.$ZMGPU_ARRAY_TASK_ID"), "--array", "0-5", "--gpus", "1",
                           cwd=workdir)
    tasks = [f"{array_id}_{i}" for i in range(6)]
    for task_id in tasks[:4]:
        life.wait_job_state(task_id, "RUNNING")
    assert {j["state"] for j in jobs_of(life, *tasks[4:]).values()} == {"PENDING"}

    proc = life.cli("cancel", tasks[3])
    assert tasks[3] in proc.stdout
    assert life.wait_job_state(tasks[3], FINISHED, timeout=KILL_GRACE + 8)["state"] == "CANCELLED"
    life.wait_job_state(tasks[4], "RUNNING")   # the freed GPU goes to the next task
    states = {job_id: job["state"] for job_id, job in jobs_of(life, array_id).items()}
    assert states == {**dict.fromkeys(tasks[:3], "RUNNING"), tasks[3]: "CANCELLED", tasks[4]: "RUNNING",
                      tasks[5]: "PENDING"}

    proc = life.cli("cancel", array_id)
    assert array_id in proc.stdout
    done = life.wait_jobs_ended(tasks, timeout=KILL_GRACE + 8)
    assert {job["state"] for job in done.values()} == {"CANCELLED"}, done
    assert done[tasks[5]]["start_time"] is None


# -- requeue --------------------------------------------------------------------------------------

def test_requeue_after_node_failure_keeps_the_id_and_runs_elsewhere(fresh_pair, workdir):
    cluster = fresh_pair
    # Each attempt records where it ran and waits for a file named after its node.
    command = "echo $ZMGPU_NODE_ID >> ran.on; " + hold_sh("release.$ZMGPU_NODE_ID")
    requeued = cluster.submit(command, "--gpus", "2", "--requeue", cwd=workdir)
    lost = cluster.submit(command, "--gpus", "2", cwd=workdir)
    # Both go to n1: the allocator fills the tightest node, and takes n1 on a tie.
    placed = {cluster.wait_job_state(j, "RUNNING")["allocation"][0]["node_id"] for j in (requeued, lost)}
    assert placed == {"n1"}
    # n2 is busy, so the requeued job has to wait in the queue where it can be seen.
    blocker = cluster.submit(hold_sh("release.blocker"), "--gpus", "4", cwd=workdir)
    assert cluster.wait_job_state(blocker, "RUNNING")["allocation"][0]["node_id"] == "n2"

    cluster.stop(cluster.nodes["n1"], signal.SIGKILL)
    back = cluster.wait_job_state(requeued, "PENDING", timeout=NODE_TIMEOUT + 5)
    assert back["job_id"] == requeued and back["requeue_count"] == 1 and back["allocation"] == [], back
    failed = cluster.wait_job_state(lost, FINISHED, timeout=5)
    assert failed["state"] == "NODE_FAIL" and failed["requeue_count"] == 0, failed

    release(workdir, "release.blocker")
    again = cluster.wait_job_state(requeued, "RUNNING")
    assert [a["node_id"] for a in again["allocation"]] == ["n2"]
    release(workdir, "release.n2")
    done = cluster.wait_job_state(requeued, FINISHED)
    assert (done["state"], done["requeue_count"], done["exit_code"]) == ("COMPLETED", 1, 0), done
    assert sorted(written(workdir / "ran.on").split()) == ["n1", "n1", "n2"]


# -- retention ------------------------------------------------------------------------------------

@pytest.fixture
def forgetful(tmp_path):
    """A cluster whose master keeps finished jobs for one second."""
    yield from make_cluster(tmp_path / "cluster", {"n1": 1}, {"finished_retention": 1})


def test_finished_job_is_forgotten_after_the_retention_time(forgetful, workdir):
    job_id = forgetful.submit("true", cwd=workdir)
    assert forgetful.wait_job_state(job_id, FINISHED)["state"] == "COMPLETED"
    poll(lambda: job_id not in jobs_of(forgetful, job_id), 5, "the finished job to be forgotten")
    listed = json.loads(forgetful.cli("queue", "--all", "--json").stdout)["jobs"]
    assert job_id not in {job["job_id"] for job in listed}
    assert forgetful.request(MsgType.JOB, job_id=job_id)["error"] == "UNKNOWN_JOB"
    assert job_id in one_line_error(forgetful.cli("show", job_id, check=False))


# -- queue, show, wait ----------------------------------------------------------------------------

def test_queue_shows_why_jobs_wait_and_filters(life, workdir):
    finished = life.submit("true", cwd=workdir)
    life.wait_job_state(finished, "COMPLETED")
    everywhere = life.submit(hold_sh("release"), "--gpus", "4", "--name", "a-very-long-job-name-" * 3,
                             cwd=workdir)
    life.wait_job_state(everywhere, "RUNNING")
    resources = life.submit(hold_sh("release"), "--gpus", "2", cwd=workdir)
    priority = life.submit(hold_sh("release"), "--gpus", "1", cwd=workdir)
    dependent = life.submit("true", "--after", everywhere, cwd=workdir)
    others = life.submit(hold_sh("release"), cwd=workdir, env=as_user("zmgpu-other"))
    life.wait_job_state(others, "RUNNING")
    try:
        lines, cells = queue_table(life)
        assert cells[resources] == "(Resources)"
        assert cells[priority] == "(Priority)"
        assert cells[dependent] == "(Dependency)"
        assert cells[everywhere].startswith(("n1:0,1", "n2:0,1")), cells[everywhere]
        assert finished not in cells and set(cells) == {everywhere, resources, priority, dependent, others}

        assert set(queue_table(life, "--state", "PD")[1]) == {resources, priority, dependent}
        assert set(queue_table(life, "--state", "RUNNING")[1]) == {everywhere, others}
        assert set(queue_table(life, "--user", "zmgpu-other")[1]) == {others}
        shown = json.loads(life.cli("queue", "--json", "--user", "zmgpu-other").stdout)["jobs"]
        assert [(j["job_id"], j["user"]) for j in shown] == [(others, "zmgpu-other")]
        assert finished in queue_table(life, "--all")[1]
        assert set(queue_table(life, "--state", "CD")[1]) >= {finished}
    finally:
        release(workdir, "release")
    done = life.wait_jobs_ended([everywhere, resources, priority, dependent, others])
    assert {job["state"] for job in done.values()} == {"COMPLETED"}, done


def test_show_prints_every_field(life, workdir):
    first = life.submit("true", cwd=workdir)
    life.wait_job_state(first, "COMPLETED")
    job_id = life.submit(hold_sh("release"), "--name", "shown", "--time", "1:00", "--requeue", "--gpus", "1",
                         "--after", first, cwd=workdir)
    try:
        job = life.wait_job_state(job_id, "RUNNING")
        text = life.cli("show", job_id).stdout
    finally:
        release(workdir, "release")
    fields = dict(re.findall(r"^(\w+): (.*)$", text, re.MULTILINE))
    # One line per field of the job's dict (RunTime comes on top of them).
    assert len(fields) >= len(job), (sorted(job), text)
    [where] = job["allocation"]
    expected = {"JobId": job_id, "Name": "shown", "State": "RUNNING", "TimeLimit": "1:00", "Requeue": "yes",
                "RequeueCount": "0", "After": first, "Gpus": "1", "WorkDir": str(workdir),
                "User": job["user"], "Priority": "0"}
    assert {key: fields.get(key) for key in expected} == expected, text
    assert f"{where['node_id']}:{where['gpu_indices'][0]}" in fields["Allocation"]
    assert life.wait_job_state(job_id, FINISHED)["state"] == "COMPLETED"
    assert "deadbeef" in one_line_error(life.cli("show", "deadbeef", check=False))


def test_a_check_for_ended_jobs_gets_only_those_and_no_nodes(life, workdir):
    """What Client.wait asks each interval: the ended jobs among those given, without the cluster's nodes."""
    running = life.submit(hold_sh("check"), cwd=workdir)
    ended = life.submit("true", cwd=workdir)
    life.wait_job_state(ended, "COMPLETED")
    life.wait_job_state(running, "RUNNING")
    with life.client() as client:
        checked = client.queue(all=True, job_ids=[running, ended], states=FINISHED, nodes=False)
        assert ([job["job_id"] for job in checked["jobs"]], checked["nodes"]) == ([ended], [])
        assert client.queue(job_ids=[running])["nodes"], "nodes are listed unless left out"
        # The queue table's question: no GPU here is used by processes zmgpu did not start.
        assert client.queue(job_ids=[running], nodes="foreign")["nodes"] == []
    # A null is no choice: every node, as when left out.
    listed = life.request(MsgType.QUEUE, job_ids=[running], nodes=None)
    assert listed is not None and listed["ok"] and listed["nodes"], listed
    release(workdir, "check")
    life.wait_job_state(running, "COMPLETED")


def test_wait_exits_with_the_first_failure(life, workdir):
    failing = life.submit(hold_sh("release", "exit 3"), cwd=workdir)
    passing = life.submit("true", cwd=workdir)
    also_failing = life.submit("exit 5", cwd=workdir)
    waiter = subprocess.Popen(life.cli_argv("wait", failing, passing), env=life.env, cwd=workdir,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        life.wait_job_state(passing, "COMPLETED")
        assert life.job(failing)["state"] == "RUNNING"
        assert waiter.poll() is None, "zmgpu wait returned while a job still runs"
        release(workdir, "release")
        out, err = waiter.communicate(timeout=20)
    finally:
        waiter.kill()
    assert waiter.returncode == 3, (out, err)
    assert failing in err and "Traceback" not in err
    assert life.cli("wait", passing).returncode == 0
    assert life.cli("wait", passing, failing, also_failing, check=False).returncode == 3
    assert life.cli("wait", also_failing, failing, check=False).returncode == 5
