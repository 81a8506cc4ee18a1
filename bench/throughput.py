"""Throughput: trivial 1-GPU jobs (``true``) through one node with 4 simulated GPUs, in jobs completed per second.

The same number of jobs goes through twice: submitted one by one through the
Python API, then as one array.  The rate is jobs / (last job's end, as the
master records it - the moment before the first submit).  A third run, for
information, waits on an array as a user's script or ``zmgpu wait`` does
(``Client.wait``: one subscription, to the ends of the array's tasks) instead of the
benchmark's own watcher (one subscription to every end).  The limit is a plain
``Popen(["true"]).wait()`` loop on this machine: the spawn rate nothing that
starts processes can beat.  A zmgpu job is a shell command line, so each one
starts ``/bin/sh -c true``: the same loop with that shell is measured too, and
each rate's share of it is in its note (for information; the target is
against the plain loop).
"""

from __future__ import annotations

import os
import time
from typing import Iterator

from zmgpu.client import ClientError
from zmgpu.model import FINISHED_STATES

from bench.harness import (BenchError, Better, Cluster, Context, Figure, StateWatcher, popen_true_seconds,
                           wakeup_round_trip_us)

NAME = "throughput"
TARGET_PER_S = 800.0
TARGET_SHARE_OF_POPEN = 0.5


def _finished(watcher: StateWatcher, client, job_ids: list, deadline: float) -> tuple[dict, str | None]:
    """The jobs' final dicts, and a sentence if the time limit cut the wait short."""
    try:
        return watcher.wait(client, job_ids, deadline), None
    except BenchError as exc:
        return _seen_ended(watcher, job_ids), str(exc)


def _seen_ended(watcher: StateWatcher, job_ids: list) -> dict:
    """The final dicts of those of ``job_ids`` the watcher saw end."""
    return {j: watcher.finished[j] for j in job_ids if j in watcher.finished}


def _figure(name: str, jobs: dict, first_submit: float, cut: str | None, limit: float, shell_rate: float,
            how: str, targeted: bool = True) -> Figure:
    if cut is None and jobs:
        elapsed = max(job["end_time"] for job in jobs.values()) - first_submit
    else:
        elapsed = time.time() - first_submit
    failed = sum(job["state"] != "COMPLETED" for job in jobs.values())
    rate = len(jobs) / elapsed if jobs else 0.0
    note = (f"{len(jobs)} jobs {how}" + (f", {failed} not COMPLETED" if failed else "") + (f"; {cut}" if cut else "")
            + f"; {rate / shell_rate:.2f} of the Popen loop through /bin/sh")
    targets = {"target": TARGET_PER_S, "target_ratio": TARGET_SHARE_OF_POPEN} if targeted else {}
    return Figure(NAME, name, rate, "jobs/s", Better.HIGHER, limit=limit, note=note, **targets)


def _wakeups(ctx: Context) -> Iterator[Figure]:
    """What one process waking another costs here, on one CPU and across two (for information)."""
    count = ctx.pick(5000, 500)
    cpus = sorted(os.sched_getaffinity(0))
    pairs = [("wakeup_same_cpu_us", (cpus[0], cpus[0]), f"both on CPU {cpus[0]}")]
    if len(cpus) > 1:
        pairs.append(("wakeup_cross_cpu_us", (cpus[0], cpus[1]), f"on CPUs {cpus[0]} and {cpus[1]}"))
    for figure, pair, where in pairs:
        yield Figure(NAME, figure, wakeup_round_trip_us(count, pair), "us", Better.LOWER,
                     note=f"a byte to a forked process and back over pipes, {count} times, {where}: two wake-ups "
                          f"each, as every step of a job between zmgpu's processes and threads is one (for "
                          f"information)")


def run(ctx: Context) -> Iterator[Figure]:
    count = ctx.pick(2000, 100)
    spawns = popen_true_seconds(min(count, 1000))
    popen_rate = len(spawns) / sum(spawns)
    yield Figure(NAME, "popen_true_per_s", popen_rate, "jobs/s", Better.HIGHER,
                 note=f"{len(spawns)} Popen(['true']).wait() in a loop: the limit of the jobs/s figures")
    shelled = popen_true_seconds(min(count, 1000), ("/bin/sh", "-c", "true"))
    shell_rate = len(shelled) / sum(shelled)
    yield Figure(NAME, "popen_sh_true_per_s", shell_rate, "jobs/s", Better.HIGHER,
                 note=f"{len(shelled)} Popen(['/bin/sh', '-c', 'true']).wait() in a loop: each job's own start, "
                      f"for information")
    yield from _wakeups(ctx)
    with Cluster(NAME, ctx, nodes=1, gpus=4) as cluster, \
            StateWatcher(cluster) as watcher, cluster.client(timeout=120) as client:
        work = cluster.work_dir
        # A third of the time left for each of the three runs.
        deadline = time.monotonic() + ctx.remaining() / 3
        first = time.time()
        job_ids = []
        while len(job_ids) < count and time.monotonic() < deadline:
            job_ids.append(client.submit("true", gpus=1, cwd=work))
        submitted = time.time()
        yield Figure(NAME, "api_submits_per_s", len(job_ids) / (submitted - first), "jobs/s", Better.HIGHER,
                     note=f"{len(job_ids)} Client.submit calls in a row, while the jobs run")
        jobs, cut = _finished(watcher, client, job_ids, deadline)
        yield _figure("api_jobs_per_s", jobs, first, cut, popen_rate, shell_rate, "submitted one by one")

        first = time.time()
        array_id = client.submit("true", gpus=1, cwd=work, array=f"0-{count - 1}")
        tasks = [f"{array_id}_{index}" for index in range(count)]
        jobs, cut = _finished(watcher, client, tasks, time.monotonic() + ctx.remaining() / 2)
        yield _figure("array_jobs_per_s", jobs, first, cut, popen_rate, shell_rate, "as one array")

        watcher.unfollow()   # Client.wait alone follows this one: the master publishes each end once
        first = time.time()
        array_id = client.submit("true", gpus=1, cwd=work, array=f"0-{count - 1}")
        try:
            ended = client.wait([array_id], timeout=max(1.0, ctx.remaining()))
        except ClientError as exc:
            cut = str(exc)
            ended = client.queue(all=True, job_ids=[array_id], states=FINISHED_STATES, nodes=False)["jobs"]
        else:
            cut = None
        jobs = {job["job_id"]: job for job in ended}
        yield _figure("array_wait_jobs_per_s", jobs, first, cut, popen_rate, shell_rate,
                      "as one array, followed with Client.wait (for information)", targeted=False)
