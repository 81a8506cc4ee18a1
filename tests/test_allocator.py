"""Placement policy, called as plain functions: no sockets, no daemons."""

import random
import sys

import pytest

from helpers import job_record

from zmgpu.master.allocator import (NodeCapacity, PastStop, Request, Reservation, Running, View, WaitReason, _backfill,
                                    _Pool, _reserve, infeasible, past_stop, place, schedule)

FOUR = {"a": [0, 1, 2, 3]}


def view(free, capacity=None, **kw):
    return View(free=free, capacity=capacity or free, **kw)


class Reading:
    """A queue to hand a pass as it reads it (``pending()``), recording what it read (``read``)."""

    def __init__(self, queue: list):
        self.queue, self.read = queue, []

    def __call__(self):
        for req in self.queue:
            self.read.append(req.job_id)
            yield req


def test_single_node_tightest_fit():
    free = {"a": [0, 1, 2, 3], "b": [2, 3]}
    assert place(Request("j", 2), free, {}) == [("b", [2, 3])]
    assert place(Request("j", 3), free, {}) == [("a", [0, 1, 2])]


def test_gang_spans_nodes_all_or_nothing():
    free = {"a": [0, 1, 2, 3], "b": [0, 1, 2, 3]}
    assert place(Request("j", 6), free, {}) == [("a", [0, 1, 2, 3]), ("b", [0, 1])]
    assert place(Request("j", 9), free, {}) is None


def test_pins_need_exactly_their_gpus():
    free = {"a": [0, 1], "b": [3]}
    assert place(Request("j", 3, {"a": [0, 1], "b": [3]}), free, {}) == [("a", [0, 1]), ("b", [3])]
    assert place(Request("j", 1, {"b": [2]}), free, {}) is None
    assert place(Request("j", 1, {"c": [0]}), free, {}) is None


def test_cpu_job_goes_to_least_loaded_node():
    assert place(Request("j", 0), {"a": [], "b": []}, {"a": 2, "b": 1}) == [("b", [])]
    assert place(Request("j", 0), {}, {}) is None


def test_schedule_gives_disjoint_gpus_in_order():
    starts, waits, _, _ = schedule([Request(f"j{i}", 1) for i in range(5)], view(FOUR))
    assert [j for j, _ in starts] == ["j0", "j1", "j2", "j3"]
    assert sorted(p[0][1][0] for _, p in starts) == [0, 1, 2, 3]
    assert waits == {"j4": WaitReason.RESOURCES}


def test_blocked_job_without_known_start_blocks_everyone_behind_it():
    # 2 GPUs free, a running job of unknown length holds the other 2: the 4-GPU job's start is unknown.
    v = view({"a": [0, 1]}, FOUR, running=[Running([("a", [2, 3])])])
    pending = Reading([Request("big", 4), Request("small", 1, time_limit=60), Request("other", 1)])

    # The queue's index finds no job behind that could start with the GPUs taken (none is CPU-only) ...
    starts, waits, stopped, _ = schedule(pending(), v, lambda job_id, within, room: ())
    assert (starts, stopped) == ([], "big")
    assert waits == {"big": WaitReason.RESOURCES}
    # ... so the pass did not even read the rest of a long queue.
    assert pending.read == ["big"]


def test_backfill_that_must_happen_short_job_ends_before_the_reservation():
    v = view({"a": [0, 1]}, FOUR, running=[Running([("a", [2, 3])], end=1000.0)], now=0.0)
    starts, waits, _, _ = schedule([Request("big", 4), Request("short", 1, time_limit=500)], v)
    assert [j for j, _ in starts] == ["short"]
    assert waits == {"big": WaitReason.RESOURCES}


def test_backfill_that_must_not_happen_long_or_unlimited_jobs_would_delay_it():
    v = view({"a": [0, 1]}, FOUR, running=[Running([("a", [2, 3])], end=1000.0)], now=0.0)
    starts, waits, _, _ = schedule([Request("big", 4), Request("long", 1, time_limit=5000),
                              Request("nolimit", 1)], v)
    # Every free GPU is the big job's: a job that would outlast its reservation is not even read (the job
    # service tells the jobs a pass did not read that they wait behind: Priority).
    assert starts == [] and waits == {"big": WaitReason.RESOURCES}


