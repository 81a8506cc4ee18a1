"""When the master runs a scheduling pass: a job that joins the queue behind the job the last pass stopped at
(blocked, with an unknown start, or once every free GPU is the blocked job's) cannot start before it, and
costs no pass until something else changes, unless it needs no free GPU (CPU-only, or sharing GPUs) or ends
by the time that job's reservation starts; the reservation counts the jobs the same pass started; the reasons
of jobs a pass did not reach.  And when it sends KILLs for a gang job
whose rank failed: once per node, again only if unheeded, and never to a later attempt.

In-process: the master's own JobService, Reactor (on loopback), Store and OutputSpool; the allocator is
wrapped only to count its passes, the reactor's send only to see the KILLs, and the service's kill_ranks only
to see their reasons.
"""

import logging
import time

import pytest

from helpers import job_record, sim_node

from zmgpu.master import jobs as jobs_module
from zmgpu.master.output import OutputSpool
from zmgpu.master.reactor import Reactor
from zmgpu.master.state import ClusterState, JobRecord
from zmgpu.master.store import Store
from zmgpu.model import JobState


@pytest.fixture
def service(tmp_path, monkeypatch):
    log = logging.getLogger("test.passes")
    reactor = Reactor("127.0.0.1", 0, 0, log)
    store = Store(str(tmp_path))
    state = ClusterState()
    state.nodes["n1"] = sim_node("n1", 1)
    service = jobs_module.JobService(state, reactor, OutputSpool(str(tmp_path)), store, kill_grace=1.0,
                                     max_requeue=0, user_gpu_limit=None, retention=3600.0, log=log)
    service.passes = 0
    real = jobs_module.allocator.schedule

    def counted(pending, view, startable_behind):
        service.passes += 1
        return real(pending, view, startable_behind)

    monkeypatch.setattr(jobs_module.allocator, "schedule", counted)
    yield service
    store.close()
    reactor.close()


def submit(service, name: str, seq: int, **fields) -> JobRecord:
    """A job (one GPU unless ``fields`` say otherwise) queued, and the pass that may follow."""
    job = job_record(name, seq=seq, **fields)
    service.enqueue(job)
    service.schedule()
    return job


def test_a_job_behind_the_blocked_head_costs_no_pass_and_one_ahead_of_it_does(service):
    running = submit(service, "0000000a", 1)
    blocked = submit(service, "0000000b", 2)    # no GPU left, and the running job has no time limit
    assert (running.state, blocked.reason, service.passes) == (JobState.RUNNING, "Resources", 2)

    behind = submit(service, "0000000c", 3)
    assert (behind.reason, service.passes) == ("Priority", 2)

    ahead = submit(service, "0000000d", 4, priority=5)   # goes before the blocked job: it needs a pass
    assert (ahead.reason, blocked.reason, service.passes) == ("Resources", "Priority", 3)

    service.end_rank(running, 0, exit_code=0)             # its GPU comes free
    service.schedule()
    assert (ahead.state, behind.state, service.passes) == (JobState.RUNNING, JobState.PENDING, 4)


def test_gpus_given_back_by_a_job_put_back_in_line_make_a_pass_due(service):
    """A job sent back to the queue (its dispatch failed) returns behind the blocked head, which alone would
    cost no pass: the GPUs it gave back must still bring one."""
    low = submit(service, "0000000a", 1, priority=-5)      # starts: the GPU is free
    service.to_dispatch.clear()                            # as if its dispatch had gone out
    high = submit(service, "0000000b", 2)                  # blocked behind it; the pass stops here
    assert (low.state, high.reason) == (JobState.RUNNING, "Resources")
    service.undo_start(low, "its node could not be reached")
    service.schedule()
    assert (high.state, low.state, low.reason) == (JobState.RUNNING, JobState.PENDING, "Resources")


def test_with_no_gpu_free_jobs_behind_cost_no_pass_unless_they_need_none(service):
    """A pass stops once no GPU is free and the first blocked job has its reservation (time limits known):
    GPU jobs that join behind cost no pass, nor does one sharing GPUs without a time limit (it passes no
    reservation); a CPU-only job does, and starts."""
    running = submit(service, "0000000a", 1, time_limit=100)
    blocked = submit(service, "0000000b", 2, time_limit=100)
    behind = submit(service, "0000000c", 3, time_limit=100)
    assert (running.state, blocked.reason, behind.reason, service.passes) == (JobState.RUNNING, "Resources",
                                                                              "Priority", 3)
    later = submit(service, "0000000d", 4, time_limit=100)
    sharing = submit(service, "0000000f", 6, gpu_mem_mb=1000)
    assert (later.reason, sharing.reason, service.passes) == ("Priority", "Priority", 3)
    cpu = submit(service, "0000000e", 5, time_limit=100, gpus=0)
    assert (cpu.state, service.passes) == (JobState.RUNNING, 4)


