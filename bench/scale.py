"""Scale: 1,000 simulated nodes x 8 GPUs (one load-generator process, bench/loadgen.py) and 100,000 queued jobs.

Phases, each timed: the nodes register; the master is watched over a window
while they only heartbeat (its CPU share from /proc, and PINGs ten times a
second, whose longest round trip is the longest turn of its loop); 8,000 jobs
fill every GPU and a tenth of the queue waits behind them, and the load
generator ends one job at a time, timing how long until the next DISPATCH
arrives; the rest of the 100,000 queued jobs follows, resident memory
(VmRSS) is read, the master is watched again and the end -> dispatch timing
repeated; then ``zmgpu queue`` is timed (after the figures of the full queue,
so that its replies of thousands of job dicts change none of them), and
single submits for a window.  With time limits, last, a job of two nodes' GPUs
goes first in line, as many of the oldest jobs as a node has GPUs end, and
single submits are timed again while that job's reservation holds the GPUs
they freed.

The end -> dispatch gap is a scheduling pass seen from outside (it also holds
the JOB_ENDED handling and two loopback hops, well under a millisecond),
because the master does not log its passes.  If the freed GPU's node is not
usable at that moment (suspect after a long turn), no DISPATCH comes and the
figure is empty; the note says so.

Issue 6's targets have no machine limit to compare with, so these figures
carry no ``limit``.

``scale_limits`` (bench/scale_limits.py) runs the same with a one-hour time
limit on every job, and two jobs waiting last in the queue (one sharing GPUs,
one CPU-only): its docstring says what a pass reads then.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections import Counter
from typing import Iterator

from bench.harness import (ZMGPU, BenchError, Better, Cluster, Context, Figure, cli_env, cpu_seconds, median,
                           rss_mb, stop_process, wall_seconds)
from zmgpu.daemon import module_env
from zmgpu.model import NodeStatus

NAME = "scale"
TARGET_PASS_MS = 50.0
TARGET_HEARTBEAT_CPU_PERCENT = 20.0
TARGET_RSS_MB = 1024.0
#: Largest array submitted at once (the master accepts up to 100,000 tasks per array).
ARRAY_CHUNK = 50_000
#: Seconds between PINGs while the master is watched, and the longest wait for one pass.
PING_EVERY = 0.1
PASS_TIMEOUT = 30.0
#: The user the master makes an admin, who puts a job first in line in ``scale_limits``.
ADMIN = "bench-admin"


class LoadGenerator:
    """The load-generator process: one request at a time over its stdin and stdout."""

    def __init__(self, cluster: Cluster, nodes: int, gpus: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", "--port", str(cluster.port), "--nodes", str(nodes),
             "--gpus", str(gpus)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=module_env(), text=True, bufsize=1)

    def __enter__(self) -> "LoadGenerator":
        return self

    def __exit__(self, *exc_info) -> None:
        self.proc.stdin.close()
        stop_process(self.proc)

    def request(self, cmd: str, timeout: float = 60.0, **fields) -> dict:
        """Send one command and return its answer; BenchError if none comes in time."""
        self.proc.stdin.write(json.dumps({"cmd": cmd, "timeout": timeout, **fields}) + "\n")
        self.proc.stdin.flush()
        # The generator answers by its own timeout (plus a churn's budget for starting samples).
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout + fields.get("budget", 0) + 30)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise BenchError(f"the load generator did not answer '{cmd}' (status {self.proc.poll()})")
        return json.loads(line)


def _submit_queue(client, total: int, cwd: str, time_limit: int | None) -> float:
    """Submit ``total`` trivial 1-GPU jobs as arrays; the seconds the master took to accept them."""
    start = time.perf_counter()
    left = total
    while left:
        size = min(left, ARRAY_CHUNK)
        client.submit("true", gpus=1, cwd=cwd, array=f"0-{size - 1}", time_limit=time_limit)
        left -= size
    return time.perf_counter() - start


def _submit_rate(client, cwd: str, seconds: float, time_limit: int | None) -> tuple[float, int]:
    """Single submits accepted per second over a window of about ``seconds``."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        client.submit("true", gpus=1, cwd=cwd, time_limit=time_limit)
        count += 1
    return count / (time.perf_counter() - start), count