def test_long_job_may_backfill_onto_gpus_the_reservation_does_not_need():
    # Two nodes; the blocked 4-GPU job will take node a when its running job ends; node b is spare.
    free = {"a": [0, 1], "b": [0, 1]}
    capacity = {"a": [0, 1, 2, 3], "b": [0, 1]}
    running = [Running([("a", [2, 3])], end=100.0)]
    pending = [Request("big", 4, {"a": [0, 1, 2, 3]}), Request("long", 2, time_limit=10_000)]
    starts, waits, _, _ = schedule(pending, view(free, capacity, running=running))
    assert starts == [("long", [("b", [0, 1])])]
    assert waits == {"big": WaitReason.PINNED_GPUS_BUSY}


def test_starvation_avoided_a_stream_of_small_jobs_cannot_pass_a_big_one_forever():
    # Each small job's limit runs past the reservation, so none may take the GPUs the big job waits for.
    running = [Running([("a", [1, 2, 3])], end=50.0)]
    pending = [Request("big", 4)] + [Request(f"s{i}", 1, time_limit=100) for i in range(5)]
    starts, waits, _, _ = schedule(pending, view({"a": [0]}, FOUR, running=running))
    assert starts == [] and waits == {"big": WaitReason.RESOURCES}


def test_per_user_cap_holds_only_that_users_jobs():
    running = [Running([("a", [0])], user="ann")]
    pending = [Request("ann2", 2, user="ann"), Request("bob1", 2, user="bob")]
    starts, waits, _, _ = schedule(pending, view({"a": [1, 2, 3]}, FOUR, running=running, user_gpu_limit=2))
    assert [j for j, _ in starts] == ["bob1"]
    assert waits == {"ann2": WaitReason.USER_GPU_LIMIT}


def test_array_limit_and_dependency_hold_jobs_without_blocking():
    running = [Running([("a", [0])], array_id="arr")]
    pending = [Request("arr_1", 1, array_id="arr", array_limit=1),
               Request("dep", 1, hold=WaitReason.DEPENDENCY), Request("free", 1)]
    starts, waits, _, _ = schedule(pending, view({"a": [1, 2, 3]}, FOUR, running=running))
    assert [j for j, _ in starts] == ["free"]
    assert waits == {"arr_1": WaitReason.ARRAY_LIMIT, "dep": WaitReason.DEPENDENCY}


def test_array_limit_counts_tasks_started_in_the_same_pass():
    pending = [Request(f"arr_{i}", 1, array_id="arr", array_limit=2) for i in range(4)]
    starts, waits, _, _ = schedule(pending, view(FOUR))
    assert len(starts) == 2
    assert set(waits.values()) == {WaitReason.ARRAY_LIMIT}


def test_node_down_pins_and_too_big_for_usable_nodes_do_not_block():
    capacity = {"a": [0, 1, 2, 3]}
    pending = [Request("pinned", 1, {"b": [0]}), Request("huge", 6), Request("ok", 1)]
    starts, waits, _, _ = schedule(pending, view(FOUR, capacity))
    assert [j for j, _ in starts] == ["ok"]
    assert waits == {"pinned": WaitReason.NODE_DOWN, "huge": WaitReason.NODE_DOWN}


def test_schedule_does_not_change_its_input():
    v = view({"a": [0, 1]}, FOUR)
    schedule([Request("j", 1)], v)
    assert v.free == {"a": [0, 1]}


def test_infeasible_messages():
    nodes = [NodeCapacity("a", (0, 1, 2, 3)), NodeCapacity("b", (0, 1))]
    assert infeasible(Request("j", 6), nodes) is None and infeasible(Request("j", 0), nodes) is None
    assert infeasible(Request("j", 7), nodes) == ("--gpus 7 can never be satisfied: the registered nodes have "
                                                  "6 GPU(s) in all (a: 4, b: 2)")
    assert "unknown node 'c'" in infeasible(Request("j", 1, {"c": [0]}), nodes)
    assert "has no GPU 5" in infeasible(Request("j", 1, {"b": [5]}), nodes)
    assert "no node agent has registered" in infeasible(Request("j", 0), [])


