"""--after bookkeeping (zmgpu/master/dependencies.py) on a plain ClusterState: no sockets, no daemons."""

from helpers import job_record
from zmgpu.master.dependencies import Dependencies
from zmgpu.master.state import ClusterState, JobRecord
from zmgpu.model import JobState


def job(job_id: str, after=(), array_id=None, after_any=False) -> JobRecord:
    return job_record(job_id, gpus=0, after=tuple(after), after_any=after_any, array_job_id=array_id)


def array(state: ClusterState, array_id: str, size: int, after=(), after_any=False) -> list[JobRecord]:
    template = job("", after, array_id, after_any)
    tasks = []
    for index in range(size):
        task = template.copy()     # as a submit makes them: the tasks share one after tuple
        task.job_id = f"{array_id}_{index}"
        state.jobs[task.job_id] = task
        tasks.append(task)
    state.arrays[array_id] = [task.job_id for task in tasks]
    return tasks


def end(state: ClusterState, deps: Dependencies, record: JobRecord, how: JobState) -> list[str]:
    record.state = how
    return deps.ended(record)


def test_an_array_waits_as_one_for_each_task_it_names_and_learns_of_each_end():
    state = ClusterState()
    deps = Dependencies(state)
    first = array(state, "aaaaaaaa", 3)
    single = state.jobs["cccccccc"] = job("cccccccc")
    waiting = array(state, "bbbbbbbb", 1000, after=["aaaaaaaa", "cccccccc", "aaaaaaaa_1"])
    for task in waiting:
        deps.track(task)
    # One entry per dependency, for the array as a whole: not one per task that waits.
    assert deps.dependents == {**{task.job_id: {"bbbbbbbb"} for task in first}, "cccccccc": {"bbbbbbbb"}}
    assert deps.unmet == {"bbbbbbbb": 4}
    waiting_ids = [task.job_id for task in waiting]

    # Only an end that changes something for the waiting tasks hands them back: not one of several.
    assert end(state, deps, first[0], JobState.COMPLETED) == []
    assert end(state, deps, first[0], JobState.COMPLETED) == []       # an end is counted once
    assert deps.waits(waiting[7]) and deps.failure(waiting[7]) is None
    assert end(state, deps, single, JobState.TIMEOUT) == waiting_ids    # the first to fail
    assert deps.failure(waiting[7]) == "dependency cccccccc ended TIMEOUT"
    assert end(state, deps, first[1], JobState.COMPLETED) == []
    assert end(state, deps, first[2], JobState.COMPLETED) == waiting_ids   # the last
    assert not deps.waits(waiting[7])


def test_what_ended_before_a_job_was_tracked_counts_and_after_any_never_fails():
    state = ClusterState()
    deps = Dependencies(state)
    done, failed, running = (array(state, "aaaaaaaa", 3))
    done.state, failed.state = JobState.COMPLETED, JobState.FAILED
    strict = state.jobs["bbbbbbbb"] = job("bbbbbbbb", ["aaaaaaaa", "gone0000"])   # gone0000: long forgotten
    lenient = state.jobs["cccccccc"] = job("cccccccc", ["aaaaaaaa"], after_any=True)
    deps.track(strict)
    deps.track(lenient)
    assert deps.failure(strict) == "dependency aaaaaaaa_1 ended FAILED" and deps.waits(strict)
    assert deps.failure(lenient) is None and deps.waits(lenient)
    end(state, deps, running, JobState.CANCELLED)
    assert not deps.waits(lenient) and deps.failure(lenient) is None
    # A dependency long forgotten (ended and purged before the job was tracked) holds nothing back.
    orphan = state.jobs["dddddddd"] = job("dddddddd", ["gone0000"])
    deps.track(orphan)
    assert not deps.waits(orphan) and deps.failure(orphan) is None


def test_a_waiter_is_forgotten_with_the_last_of_its_jobs():
    state = ClusterState()
    deps = Dependencies(state)
    dep = state.jobs["aaaaaaaa"] = job("aaaaaaaa")
    tasks = array(state, "bbbbbbbb", 2, after=["aaaaaaaa"])
    deps.track(tasks[0])
    del state.jobs[tasks[0].job_id]
    state.arrays["bbbbbbbb"].remove(tasks[0].job_id)
    deps.forget(tasks[0])
    assert "bbbbbbbb" in deps.unmet                   # its other task still waits
    del state.jobs[tasks[1].job_id], state.arrays["bbbbbbbb"]
    deps.forget(tasks[1])
    assert deps.unmet == {} and end(state, deps, dep, JobState.COMPLETED) == []
