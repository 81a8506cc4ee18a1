"""Helpers of the master's requests: the check of submitted environments (each user's run of equal ones is
checked and hashed once), and a queue listing's pending array tasks collapsed into one entry per run."""

import pytest

from helpers import job_record, sim_node

from zmgpu.cli.queue import others_lines
from zmgpu.master.requests import Environments, RequestError, collapsed
from zmgpu.master.state import RankRecord
from zmgpu.master.store import env_id
from zmgpu.model import JobState, format_array_spec, parse_array_spec
from zmgpu.protocol import ErrorCode

ENV = {"PATH": "/usr/bin:/bin", "HOME": "/home/alice", "LANG": "C.UTF-8"}


def test_an_equal_environment_is_the_same_checked_one():
    envs = Environments(max_bytes=4096)
    first = envs.checked("alice", dict(ENV))
    again = envs.checked("alice", dict(reversed(ENV.items())))
    assert again is first and first.env_id == env_id(ENV)
    # Another user's equal environment hashes the same, and is checked on its own.
    bobs = envs.checked("bob", dict(ENV))
    assert bobs is not first and bobs.env_id == first.env_id


@pytest.mark.parametrize("bad", [None, ["PATH=/bin"], {"PATH": 5}, {7: "x"}])
def test_a_malformed_environment_is_refused_after_a_good_one(bad):
    envs = Environments(max_bytes=4096)
    first = envs.checked("alice", dict(ENV))
    with pytest.raises(ValueError, match="must map names to strings"):
        envs.checked("alice", bad)
    # What was refused did not replace what the user last had accepted: that one is still the checked one.
    assert envs.checked("alice", dict(ENV)) is first


def test_an_environment_over_the_limit_is_too_large():
    envs = Environments(max_bytes=64)
    with pytest.raises(RequestError) as caught:
        envs.checked("alice", {**ENV, "BIG": "x" * 64})
    assert caught.value.code is ErrorCode.TOO_LARGE and "max_env_bytes" in str(caught.value)


@pytest.mark.parametrize("indices, limit, spec", [
    ([3], None, "3"), ([0, 1, 2, 5, 7, 8], None, "0-2,5,7-8"), ([9, 1, 2, 3], 8, "1-3,9%8"),
    (range(100_000), None, "0-99999"), (range(0, 200_000, 2), None, "0-199998:2"),
    ([0, 1, 2, 5, 7, 9, 11], 2, "0-2,5-11:2%2"), ([1, 5, 7, 8], None, "1,5,7-8"), ([0, 4], None, "0,4")])
def test_an_array_spec_is_written_as_it_is_read(indices, limit, spec):
    assert format_array_spec(indices, limit) == spec
    assert parse_array_spec(spec) == (sorted(indices), limit)


def task(array_id, index, reason="Priority", state=JobState.PENDING, limit=None):
    return job_record(f"{array_id}_{index}", array_job_id=array_id, array_task_id=index, array_limit=limit,
                      state=state, reason=reason)


def test_pending_tasks_waiting_in_a_row_for_the_same_reason_are_one_entry():
    lone = job_record("0000beef", reason="Priority")
    jobs = [task("aaaaaaaa", 0, None, JobState.RUNNING), task("aaaaaaaa", 1, "Resources"),
            *(task("aaaaaaaa", i, limit=4) for i in (2, 3, 4, 7)), lone, task("aaaaaaaa", 8),
            task("bbbbbbbb", 0), task("bbbbbbbb", 1), task("bbbbbbbb", 2, "Dependency")]
    built = []

    def job_dict(job):
        built.append(job.job_id)
        return {"job_id": job.job_id, "reason": job.reason}

    assert collapsed(jobs, job_dict) == [
        {"job_id": "aaaaaaaa_0", "reason": None},           # running: each task is its own line
        {"job_id": "aaaaaaaa_1", "reason": "Resources"},    # a run of one keeps its own id
        {"job_id": "aaaaaaaa_[2-4,7%4]", "reason": "Priority", "tasks": 4},
        {"job_id": "0000beef", "reason": "Priority"},       # not a task: breaks the run
        {"job_id": "aaaaaaaa_8", "reason": "Priority"},
        {"job_id": "bbbbbbbb_[0-1]", "reason": "Priority", "tasks": 2},
        {"job_id": "bbbbbbbb_2", "reason": "Dependency"}]
    # Only the first task of a run has its dict built.
    assert "aaaaaaaa_3" not in built and "bbbbbbbb_1" not in built


def test_a_job_dict_of_chosen_fields_builds_only_those():
    record = task("aaaaaaaa", 3, state=JobState.RUNNING)
    record.ranks = (RankRecord("n1", [0]),)
    asked = []

    def size(key):
        asked.append(key)
        return 0

    whole = record.to_dict(size)
    # The order --json shows: what the job is, then where it stands, then how it ran.
    assert list(whole) == [
        "job_id", "name", "user", "command", "cwd", "gpus", "node_gpu_ids", "interactive", "priority", "time_limit",
        "requeue", "requeue_count", "attempt", "after", "after_any", "array_job_id", "array_task_id", "state",
        "reason", "allocation", "submit_time", "start_time", "end_time", "exit_code", "signal", "outputs",
        "gpu_mem_mb", "per_gpu", "master_port", "peak_gpu_mem_mb"]
    assert record.to_dict(size, frozenset({"job_id", "state", "no_such_key"})) == {
        "job_id": "aaaaaaaa_3", "state": "RUNNING"}
    assert record.to_dict(size, frozenset({"outputs"})) == {"outputs": whole["outputs"]}
    asked.clear()
    record.to_dict(size, frozenset({"job_id"}))
    assert asked == []      # the output sizes are looked up only for "outputs"
    # Each key alone is what the whole dict has under it.
    assert all(record.to_dict(size, frozenset({name})) == {name: value} for name, value in whole.items())
    # Nothing is built from the ranks unless asked (a rank that cannot be read would fail the allocation).
    record.ranks = (object(),)
    assert record.to_dict(size, frozenset({"job_id", "state"})) == {"job_id": "aaaaaaaa_3", "state": "RUNNING"}


@pytest.mark.parametrize("telemetry, listed", [
    ({}, False),                                                                 # nothing reported
    ({1: {"processes": [{"pid": 7, "used_mb": 10, "job_id": "aaaaaaaa"}]}}, False),  # only a job's own process
    ({1: {"busy": True, "processes": []}}, True),                                # busy with no process listed
    ({0: {"processes": [{"pid": 9, "used_mb": 0, "job_id": None}]}}, True),      # a process zmgpu did not start
    ({5: {"busy": True}}, False),                                                # a GPU the node does not offer
])
def test_the_nodes_a_queue_table_asks_for_are_those_it_has_a_line_for(telemetry, listed):
    node = sim_node("n1", 2)
    node.telemetry = telemetry
    assert node.used_by_others() is listed
    assert bool(others_lines([node.to_dict()])) is listed