def test_pending_queue_orders_by_priority_then_submission_and_finds_the_jobs_that_may_pass_one():
    from zmgpu.master.state import PendingQueue

    def job(job_id, seq, priority=0, gpus=1, **fields):
        return job_record(job_id, seq=seq, gpus=gpus, priority=priority, **fields)

    queue = PendingQueue()
    for record in [job("first", 1), job("low", 2, -5), job("second", 3), job("urgent", 4, 10),
                   job("cpu_low", 5, -5, gpus=0), job("cpu", 6, gpus=0), job("cpu_urgent", 7, 10, gpus=0),
                   job("shares", 8, gpu_mem_mb=4000, time_limit=60), job("shares_forever", 9, gpu_mem_mb=4000)]:
        queue.add(record)
    assert list(queue) == ["urgent", "cpu_urgent", "first", "second", "cpu", "shares", "shares_forever", "low",
                           "cpu_low"]
    # The CPU-only jobs behind one pass any stop, in the same order; a job sharing GPUs, given room for it,
    # if it has a time limit (one without passes no reservation).
    assert list(queue.startable_behind("urgent")) == ["cpu_urgent", "cpu", "cpu_low"]
    assert list(queue.startable_behind("urgent", room=4000)) == ["cpu_urgent", "cpu", "shares", "cpu_low"]
    assert list(queue.startable_behind("first", room=3999)) == ["cpu", "cpu_low"]
    assert list(queue.startable_behind("cpu_low", room=8000)) == []
    queue.remove("first")
    queue.remove("cpu")
    assert list(queue) == ["urgent", "cpu_urgent", "second", "shares", "shares_forever", "low", "cpu_low"]
    assert "first" not in queue and len(queue) == 7
    assert list(queue.startable_behind("second", room=8000)) == ["shares", "cpu_low"]
    queue.add(job("shares_more", 10, gpu_mem_mb=8000, time_limit=60))
    # Given a number of seconds, also the jobs taking whole GPUs whose time limit is no longer, in queue order.
    for record in [job("hour", 11), job("minute", 12), job("two_minutes", 13), job("minute_urgent", 14, 10)]:
        record.time_limit = {"hour": 3600, "two_minutes": 120}.get(record.job_id, 60)
        queue.add(record)
    assert list(queue.startable_behind("urgent", 120, 8000)) == ["cpu_urgent", "minute_urgent", "shares",
                                                                 "shares_more", "minute", "two_minutes", "cpu_low"]
    assert list(queue.startable_behind("second", 60, 4000)) == ["shares", "minute", "cpu_low"]
    queue.remove("minute")
    queue.remove("minute_urgent")
    assert list(queue.startable_behind("urgent", 3600)) == ["cpu_urgent", "hour", "two_minutes", "cpu_low"]
    queue.remove("shares")
    queue.remove("shares_more")
    assert list(queue.startable_behind("urgent", 60, 8000)) == ["cpu_urgent", "cpu_low"]


def test_a_job_record_copy_shares_what_never_changes_and_holds_no_attribute_dict():
    from zmgpu.master.state import JOB_FIELDS

    template = job_record("", env={"A": "1"}, gpus=2, after=("aaaaaaaa",), priority=3, time_limit=60)
    twin = template.copy()
    assert twin == template and twin is not template
    assert twin.env is template.env and twin.after is template.after    # an array's tasks share them
    twin.job_id, twin.seq = "bbbbbbbb", 7
    assert (template.job_id, template.seq) == ("", 0)
    assert [getattr(twin, name) for name in JOB_FIELDS if name not in ("job_id", "seq")] == \
        [getattr(template, name) for name in JOB_FIELDS if name not in ("job_id", "seq")]
    if sys.version_info >= (3, 10):
        # A master holds records by the hundred thousand: slots, not an attribute dict each.
        assert not hasattr(template, "__dict__") and not hasattr(twin, "__dict__")


