"""Interactive output: a job writing 200 MB to stdout, followed by ``Client.stream`` into a hashing sink.

Three figures: MB/s end to end (from just before the submit to the end of the
stream, 1 MB = 10^6 bytes), whether the bytes arrived exactly (sha256 and
length), and how much longer the job ran (its own measured run time) than the
same program writing to /dev/null outside zmgpu.  The limit for MB/s is the
same program read through a plain pipe and hashed by this process; the limit
for the slowdown is the same program writing to a plain file (what any design
that spools output to disk pays).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import time
from typing import Iterator

from bench import payload
from bench.harness import BenchError, Better, Cluster, Context, Figure

NAME = "output"
TARGET_MB_PER_S = 100.0
TARGET_SLOWDOWN = 1.5
PAYLOAD = os.path.abspath(payload.__file__)


class HashSink:
    """A binary 'file' that keeps only the length and sha256 of what is written to it."""

    def __init__(self):
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""


def _job_seconds(time_file: str) -> float:
    with open(time_file) as fh:
        return float(fh.read())


def pipe_mb_per_s(size: int, time_file: str, expected: str) -> float:
    """The payload read through a plain pipe and hashed here: this machine's limit for the same work."""
    sink = HashSink()
    start = time.perf_counter()
    with subprocess.Popen([sys.executable, PAYLOAD, str(size), time_file], stdout=subprocess.PIPE) as proc:
        while chunk := proc.stdout.read(payload.BLOCK):
            sink.write(chunk)
    elapsed = time.perf_counter() - start
    if sink.size != size or sink.digest.hexdigest() != expected:
        raise BenchError("the payload's own output does not match its digest")
    return size / 1e6 / elapsed


def alone_seconds(size: int, time_file: str, out_path: str, runs: int = 3) -> float:
    """The payload's shortest own run time outside zmgpu, over ``runs`` runs, its output going to ``out_path``."""
    times = []
    for _ in range(runs):
        with open(out_path, "wb") as out:
            subprocess.run([sys.executable, PAYLOAD, str(size), time_file], stdout=out, check=True)
        times.append(_job_seconds(time_file))
    return min(times)


def run(ctx: Context) -> Iterator[Figure]:
    size = ctx.pick(200_000_000, 20_000_000)
    expected = payload.sha256_of(size)
    with Cluster(NAME, ctx, nodes=1, gpus=4) as cluster, cluster.client() as client:
        time_file = os.path.join(cluster.work_dir, "payload.time")
        limit = pipe_mb_per_s(size, time_file, expected)
        alone = alone_seconds(size, time_file, os.devnull)
        # Any design that spools output to disk pays at least this much: the limit of the slowdown.
        spooled = os.path.join(cluster.work_dir, "payload.out")
        to_file = alone_seconds(size, time_file, spooled)
        os.unlink(spooled)
        stdout, stderr = HashSink(), HashSink()
        command = " ".join(shlex.quote(a) for a in (sys.executable, PAYLOAD, str(size), time_file))
        start = time.perf_counter()
        job_id = client.submit(command, gpus=1, cwd=cluster.work_dir, interactive=True)
        job = client.stream(job_id, stdout=stdout, stderr=stderr, session_timeout=max(1.0, ctx.remaining() - 15))
        elapsed = time.perf_counter() - start
        in_job = _job_seconds(time_file)
    mb = size / 1e6
    exact = stdout.size == size and stdout.digest.hexdigest() == expected and stderr.size == 0
    yield Figure(NAME, "stream_mb_per_s", mb / elapsed, "MB/s", Better.HIGHER, limit=limit,
                 target=TARGET_MB_PER_S, note=f"{mb:g} MB through Client.stream, job ended {job['state']}")
    yield Figure(NAME, "byte_exact", float(exact), "bool", Better.HIGHER, target=1.0,
                 note=f"received {stdout.size} of {size} bytes on stdout, {stderr.size} on stderr; sha256 "
                      f"{'matches' if exact else 'differs'}")
    yield Figure(NAME, "job_slowdown", in_job / alone, "x", Better.LOWER, limit=to_file / alone,
                 target=TARGET_SLOWDOWN,
                 note=f"the job's own run time {in_job:.3f} s under zmgpu vs {alone:.3f} s writing to /dev/null; "
                      f"limit: {to_file:.3f} s writing to a plain file")
