"""The ZeroMQ contexts of zmgpu processes: I/O threads under SCHED_BATCH, the caller left as it was."""

from __future__ import annotations

import os
import threading

import pytest

from conftest import poll
from zmgpu import iothreads

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="no SCHED_BATCH here")


def _new_io_threads(before: set[int]) -> list[int]:
    """Threads started since ``before`` that ZeroMQ named as I/O threads (a new thread names itself once it runs)."""
    found = []
    for tid in map(int, os.listdir("/proc/self/task")):
        if tid not in before:
            with open(f"/proc/self/task/{tid}/comm") as fh:
                if fh.read().startswith("ZMQbg/IO"):
                    found.append(tid)
    return found


def _in_a_thread(policy: int | None) -> tuple[int, int, list[int]]:
    """In a thread of its own put under ``policy`` (None: left as it starts), make a context: the thread's
    policy before and after, and the policies of the context's I/O threads."""
    result = {}

    def run():
        try:
            if policy is not None:
                os.sched_setscheduler(0, policy, os.sched_param(0))
            before = os.sched_getscheduler(0)
            threads = set(map(int, os.listdir("/proc/self/task")))
            ctx = iothreads.context()
            try:
                io = poll(lambda: _new_io_threads(threads), 5, "the context's I/O thread")
                result["value"] = (before, os.sched_getscheduler(0), [os.sched_getscheduler(tid) for tid in io])
            finally:
                ctx.term()
        except BaseException as exc:  # reported in the test's own thread
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    if "error" in result:
        raise result["error"]
    return result["value"]


def _batch_allowed() -> bool:
    """Whether this process may put a thread under SCHED_BATCH (a sandbox may forbid it)."""
    allowed = []

    def run():
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
            allowed.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    return bool(allowed)


def test_a_context_starts_its_io_thread_under_sched_batch_and_gives_the_caller_its_policy_back():
    if not _batch_allowed():
        pytest.skip("SCHED_BATCH cannot be set here: the context is an ordinary one")
    before, after, io = _in_a_thread(None)
    if before != os.SCHED_OTHER:
        pytest.skip("the test runs under another policy than the ordinary one")
    assert after == before and io and all(p == os.SCHED_BATCH for p in io)


def test_a_caller_under_another_policy_keeps_it():
    if not _batch_allowed():
        pytest.skip("SCHED_BATCH cannot be set here")
    before, after, io = _in_a_thread(os.SCHED_IDLE)
    assert before == after == os.SCHED_IDLE and io and all(p == os.SCHED_IDLE for p in io)