def test_the_user_cap_counts_every_gpu_of_a_running_job_on_every_node():
    # alice holds three GPUs in one gang job over two nodes; the cap is four.
    running = [Running([("a", [0, 1]), ("b", [0])], user="alice")]
    pending = [Request("two", 2, user="alice"), Request("one", 1, user="alice")]
    starts, waits, _, _ = schedule(pending, view({"a": [2, 3], "b": [1, 2, 3]}, running=running, user_gpu_limit=4))
    assert [job for job, _ in starts] == ["one"] and waits == {"two": WaitReason.USER_GPU_LIMIT}


def test_schedule_follows_the_order_it_is_given():
    # The queue decides the order (priority first); the pass starts jobs in that order while GPUs last.
    pending = [Request("urgent", 2), Request("first", 2), Request("low", 1)]
    starts, waits, _, _ = schedule(pending, view({"a": [0, 1, 2]}))
    assert [j for j, _ in starts] == ["urgent"]
    assert waits == {"first": WaitReason.RESOURCES}


# -- --gpu-mem packing and others' use ---------------------------------------------------------------


def shared(job_id: str, mib: int, gpus: int = 1, **kw) -> Request:
    return Request(job_id, gpus, gpu_mem=mib, **kw)


def startable_behind_in(queue: list[Request]):
    """``schedule``'s ``startable_behind`` for a queue given as a list (what PendingQueue.startable_behind
    picks, read the slow way)."""
    ids = [r.job_id for r in queue]
    bounds = {PastStop.CPU: lambda within, room: 0, PastStop.SHARED: lambda within, room: room,
              PastStop.LIMITED: lambda within, room: within}

    def passes(req: Request, within: float | None, room: int | None) -> bool:
        bucket = past_stop(req.gpus, req.gpu_mem, req.time_limit)
        bound = bounds[bucket[0]](within, room) if bucket else None
        return bound is not None and bucket[1] <= bound

    def behind(job_id: str, within: float | None, room: int | None):
        return (r for r in queue[ids.index(job_id) + 1:] if passes(r, within, room))
    return behind


def test_two_jobs_in_one_pass_never_share_the_same_free_memory():
    # 15 GiB of room: one 10 GiB job fits, the second must wait although each alone would fit.
    starts, waits, _, _ = schedule([shared("a", 10240), shared("b", 10240)],
                             view({"n": [0]}, room={"n": {0: 15360}}))
    assert starts == [("a", [("n", [0])])]
    assert waits == {"b": WaitReason.RESOURCES}


def test_shared_jobs_fill_the_fullest_gpu_first_and_keep_whole_gpus_free():
    room = {"n": {0: 4000, 1: 15000}}
    starts, _, _, _ = schedule([shared("a", 3000), Request("x", 1)], view({"n": [1]}, room=room))
    # "a" goes beside whoever uses GPU 0, so GPU 1 stays whole for the exclusive job.
    assert dict(starts) == {"a": [("n", [0])], "x": [("n", [1])]}


def test_exclusive_job_never_takes_a_gpu_a_shared_job_took_this_pass():
    starts, waits, _, _ = schedule([shared("a", 1000), Request("x", 1)], view({"n": [0]}, room={"n": {0: 15000}}))
    assert starts == [("a", [("n", [0])])] and waits == {"x": WaitReason.RESOURCES}


def test_multi_gpu_shared_job_needs_room_on_each_gpu():
    room = {"n": {0: 8000, 1: 2000}, "m": {0: 9000}}
    assert place(shared("a", 5000, gpus=2), {}, {}, room) == [("m", [0]), ("n", [0])]
    assert place(shared("a", 5000, gpus=3), {}, {}, room) is None
    assert place(shared("a", 1000, gpus=1, pins={"n": [1]}), {}, {}, room) == [("n", [1])]