def _await_reservation(client, job_id: str, free: int, timeout: float) -> None:
    """Wait until ``job_id`` waits first in line (Resources) with ``free`` GPUs free, all held for it (had they
    not been, the jobs behind would have taken them); BenchError if that state does not come."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        reason = client.job(job_id)["reason"]
        if reason == "Resources" and sum(gpu["free"] for node in client.nodes() for gpu in node["gpus"]) == free:
            return
        time.sleep(PING_EVERY)
    raise BenchError(f"job {job_id} did not come to wait for {free} free GPUs held for it within {timeout:g} s "
                     f"(its reason: {reason})")


def _observe(client, pid: int, seconds: float) -> tuple[float, list[float]]:
    """The master's CPU share over a window, and its PING round trips sampled ten times a second meanwhile.

    A PING is answered between two turns of the master's loop, so the longest
    round trip shows the longest turn (a scheduling pass, store writes) as a
    client feels it.
    """
    cpu0, start = cpu_seconds(pid), time.monotonic()
    pings = []
    while time.monotonic() - start < seconds:
        sent = time.perf_counter()
        client.ping()
        pings.append(time.perf_counter() - sent)
        time.sleep(max(0.0, PING_EVERY - pings[-1]))
    return 100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - start), pings


def _pass_figure(bench: str, name: str, churn: dict, pending: int, timeout: float,
                 target: float | None) -> Figure:
    samples = churn["samples"]
    cut = f"; no DISPATCH came within {timeout:.0f} s of a JOB_ENDED, so the rest were skipped" \
        if churn["timed_out"] else ""
    return Figure(bench, name, 1000 * median(samples) if samples else None, "ms", Better.LOWER, target=target,
                  note=f"JOB_ENDED sent -> next DISPATCH received, median of {len(samples)} (max "
                       f"{1000 * max(samples, default=0):.0f} ms) with {pending} jobs pending{cut}")


def _observed_figures(bench: str, prefix: str, observed: tuple[float, list[float]],
                      what: str) -> Iterator[Figure]:
    cpu, pings = observed
    yield Figure(bench, f"{prefix}_cpu_percent", cpu, "% of one core", Better.LOWER,
                 target=TARGET_HEARTBEAT_CPU_PERCENT, note=what)
    yield Figure(bench, f"{prefix}_ping_max_ms", 1000 * max(pings), "ms", Better.LOWER,
                 note=f"longest of {len(pings)} PING round trips (median {1000 * median(pings):.1f} ms) "
                      f"over the same window: the longest turn of the master's loop")


def run(ctx: Context, bench: str = NAME, time_limit: int | None = None, sharer: bool = False) -> Iterator[Figure]:
    """The figures, under the name ``bench``; ``time_limit`` (seconds) is every job's, and with ``sharer`` a
    --gpu-mem job waits last in the queue, and a CPU-only job waits for it."""
    nodes, gpus = ctx.pick(1000, 50), 8
    capacity, queued = nodes * gpus, ctx.pick(100_000, 5_000)
    first_queue = queued // 10
    window, churns = ctx.pick(5.0, 3.0), ctx.pick(10, 5)
    where = f"{nodes} nodes x {gpus} GPUs"
    with Cluster(bench, ctx, nodes=0, admin=ADMIN) as cluster, \
            LoadGenerator(cluster, nodes, gpus) as gen, cluster.client(timeout=ctx.budget) as client:
        pid, cwd = cluster.master_pid, cluster.work_dir
        reg = gen.request("register", timeout=60)
        if reg["registered"] < nodes:
            raise BenchError(f"only {reg['registered']} of {nodes} simulated nodes registered within 60 s")
        yield Figure(bench, "register_all_s", reg["seconds"], "s", Better.LOWER, note=f"{where} registering at once")
        yield from _observed_figures(bench, "heartbeat", _observe(client, pid, window),
                                     f"{where} heartbeating every 1 s with every GPU's telemetry changed, no jobs; "
                                     f"{window:g} s window")

        # A tenth of the queue first, for a second point of the pass time against the queue's length.
        accept = _submit_queue(client, capacity + first_queue, cwd, time_limit)
        if sharer:
            shared = client.submit("true", gpus=1, cwd=cwd, gpu_mem_mb=1024, priority=-1, time_limit=time_limit)
            # A CPU-only job waiting for it, as a job that post-processes another's results does: a pass must
            # not read the whole queue to reach it.
            client.submit("true", cwd=cwd, after=[shared], priority=-1)
        fill = gen.request("fill", count=capacity, timeout=max(10.0, ctx.remaining() / 4))
        yield Figure(bench, "dispatch_fill_s", accept + fill["seconds"], "s", Better.LOWER,
                     note=f"{capacity + first_queue} jobs submitted as arrays until {fill['running']} of {capacity} "
                          f"GPUs run a job")
        timeout = min(PASS_TIMEOUT, max(5.0, ctx.remaining() / 4))
        churn = gen.request("churn", count=churns, timeout=timeout, budget=timeout)
        yield _pass_figure(bench, "scheduling_pass_tenth_ms", churn, first_queue, timeout, None)

        accept = _submit_queue(client, queued - first_queue, cwd, time_limit)
        yield Figure(bench, "array_submit_s", accept, "s", Better.LOWER,
                     note=f"{queued - first_queue} more jobs as arrays of up to {ARRAY_CHUNK}, until the last reply")
        yield Figure(bench, "master_rss_mb", rss_mb(pid), "MiB", Better.LOWER, target=TARGET_RSS_MB,
                     note=f"{queued} jobs pending, {capacity} running, {where}")
        yield from _observed_figures(bench, "queued", _observe(client, pid, window),
                                     f"{window:g} s once {queued} jobs are pending and every GPU busy, only "
                                     f"heartbeats arriving: what the master still does with a full queue")
        # Keep time for the submit window after the churn.
        timeout = min(PASS_TIMEOUT, max(5.0, ctx.remaining() - window - 20))
        churn = gen.request("churn", count=churns, timeout=timeout, budget=timeout)
        yield _pass_figure(bench, "scheduling_pass_ms", churn, queued, timeout, TARGET_PASS_MS)
        runs = ctx.pick(3, 1)
        took = median(wall_seconds([*ZMGPU, "queue"], runs, cli_env(cluster), cwd))
        yield Figure(bench, "queue_cli_ms", 1000 * took, "ms", Better.LOWER,
                     note=f"zmgpu queue with {queued} jobs pending (as arrays: a line per run of tasks) and "
                          f"{capacity} running (a line each), median of {runs}")

        submit_window = min(window, max(1.0, ctx.remaining() - 20))
        rate, count = _submit_rate(client, cwd, submit_window, time_limit)
        yield Figure(bench, "submits_per_s", rate, "jobs/s", Better.HIGHER,
                     note=f"{count} single Client.submit calls in a row with {queued} pending")
        if time_limit is not None:
            # A job of two nodes' GPUs goes first in line, and as many jobs as a node has GPUs end: its reservation
            # takes the GPUs they free, which no job behind may use (each would outlast it).
            with cluster.client(user=ADMIN) as admin:
                first = admin.submit("true", gpus=2 * gpus, cwd=cwd, priority=10, time_limit=time_limit)
            ended = gen.request("end", count=gpus)["ended"]
            _await_reservation(client, first, ended, timeout=30.0)
            rate, count = _submit_rate(client, cwd, submit_window, time_limit)
            yield Figure(bench, "submits_reserved_per_s", rate, "jobs/s", Better.HIGHER,
                         note=f"{count} single Client.submit calls in a row with {queued} pending, once a "
                              f"{2 * gpus}-GPU job first in line has its reservation on the {ended} GPUs come free")
        stats = gen.request("stats")
        statuses = Counter(node["status"] for node in client.nodes())
        unusable = statuses[NodeStatus.SUSPECT.value] + statuses[NodeStatus.DOWN.value]
        yield Figure(bench, "nodes_unusable", unusable, "count", Better.LOWER, target=0,
                     note=f"nodes suspect or down at the end though every one heartbeats each second "
                          f"({dict(statuses)}); {stats['declared_dead']} were told to register again; "
                          f"{stats.get('dispatches', 0)} dispatches, {stats.get('kills', 0)} KILLs")