def test_a_job_joining_behind_a_reservation_of_the_free_gpus_gets_a_pass_only_if_it_ends_in_time(service):
    """The pass that found every free GPU reserved read on only the jobs that end in time, and stopped at the
    first job behind: a job joining costs a pass only if it may be one of them (and then it starts)."""
    service.state.nodes["n1"] = sim_node("n1", 2)
    running = submit(service, "0000000a", 1, time_limit=3600)
    blocked = submit(service, "0000000b", 2, gpus=2, time_limit=60)   # GPU 1 is free, and reserved for it
    assert (running.state, blocked.reason, service.passes) == (JobState.RUNNING, "Resources", 2)
    long = submit(service, "0000000c", 3, time_limit=7200)    # the last pass read every job: this one costs one
    assert (long.state, long.reason, service.passes) == (JobState.PENDING, "Priority", 3)
    longer = submit(service, "0000000e", 5, time_limit=7200)  # it would outlast the reservation: no pass
    unlimited = submit(service, "0000000f", 6)
    assert (longer.reason, unlimited.reason, service.passes) == ("Priority", "Priority", 3)
    short = submit(service, "0000000d", 4, time_limit=600)
    assert (short.state, service.passes) == (JobState.RUNNING, 4)
    assert [r.gpu_indices for r in short.ranks] == [[1]] and blocked.state is JobState.PENDING


def test_a_job_the_pass_no_longer_reads_does_not_keep_its_own_reason(service):
    """Its user's GPUs held it (UserGPULimit); once they come free the reservation takes them, and the pass no
    longer reads it: it waits behind the blocked job now, and says so."""
    service.state.nodes["n1"] = sim_node("n1", 3)
    service.user_gpu_limit = 3
    mine = submit(service, "0000000a", 1, user="u", time_limit=3600)
    for seq, user in ((2, "v"), (3, "w")):
        submit(service, f"0000000{seq:x}", seq, user=user, time_limit=3600)
    held = submit(service, "0000000d", 4, user="u", gpus=3, time_limit=7200)
    assert held.reason == "UserGPULimit"
    big = submit(service, "0000000e", 5, user="z", gpus=3, time_limit=60, priority=10)
    assert big.reason == "Resources"
    service.end_rank(mine, 0, exit_code=0)
    service.schedule()
    assert (big.reason, held.reason, held.state) == ("Resources", "Priority", JobState.PENDING)


def test_a_cpu_only_job_starts_behind_a_blocked_one_whose_start_is_unknown(service):
    running = submit(service, "0000000a", 1)                   # no time limit: the next one's start is unknown
    blocked = submit(service, "0000000b", 2)
    cpu = submit(service, "0000000c", 3, gpus=0)
    assert (running.state, blocked.reason, cpu.state) == (JobState.RUNNING, "Resources", JobState.RUNNING)


def test_a_pass_that_stops_reads_none_of_the_gpu_jobs_behind_while_a_cpu_only_job_waits(service):
    """With every job's time known, a full cluster and a CPU-only job held by its dependency, a pass reads the
    queue up to the job after the first blocked one (where it stops), and the CPU-only jobs behind that, not
    every GPU job (100,000 pending made each such pass take 0.2 s)."""
    running = submit(service, "0000000a", 1, time_limit=100)
    for seq in range(2, 502):
        submit(service, f"{seq:08x}", seq, time_limit=100)
    held = submit(service, "0000ffff", 600, gpus=0, after=[running.job_id])
    service.requests.clear()
    service.dirty = True
    service.schedule()
    assert held.reason == "Dependency" and set(service.requests) == {"00000002", "00000003", held.job_id}
    service.end_rank(running, 0, exit_code=0)      # the dependency completes, and its GPU comes free
    service.schedule()
    assert held.state is JobState.RUNNING and service.state.jobs["00000002"].state is JobState.RUNNING


def test_with_no_gpu_free_a_job_sharing_gpus_behind_the_blocked_one_still_starts(service):
    service.state.nodes["n1"].gpus = sim_node("n1", 2).gpus
    whole = submit(service, "0000000a", 1, time_limit=100)
    first = submit(service, "0000000b", 2, time_limit=100, gpu_mem_mb=4000)
    blocked = submit(service, "0000000c", 3, time_limit=100)
    assert (whole.state, first.state, blocked.reason) == (JobState.RUNNING, JobState.RUNNING, "Resources")
    second = submit(service, "0000000d", 4, time_limit=100, gpu_mem_mb=4000)    # room for it beside the first
    assert second.state is JobState.RUNNING and second.ranks[0].gpu_indices == first.ranks[0].gpu_indices


def test_a_job_sharing_gpus_that_joins_behind_the_stop_starts(service):
    service.state.nodes["n1"].gpus = sim_node("n1", 2).gpus
    submit(service, "0000000a", 1, time_limit=100)
    submit(service, "0000000b", 2, time_limit=100, gpu_mem_mb=4000)
    submit(service, "0000000c", 3, time_limit=100)
    behind = submit(service, "0000000d", 4, time_limit=100)
    assert service.stop_key == behind.queue_key
    second = submit(service, "0000000e", 5, time_limit=100, gpu_mem_mb=4000)   # read on past the stop job
    assert second.state is JobState.RUNNING