def test_gpus_used_by_others_is_the_reason_when_they_alone_block():
    starts, waits, _, _ = schedule([Request("x", 2), Request("y", 3)],
                             view({"n": [0]}, capacity={"n": [0, 1, 2]}, others={"n": [1]}))
    assert starts == [] and waits["x"] is WaitReason.GPUS_IN_USE_BY_OTHERS


def test_shared_gpu_comes_free_in_the_replay_when_its_last_sharer_ends():
    running = [Running([("n", [0])], end=100.0, gpu_mem=1000), Running([("n", [0])], end=200.0, gpu_mem=1000)]
    v = view({"n": []}, capacity={"n": [0]}, running=running, now=0.0, room={"n": {0: 5000}})
    # The exclusive job's expected start is when the second sharer ends, not the first.
    assert _reserve(Request("big", 1), v.free, v).start == 200.0


def test_gpu_mem_larger_than_any_gpu_is_refused_at_submit():
    nodes = [NodeCapacity("n", (0, 1), (15872, 15872)), NodeCapacity("m", (0,), (8000,))]
    assert "20000 MiB on 1 GPU(s) can never be satisfied: 0 GPU(s) have that much room (the most any GPU " \
           "offers is 15872 MiB" in infeasible(shared("a", 20000), nodes)
    assert "2 GPU(s) have that much room" in infeasible(shared("a", 15000, gpus=3), nodes)
    assert infeasible(shared("a", 15000, gpus=2), nodes) is None
    assert infeasible(shared("a", 8000, gpus=3), nodes) is None
    assert "--gpus 4 can never be satisfied" in infeasible(shared("a", 100, gpus=4), nodes)


def test_counts_follow_what_the_pass_took_shared_and_reserved_gpus_included():
    # Three free GPUs; a shared job takes one of them (and one already shared, not free): two stay free for
    # exclusive jobs, so a 2-GPU job starts and a 1-GPU job behind it finds none.
    room = {"n": {0: 9000, 1: 15000, 2: 15000, 3: 15000}}
    starts, waits, _, _ = schedule([shared("s", 8000, gpus=2), Request("two", 2), Request("one", 1)],
                                view({"n": [1, 2, 3]}, {"n": [0, 1, 2, 3]}, room=room))
    assert dict(starts) == {"s": [("n", [0, 1])], "two": [("n", [2, 3])]}
    assert waits == {"one": WaitReason.RESOURCES}


@pytest.fixture
def placed(monkeypatch):
    """The jobs a pass asked ``place`` for, which walks every node (the pool's counts and indexes do not)."""
    from zmgpu.master import allocator

    asked = []
    real_place = allocator.place
    monkeypatch.setattr(allocator, "place", lambda *a, **kw: asked.append(a[0].job_id) or real_place(*a, **kw))
    return asked


def test_backfill_outside_the_reservation_takes_exactly_the_spare_gpus(placed):
    # big waits for a's GPUs 2,3 (ending at 100) and takes a then; b's two GPUs are spare.
    free = {"a": [0, 1], "b": [0, 1]}
    capacity = {"a": [0, 1, 2, 3], "b": [0, 1]}
    running = [Running([("a", [2, 3])], end=100.0)]
    pending = [Request("big", 4, {"a": [0, 1, 2, 3]}), Request("three", 3, time_limit=10_000),
               Request("short", 2, time_limit=50), Request("two", 2, time_limit=10_000),
               Request("more", 1, time_limit=10_000)]
    starts, waits, stopped, _ = schedule(pending, view(free, capacity, running=running))
    # Three long GPUs are more than the two spare ones (while four are free); a job that ends before the
    # reservation takes reserved GPUs, which leaves the spare ones spare; two fit there; then none is free, and
    # the pass stops.
    assert dict(starts) == {"short": [("a", [0, 1])], "two": [("b", [0, 1])]}
    assert waits["three"] is WaitReason.PRIORITY and stopped == "more" and "more" not in waits
    # The count of spare GPUs (2) refuses "three" without a placement over the nodes.
    assert "three" not in placed, placed


