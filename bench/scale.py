"""Scale: 1,000 simulated nodes x 8 GPUs (one load-generator process, bench/loadgen.py) and 100,000 queued jobs.

Phases, each timed: the nodes register; the master's CPU share is sampled
over a window while they only heartbeat; jobs are submitted as arrays (8,000
to fill every GPU plus 100,000 that stay queued) and dispatched; resident
memory (VmRSS) and CPU share are read again with the full queue; then the
load generator ends one job at a time and times how long until the next
DISPATCH arrives.  That gap is a scheduling pass seen from outside (it also
holds the JOB_ENDED handling and two loopback hops, well under a
millisecond), because the master does not log its passes.  Last, single
submits are timed for a window, with the full queue behind them.

Issue 6's targets have no machine limit to compare with, so these figures
carry no ``limit``.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from typing import Iterator

from bench.harness import (BenchError, Better, Cluster, Context, Figure, cpu_percent, median, rss_mb,
                           stop_process, subprocess_env)

NAME = "scale"
TARGET_PASS_MS = 50.0
TARGET_HEARTBEAT_CPU_PERCENT = 20.0
TARGET_RSS_MB = 1024.0
#: Largest array submitted at once (the master accepts up to 100,000 tasks per array).
ARRAY_CHUNK = 50_000


class LoadGenerator:
    """The load-generator process: one request at a time over its stdin and stdout."""

    def __init__(self, cluster: Cluster, nodes: int, gpus: int):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", "--port", str(cluster.port), "--nodes", str(nodes),
             "--gpus", str(gpus)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=subprocess_env(), text=True, bufsize=1)

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


def _submit_queue(client, total: int, cwd: str) -> float:
    """Submit ``total`` trivial 1-GPU jobs as arrays; the seconds the master took to accept them."""
    start = time.perf_counter()
    left = total
    while left:
        size = min(left, ARRAY_CHUNK)
        client.submit("true", gpus=1, cwd=cwd, array=f"0-{size - 1}")
        left -= size
    return time.perf_counter() - start


def _submit_rate(client, cwd: str, seconds: float) -> tuple[float, int]:
    """Single submits accepted per second over a window of about ``seconds``."""
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        client.submit("true", gpus=1, cwd=cwd)
        count += 1
    return count / (time.perf_counter() - start), count


def run(ctx: Context) -> Iterator[Figure]:
    nodes, gpus = ctx.pick(1000, 50), 8
    capacity, queued = nodes * gpus, ctx.pick(100_000, 5_000)
    window = ctx.pick(5.0, 3.0)
    churns = ctx.pick(10, 5)
    where = f"{nodes} nodes x {gpus} GPUs"
    with Cluster(NAME, nodes=0, profile_dir=ctx.profile_dir) as cluster, \
            LoadGenerator(cluster, nodes, gpus) as gen, cluster.client(timeout=ctx.budget) as client:
        pid = cluster.master_pid
        reg = gen.request("register", timeout=60)
        if reg["registered"] < nodes:
            raise BenchError(f"only {reg['registered']} of {nodes} simulated nodes registered within 60 s")
        yield Figure(NAME, "register_all_s", reg["seconds"], "s", Better.LOWER, note=f"{where} registering at once")
        yield Figure(NAME, "heartbeat_cpu_percent", cpu_percent(pid, window), "% of one core", Better.LOWER,
                     target=TARGET_HEARTBEAT_CPU_PERCENT, note=f"{where} heartbeating every 1 s, no jobs; "
                                                               f"{window:g} s window")

        accept = _submit_queue(client, capacity + queued, cluster.work_dir)
        yield Figure(NAME, "array_submit_s", accept, "s", Better.LOWER,
                     note=f"{capacity + queued} jobs as arrays of up to {ARRAY_CHUNK}, until the last reply")
        fill = gen.request("fill", count=capacity, timeout=max(10.0, ctx.remaining() / 3))
        yield Figure(NAME, "dispatch_fill_s", accept + fill["seconds"], "s", Better.LOWER,
                     note=f"first submit until {fill['running']} of {capacity} GPUs run a job")
        yield Figure(NAME, "master_rss_mb", rss_mb(pid), "MiB", Better.LOWER, target=TARGET_RSS_MB,
                     note=f"{queued} jobs pending, {fill['running']} running, {where}")
        yield Figure(NAME, "queued_heartbeat_cpu_percent", cpu_percent(pid, window), "% of one core",
                     Better.LOWER, target=TARGET_HEARTBEAT_CPU_PERCENT,
                     note=f"{where} heartbeating with {queued} jobs pending and nothing changing")

        # Keep time for the submit window after the churn; one pass may take all of the rest.
        per_sample = max(5.0, ctx.remaining() - window - 20)
        churn = gen.request("churn", count=churns, timeout=per_sample, budget=per_sample / 2)
        samples = churn["samples"]
        cut = f"; a pass took over {per_sample:.0f} s and the rest were skipped" if churn["timed_out"] else ""
        yield Figure(NAME, "scheduling_pass_ms", 1000 * median(samples) if samples else None, "ms", Better.LOWER,
                     target=TARGET_PASS_MS,
                     note=f"JOB_ENDED sent -> next DISPATCH received, median of {len(samples)} (max "
                          f"{1000 * max(samples, default=0):.0f} ms) with {queued} pending{cut}")

        rate, count = _submit_rate(client, cluster.work_dir, min(window, max(1.0, ctx.remaining() - 20)))
        yield Figure(NAME, "submits_per_s", rate, "jobs/s", Better.HIGHER,
                     note=f"{count} single Client.submit calls in a row with {queued} pending")
        stats = gen.request("stats")
        yield Figure(NAME, "nodes_declared_dead", stats.get("reregisters", 0), "count", Better.LOWER, target=0,
                     note=f"REREGISTERs the simulated nodes received (the master had declared them dead); "
                          f"{stats.get('kills', 0)} KILLs, {stats.get('dispatches', 0)} dispatches")