def test_a_job_started_in_the_same_pass_counts_for_the_reservation(service):
    """The first blocked job's start follows from the jobs running, those started by the same pass included:
    left out, its start was unknown, the pass stopped there, and a later job that could backfill waited."""
    service.state.nodes["n1"].gpus = sim_node("n1", 2).gpus
    both = submit(service, "0000000a", 1, gpus=2, time_limit=100)
    first = submit(service, "0000000b", 2, time_limit=1000, priority=1)
    blocked = submit(service, "0000000c", 3, gpus=2, time_limit=50)
    service.end_rank(both, 0, exit_code=0)
    service.schedule()       # "first" starts; "blocked" will start when it ends
    assert (first.state, blocked.reason, service.stop_key) == (JobState.RUNNING, "Resources", None)
    short = submit(service, "0000000d", 4, time_limit=50)      # ends before that: backfills on the free GPU
    assert short.state is JobState.RUNNING


def test_reasons_behind_a_stop_for_want_of_free_gpus_follow_the_dependencies(service):
    running = submit(service, "0000000a", 1, time_limit=100)
    blocked = submit(service, "0000000b", 2, time_limit=100)
    second = submit(service, "0000000c", 3, time_limit=100)
    after = submit(service, "0000000d", 4, time_limit=100, after=[running.job_id])   # not reached, held all the same
    assert (blocked.reason, second.reason, after.reason) == ("Resources", "Priority", "Dependency")
    service.end_rank(running, 0, exit_code=0)
    service.schedule()
    # The blocked job took the GPU, the next one is blocked, and the pass stopped there: the last one waits
    # no longer for its dependency.
    assert (blocked.state, second.reason, after.reason) == (JobState.RUNNING, "Resources", "Priority")


def two_node_gang(service, monkeypatch) -> tuple[JobRecord, list[str]]:
    """A --per-gpu job running on two nodes of two GPUs, and the nodes that KILLs went to."""
    service.state.nodes = {node: sim_node(node, 2, route=node.encode()) for node in ("n1", "n2")}
    kills = []
    real_send = service.reactor.send
    monkeypatch.setattr(service.reactor, "send", lambda route, msg_type, body: (
        kills.append(route.decode()) if msg_type is jobs_module.MsgType.KILL else None)
        or real_send(route, msg_type, body))
    job = submit(service, "0000000a", 1, gpus=4, per_gpu=True)
    service.to_dispatch.clear()                       # as if the dispatches had gone out
    assert [rank.node_id for rank in job.ranks] == ["n1", "n1", "n2", "n2"]
    for rank in job.ranks:
        rank.held_back = False                        # as if rank 0's port had reached the other node
    return job, kills


def test_a_failed_rank_stops_each_node_once_and_again_only_when_unheeded(service, monkeypatch):
    job, kills = two_node_gang(service, monkeypatch)

    service.end_rank(job, 3, exit_code=5)
    assert sorted(kills) == ["n1", "n2"]
    service.end_rank(job, 2, signal=15)               # stopped by that KILL: failed too, but says nothing new
    service.end_rank(job, 0, signal=15)
    assert sorted(kills) == ["n1", "n2"]

    job.kill_sent -= 3600                             # n1 never heeded it (its KILL was lost on the way)
    service.check_time_limits()
    assert sorted(kills) == ["n1", "n1", "n2"]
    service.end_rank(job, 1, signal=15)
    assert job.state is JobState.FAILED and job.reason.startswith("rank 3 on n2")


def test_a_timed_out_gang_is_stopped_once_and_a_repeat_says_the_same(service, monkeypatch):
    job, kills = two_node_gang(service, monkeypatch)
    reasons = []
    real_kill = service.kill_ranks
    monkeypatch.setattr(service, "kill_ranks", lambda j, reason: reasons.append(reason) or real_kill(j, reason))
    job.time_limit, job.start_time = 60, time.time() - 120
    service.check_time_limits()
    assert sorted(kills) == ["n1", "n2"] and reasons == ["time limit reached"]
    service.end_rank(job, 0, signal=15)               # stopped by that KILL: failed, but it is stopping already
    assert sorted(kills) == ["n1", "n2"]
    job.kill_sent -= 3600                             # unheeded: the repeat gives the same reason
    service.check_time_limits()
    assert reasons == ["time limit reached"] * 2 and sorted(kills) == ["n1", "n1", "n2", "n2"]


def test_an_attempt_put_back_in_line_is_not_stopped_for_the_last_ones_failed_rank(service, monkeypatch):
    job, kills = two_node_gang(service, monkeypatch)
    service.end_rank(job, 0, exit_code=1)
    service.undo_start(job, "node n2 refused rank 2")     # back in line before its gang ended
    service.schedule()
    service.to_dispatch.clear()
    kills.clear()
    assert (job.state, job.attempt, job.first_failed) == (JobState.RUNNING, 1, None)
    job.kill_sent -= 3600
    service.check_time_limits()
    assert kills == []