def test_the_reservation_counts_the_jobs_started_by_the_same_pass():
    # "first" takes one of the two GPUs; "blocked" needs both, so it starts when "first" ends (at 1000, its
    # time limit), and "short", done by then, may take the other meanwhile.
    pending = [Request("first", 1, time_limit=1000), Request("blocked", 2, time_limit=50),
               Request("short", 1, time_limit=50)]
    starts, waits, stopped, _ = schedule(pending, view({"a": [0, 1]}))
    assert dict(starts) == {"first": [("a", [0])], "short": [("a", [1])]}
    assert waits == {"blocked": WaitReason.RESOURCES}
    assert stopped == "short"    # no GPU is left: a job joining behind it may not start unless it needs none


def test_once_every_free_gpu_is_reserved_a_pass_reads_only_the_jobs_that_end_in_time():
    # Three GPUs free, all the blocked job's (it starts at 100 s): of the jobs behind, only those whose limit
    # ends by then, and the CPU-only one, may start; the pass finds them through the queue's index, reading
    # none of the others.
    nodes = {"a": [0, 1, 2, 3]}
    running = [Running([("a", [3])], end=100.0)]
    queue = [Request("big", 4, time_limit=10)] + [Request(f"long{k}", 1, time_limit=1000) for k in range(50)]
    queue += [Request("short", 1, time_limit=100), Request("cpu", 0), Request("too_big", 3, time_limit=90),
              Request("shorter", 1, time_limit=30), Request("third", 1, time_limit=101)]
    pending = Reading(queue)

    starts, waits, stopped, ends_by = schedule(pending(), view({"a": [0, 1, 2]}, nodes, running=running),
                                               startable_behind_in(queue))
    assert dict(starts) == {"short": [("a", [0])], "cpu": [("a", [])], "shorter": [("a", [1])]}
    assert waits == {"big": WaitReason.RESOURCES, "too_big": WaitReason.PRIORITY}
    # It stops at the first job behind: one joining later may start only if it ends by the reservation's start.
    assert pending.read == ["big", "long0"] and (stopped, ends_by) == ("long0", 100.0)
    # With no GPU free at all, no job taking whole GPUs may start whatever its limit: the pass stops at the
    # first job behind, for the job service to tell a job joining behind that it waits without a pass.
    pending.read.clear()
    starts, waits, stopped, ends_by = schedule(pending(), view({"a": []}, nodes, running=running + [
        Running([("a", [0, 1, 2])], end=50.0)]), startable_behind_in(queue))
    assert dict(starts) == {"cpu": [("a", [])]} and (stopped, ends_by) == ("long0", None)
    assert pending.read == ["big", "long0"]


def test_a_job_ending_just_as_the_reservation_starts_is_read_whatever_the_rounding():
    # now + limit == start, where start - now rounds below the limit (17.7 - 17.0 = 0.6999999999999993).
    nodes = {"a": [0, 1]}
    pending = [Request("first", 1, time_limit=0.7), Request("big", 2, time_limit=10),
               Request("long", 1, time_limit=5), Request("exact", 1, time_limit=0.7)]
    starts, waits, stopped, _ = schedule(pending, view({"a": [0, 1]}, nodes, now=17.0), startable_behind_in(pending))
    assert dict(starts) == {"first": [("a", [0])], "exact": [("a", [1])]} and "long" not in waits


def test_a_nearly_full_cluster_is_not_walked_for_each_job_in_a_long_queue(placed):
    # With time limits and a GPU still free, which the reservation takes, each job behind ends in time but
    # needs two GPUs: each is read and refused by the count of free GPUs, and placement, which walks every
    # node, is asked only for the reservation.
    nodes = {f"n{i}": [0, 1] for i in range(50)}
    running = [Running([(n, [i])], end=100.0 + k) for k, (n, i) in enumerate((n, i) for n in nodes for i in (0, 1))
               if (n, i) != ("n0", 0)]
    pending = [Request("big", 4, time_limit=10)] + [Request(f"j{k}", 2, time_limit=1) for k in range(200)]
    free = {n: [0] if n == "n0" else [] for n in nodes}
    starts, waits, stopped, _ = schedule(pending, view(free, nodes, running=running))
    assert starts == [] and stopped == "j0" and len(waits) == 201
    assert set(placed) == {"big"}, f"placement asked for {len(placed)} job(s)"


