"""CLI start-up: wall time of ``zmgpu queue`` with 10,000 finished jobs in the history, and of ``zmgpu submit``.

The history is made fast with one array of trivial 1-GPU jobs; tasks the time
budget does not let run are cancelled while pending, which also leaves them
finished (the note says how many ran).  Each command runs as a fresh process
(``python -m zmgpu.cli``, as the ``zmgpu`` script does), output to /dev/null,
several times after one untimed run; the figure is the median.  The limit is
the start-up floor of any Python client of ZeroMQ: ``python -c "import zmq"``.

The commands run with bytecode caching on (in a cache of the benchmark's own),
as an installed zmgpu does (pip compiles it at install): a shell that sets
PYTHONDONTWRITEBYTECODE would otherwise time the compiling of every module.
"""

from __future__ import annotations

import sys
import time
from typing import Iterator

from bench.harness import (ZMGPU, BenchError, Better, Cluster, Context, Figure, StateWatcher, cli_env, median,
                           wall_seconds)

NAME = "cli"
TARGET_RATIO = 2.0


def fill_history(cluster: Cluster, count: int, deadline: float) -> str:
    """Leave ``count`` finished jobs in the master's history; a sentence saying how they ended."""
    with StateWatcher(cluster) as watcher, cluster.client(timeout=120) as client:
        array_id = client.submit("true", gpus=1, cwd=cluster.work_dir, array=f"0-{count - 1}")
        tasks = [f"{array_id}_{index}" for index in range(count)]
        try:
            jobs = watcher.wait(client, tasks, deadline)
        except BenchError:
            client.cancel(array_id)
            jobs = watcher.wait(client, tasks, time.monotonic() + 60)
    ran = sum(job["state"] == "COMPLETED" for job in jobs.values())
    return f"{count} finished jobs in the history ({ran} ran, {count - ran} cancelled while pending)"


def run(ctx: Context) -> Iterator[Figure]:
    runs = ctx.pick(10, 3)
    with Cluster(NAME, ctx, nodes=1, gpus=4) as cluster:
        # Most of the budget may go to running the history; the timings need a few seconds.
        history = fill_history(cluster, ctx.pick(10_000, 500), time.monotonic() + ctx.remaining() * 0.6)
        env = cli_env(cluster)
        floor = median(wall_seconds([sys.executable, "-c", "import zmq"], runs, env, cluster.work_dir))
        yield Figure(NAME, "import_zmq_ms", 1000 * floor, "ms", Better.LOWER,
                     note="python -c 'import zmq': the limit of the figures below")
        commands = {
            "queue_ms": (["queue"], history),
            "queue_all_ms": (["queue", "--all"], f"every job listed; {history}"),
            "submit_ms": (["submit", "--gpus", "1", "true"], "a trivial 1-GPU job"),
        }
        for figure, (args, note) in commands.items():
            took = median(wall_seconds([*ZMGPU, *args], runs, env, cluster.work_dir))
            yield Figure(NAME, figure, 1000 * took, "ms", Better.LOWER, limit=1000 * floor,
                         target_ratio=TARGET_RATIO, note=f"median of {runs}; {note}")
