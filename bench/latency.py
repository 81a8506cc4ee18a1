"""Submit -> start latency on an idle cluster: one node with 4 simulated GPUs, one trivial 1-GPU job at a time.

Each job is ``date +%s.%N > FILE``, so two moments are known: when the master
started the job (its ``start_time``, stamped as it sends the dispatch) and when
the job's process actually ran (the time it wrote).  Both are measured from
just before ``Client.submit`` on the same clock.  The limit is what any
scheduler on this machine pays at least: one pyzmq ROUTER/DEALER round trip on
loopback (with zmgpu's own contexts, see zmgpu.iothreads), plus one ``Popen`` of ``true`` for the job to have run (the
master's start time is stamped before any process is spawned, so its limit
is the round trip alone).  Percentiles of the limit come from the same
percentiles of each part.
"""

from __future__ import annotations

import os
import time
from typing import Iterator

import zmq

from bench.harness import Better, Cluster, Context, Figure, StateWatcher, percentile, popen_true_seconds
from zmgpu import iothreads

NAME = "latency"
TARGET_P50_MS = 10.0


def zmq_round_trip_seconds(count: int) -> list[float]:
    """Wall time of ``count`` DEALER -> ROUTER -> DEALER round trips over loopback TCP."""
    ctx = iothreads.context()   # as every zmgpu process makes its own
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        port = router.bind_to_random_port("tcp://127.0.0.1")
        dealer.connect(f"tcp://127.0.0.1:{port}")
        times = []
        for _ in range(count + 10):   # the first few pay for the connection
            start = time.perf_counter()
            dealer.send(b"ping")
            identity, body = router.recv_multipart()
            router.send_multipart([identity, body])
            dealer.recv()
            times.append(time.perf_counter() - start)
        return times[10:]
    finally:
        router.close(0)
        dealer.close(0)
        ctx.term()


def _limit_ms(q: float, *parts: list[float]) -> float:
    return 1000 * sum(percentile(samples, q) for samples in parts)


def run(ctx: Context) -> Iterator[Figure]:
    count = ctx.pick(200, 20)
    round_trips = zmq_round_trip_seconds(1000)
    spawns = popen_true_seconds(ctx.pick(100, 20))
    to_start, to_run = [], []
    with Cluster(NAME, ctx, nodes=1, gpus=4) as cluster, \
            StateWatcher(cluster) as watcher, cluster.client() as client:
        work = cluster.work_dir
        for index in range(count):
            if ctx.remaining() <= 0:
                break
            stamp = os.path.join(work, f"ran.{index}")
            submitted = time.time()
            job_id = client.submit(f"date +%s.%N > {stamp}", gpus=1, cwd=work)
            job = watcher.wait(client, [job_id], ctx.deadline)[job_id]
            with open(stamp) as fh:
                ran = float(fh.read())
            to_start.append(job["start_time"] - submitted)
            to_run.append(ran - submitted)
    note = f"{len(to_start)} jobs, one at a time"
    measured = {"submit_to_start": (to_start, [round_trips]), "submit_to_run": (to_run, [round_trips, spawns])}
    for name, (samples, limit_parts) in measured.items():
        for q in (50, 99):
            yield Figure(NAME, f"{name}_p{q}_ms", 1000 * percentile(samples, q), "ms", Better.LOWER,
                         limit=_limit_ms(q, *limit_parts), target=TARGET_P50_MS if q == 50 else None, note=note)