def test_with_no_gpu_free_a_pass_of_gpu_jobs_stops_after_the_reservation():
    nodes = {"a": [0, 1, 2]}
    running = [Running([("a", [1, 2])], end=100.0)]
    pending = [Request("one", 1, time_limit=10), Request("big", 2, time_limit=10)] + [
        Request(f"j{k}", 1, time_limit=1000) for k in range(3)]
    full = view({"a": [0]}, nodes, running=running)
    starts, waits, stopped, _ = schedule(pending, full)
    # "one" takes the last free GPU, "big" gets its reservation, and nothing behind is read.
    assert starts == [("one", [("a", [0])])] and waits == {"big": WaitReason.RESOURCES} and stopped == "j0"


def test_with_no_gpu_free_a_pass_reads_on_only_while_a_job_sharing_gpus_could_fit():
    # GPU 3 is shared by a running --gpu-mem job and has 8,000 MiB of room left.
    nodes, room = {"a": [0, 1, 2, 3]}, {"a": {0: 16000, 3: 8000}}
    running = [Running([("a", [1, 2])], end=100.0), Running([("a", [3])], end=100.0, gpu_mem=4000)]
    for need, fits in ((8001, False), (8000, True), (4000, True)):
        pending = [Request("one", 1, time_limit=10), Request("big", 2, time_limit=10),
                   Request("j0", 1, time_limit=1000), shared("small", need, time_limit=10)]
        starts, waits, stopped, _ = schedule(pending, view({"a": [0]}, nodes, running=running, room=room),
                                          startable_behind_in(pending))
        # The pass stops at j0 all the same, and reads on the jobs that need no free GPU while one fits.
        assert stopped == "j0" and "j0" not in waits, need
        assert dict(starts) == ({"one": [("a", [0])], "small": [("a", [3])]} if fits else {"one": [("a", [0])]})
        assert "small" not in waits, need     # started, or not read at all


# -- CPU-only jobs ----------------------------------------------------------------------------------

def test_a_cpu_only_job_passes_any_reservation_where_a_gpu_job_without_time_waits():
    nodes = {"a": [0, 1]}
    pending = [Request("big", 2, time_limit=10), Request("gpu", 1), Request("cpu", 0)]
    # The blocked job's start is known: the pass reads on, and only the CPU job may pass it.
    known = [Running([("a", [0])], end=100.0)]
    starts, waits, stopped, _ = schedule(pending, view({"a": [1]}, nodes, running=known),
                                         startable_behind_in(pending))
    assert dict(starts) == {"cpu": [("a", [])]} and stopped == "gpu"
    assert waits == {"big": WaitReason.RESOURCES}
    # Unknown: the pass stops at it, and reads on only the CPU-only jobs behind.
    unknown = [Running([("a", [0])], end=None)]
    starts, waits, stopped, _ = schedule(pending, view({"a": [1]}, nodes, running=unknown),
                                         startable_behind_in(pending))
    assert dict(starts) == {"cpu": [("a", [])]} and stopped == "big" and waits == {"big": WaitReason.RESOURCES}


def test_a_stopped_pass_reads_on_only_the_cpu_only_jobs_behind():
    # One free GPU of two; the other's job has no time limit, so "big" blocks with an unknown start.
    queue = [Request("one", 1), Request("big", 2)] + [Request(f"g{k}", 1) for k in range(50)] + [
        Request(f"c{k}", 0, array_id="arr", array_limit=2) for k in range(3)] + [shared("sharer", 100),
                                                                                 Request("last", 1)]
    pending = Reading(queue)

    running = [Running([("a", [0])], end=None, array_id="arr")]
    starts, waits, stopped, _ = schedule(pending(), view({"a": [1]}, {"a": [0, 1]}, running=running),
                                      startable_behind_in(queue))
    # The GPU jobs behind the stop are not read, sharing ones neither (the stop is at an unknown start, not for
    # want of free GPUs); the CPU-only ones are, and their array's %2 counts the task already running: one more
    # starts, the others wait.
    assert pending.read == ["one", "big"] and stopped == "big"
    assert dict(starts) == {"one": [("a", [1])], "c0": [("a", [])]}
    assert waits == {"big": WaitReason.RESOURCES, "c1": WaitReason.ARRAY_LIMIT, "c2": WaitReason.ARRAY_LIMIT}


