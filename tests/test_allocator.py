"""Placement policy, called as plain functions: no sockets, no daemons."""

from zmgpu.master.allocator import NodeCapacity, Request, WaitReason, infeasible, place, schedule


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
    pins = {"a": [0, 1], "b": [3]}
    assert place(Request("j", 3, pins), free, {}) == [("a", [0, 1]), ("b", [3])]
    assert place(Request("j", 1, {"b": [2]}), free, {}) is None
    assert place(Request("j", 1, {"c": [0]}), free, {}) is None


def test_cpu_job_goes_to_least_loaded_node():
    assert place(Request("j", 0), {"a": [], "b": []}, {"a": 2, "b": 1}) == [("b", [])]
    assert place(Request("j", 0), {}, {}) is None


def test_schedule_is_fcfs_and_blocks_behind_a_waiting_job():
    free = {"a": [0, 1]}
    pending = [Request("big", 4), Request("small", 1), Request("pinned", 1, {"a": [1]})]
    starts, waits = schedule(pending, free, {}, set())
    # The big job blocks the small one (no backfill), but a pinned job is not held up.
    assert starts == [("pinned", [("a", [1])])]
    assert waits == {"big": WaitReason.RESOURCES, "small": WaitReason.PRIORITY}
    assert free == {"a": [0, 1]}, "schedule must not change its input"


def test_schedule_gives_disjoint_gpus():
    starts, waits = schedule([Request(f"j{i}", 1) for i in range(5)], {"a": [0, 1, 2, 3]}, {}, set())
    used = [tuple(p[0][1]) for _, p in starts]
    assert sorted(used) == [(0,), (1,), (2,), (3,)]
    assert waits == {"j4": WaitReason.RESOURCES}


def test_pinned_to_down_node_waits_with_node_down():
    _, waits = schedule([Request("j", 1, {"b": [0]})], {"a": [0]}, {}, {"b"})
    assert waits == {"j": WaitReason.NODE_DOWN}


def test_infeasible_messages():
    nodes = [NodeCapacity("a", (0, 1, 2, 3)), NodeCapacity("b", (0, 1))]
    assert infeasible(Request("j", 6), nodes) is None
    assert "can never be satisfied" in infeasible(Request("j", 7), nodes)
    assert "unknown node 'c'" in infeasible(Request("j", 1, {"c": [0]}), nodes)
    assert "has no GPU 5" in infeasible(Request("j", 1, {"b": [5]}), nodes)
    assert "no node agent has registered" in infeasible(Request("j", 0), [])