def test_a_pass_that_finds_no_gpu_free_still_starts_the_cpu_only_job_it_stops_at():
    running = [Running([("a", [0])], end=100.0)]
    pending = [Request("big", 1, time_limit=10), Request("cpu", 0), Request("gpu", 1, time_limit=10)]
    starts, waits, stopped, _ = schedule(pending, view({"a": []}, {"a": [0]}, running=running),
                                      startable_behind_in(pending))
    assert dict(starts) == {"cpu": [("a", [])]} and stopped == "cpu" and waits == {"big": WaitReason.RESOURCES}


def test_a_job_sharing_a_gpu_past_a_reservation_is_placed_as_a_walk_over_the_room_outside_it():
    # A job that would outlast the reservation may take only GPUs outside it: the pool finds one shared GPU by
    # its room index, passing over the reserved ones, and must choose what `place` chooses over the room left.
    rng = random.Random(8)
    for _ in range(300):
        nodes = [f"n{n:02d}" for n in range(rng.randint(1, 8))]
        room = {node: {i: rng.choice([0, 1000, 4000, 4000, 8000]) for i in rng.sample(range(8), rng.randint(0, 8))}
                for node in nodes}
        pool = _Pool.of(view({node: sorted(room[node]) for node in nodes}, room=room))
        every = [(node, i) for node in nodes for i in range(8)]
        pool.reserve(Reservation(100.0, frozenset(rng.sample(every, rng.randint(0, min(4, len(every)))))))
        for k in range(20):
            req = Request(f"j{k}", 1, gpu_mem=rng.choice([500, 1000, 3000, 4000, 8000]), time_limit=1000)
            outside = {n: {i: mb for i, mb in gpus.items() if (n, i) not in pool.reservation.gpus}
                       for n, gpus in pool.room.items()}
            expected = place(req, {}, dict(pool.load), outside)
            assert _backfill(req, pool, 0.0) == expected
            if expected is not None:
                pool.take(expected, req.gpu_mem)


def test_pool_indexes_place_as_a_walk_over_every_node():
    # The pass finds a one-node fit of whole GPUs, a single shared GPU and a CPU-only job's node by its indexes;
    # each must choose what `place` chooses by walking every node, through a pass's takes (which only shrink
    # what is free and the room, and add load), gangs, pins and sharing jobs of several GPUs included.
    rng = random.Random(6)
    for _ in range(300):
        nodes = [f"n{n:02d}" for n in range(rng.randint(1, 12))]
        free = {node: sorted(rng.sample(range(8), rng.randint(0, 8))) for node in nodes}
        rooms = [-500, 0, 1000, 4000, 4000, 8000, 16000]
        room = {node: {i: rng.choice(rooms) for i in rng.sample(range(8), rng.randint(0, 8))} for node in nodes}
        load = {node: rng.randint(0, 3) for node in nodes if rng.random() < 0.5}
        pool = _Pool.of(view(free, room=room, load=load))
        for k in range(40):
            gpus = rng.choice([0, 0, 1, 1, 1, 2, 3, 4, 8, 12])
            gpu_mem = rng.choice([None, None, 500, 1000, 3000, 4000, 8000]) if gpus else None
            pins = None
            if rng.random() < 0.1:
                node = rng.choice(nodes)
                pins = {node: sorted(rng.sample(range(8), 1))}
            req = Request(f"j{k}", gpus if pins is None else 1, pins, gpu_mem=gpu_mem)
            expected = place(req, {n: list(i) for n, i in pool.free.items()}, dict(pool.load),
                             {n: dict(gpus) for n, gpus in pool.room.items()})
            assert pool.place(req) == expected
            if expected is not None:
                pool.take(expected, gpu_mem)
