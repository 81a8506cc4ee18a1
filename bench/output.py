"""Interactive output: a job writing 200 MB to stdout, followed by ``Client.stream`` into a hashing sink.

Four figures: MB/s end to end (from just before the submit to the end of the
stream, 1 MB = 10^6 bytes), whether the bytes arrived exactly (sha256 and
length), and how much longer the job ran (its own measured run time) than the
same program writing to /dev/null outside zmgpu, for two jobs (see payload.py):
one that only writes 1 MiB blocks, and one that prints formatted log lines as a
training script does.  The limit for MB/s is the first program read through a
plain pipe and hashed by this process; the limit for each slowdown is the same
program writing to a plain file (what any design that spools output to disk pays).

The first job cannot come near /dev/null, which copies nothing: any capture
copies each byte at least once, so writing to a plain file is already an
order of magnitude slower for it (and a pipe to a reader that throws the bytes
away slower still).  The second shows what a job that does anything to make its
output pays.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
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


def _argv(size: int, time_file: str, kind: str) -> list[str]:
    return [sys.executable, PAYLOAD, str(size), time_file, kind]


def pipe_mb_per_s(size: int, time_file: str, expected: str) -> float:
    """The payload read through a plain pipe and hashed here: this machine's limit for the same work."""
    sink = HashSink()
    start = time.perf_counter()
    with subprocess.Popen(_argv(size, time_file, "blocks"), stdout=subprocess.PIPE) as proc:
        while chunk := proc.stdout.read(payload.BLOCK):
            sink.write(chunk)
    elapsed = time.perf_counter() - start
    if sink.size != size or sink.digest.hexdigest() != expected:
        raise BenchError("the payload's own output does not match its digest")
    return size / 1e6 / elapsed


def alone_seconds(size: int, time_file: str, kind: str, out_path: str, runs: int) -> float:
    """The payload's shortest own run time outside zmgpu, over ``runs`` runs, its output going to ``out_path``."""
    times = []
    for _ in range(runs):
        with open(out_path, "wb") as out:
            subprocess.run(_argv(size, time_file, kind), stdout=out, check=True)
        times.append(_job_seconds(time_file))
    return min(times)


@dataclass
class Run:
    """One kind of payload through zmgpu, beside the same program alone."""

    kind: str
    size: int
    seconds: float = 0.0        # from just before the submit to the end of the stream
    exact: bool = False         # length and sha256 of stdout match, stderr empty
    received: int = 0
    state: str = ""
    in_job: float = 0.0         # the job's own run time under zmgpu
    alone: float = 0.0          # ... writing to /dev/null
    to_file: float = 0.0        # ... writing to a plain file


def through_zmgpu(ctx: Context, cluster: Cluster, client, kind: str, size: int, runs: int) -> Run:
    """Time the payload alone (to /dev/null and to a file), then as a job followed by Client.stream."""
    run = Run(kind, size)
    time_file = os.path.join(cluster.work_dir, f"payload.{kind}.time")
    run.alone = alone_seconds(size, time_file, kind, os.devnull, runs)
    # Any design that spools output to disk pays at least this much: the limit of the slowdown.
    spooled = os.path.join(cluster.work_dir, "payload.out")
    run.to_file = alone_seconds(size, time_file, kind, spooled, runs)
    os.unlink(spooled)
    stdout, stderr = HashSink(), HashSink()
    command = " ".join(shlex.quote(a) for a in _argv(size, time_file, kind))
    start = time.perf_counter()
    job_id = client.submit(command, gpus=1, cwd=cluster.work_dir, interactive=True)
    job = client.stream(job_id, stdout=stdout, stderr=stderr, session_timeout=max(1.0, ctx.remaining() - 15))
    run.seconds = time.perf_counter() - start
    run.in_job, run.state, run.received = _job_seconds(time_file), job["state"], stdout.size
    run.exact = (stdout.size == size and stdout.digest.hexdigest() == payload.sha256_of(size, kind)
                 and stderr.size == 0)
    return run


def _slowdown(name: str, run: Run, what: str) -> Figure:
    return Figure(NAME, name, run.in_job / run.alone, "x", Better.LOWER, limit=run.to_file / run.alone,
                  target=TARGET_SLOWDOWN,
                  note=f"{what}: its own run time {run.in_job:.3f} s under zmgpu vs {run.alone:.3f} s writing to "
                       f"/dev/null; limit: {run.to_file:.3f} s writing to a plain file")


def run(ctx: Context) -> Iterator[Figure]:
    size = ctx.pick(200_000_000, 20_000_000)
    with Cluster(NAME, ctx, nodes=1, gpus=4) as cluster, cluster.client() as client:
        limit = pipe_mb_per_s(size, os.path.join(cluster.work_dir, "pipe.time"), payload.sha256_of(size, "blocks"))
        blocks = through_zmgpu(ctx, cluster, client, "blocks", size, runs=3)
        lines = through_zmgpu(ctx, cluster, client, "lines", size, runs=ctx.pick(2, 1))
    mb = size / 1e6
    yield Figure(NAME, "stream_mb_per_s", mb / blocks.seconds, "MB/s", Better.HIGHER, limit=limit,
                 target=TARGET_MB_PER_S, note=f"{mb:g} MB through Client.stream, job ended {blocks.state}")
    yield Figure(NAME, "byte_exact", float(blocks.exact and lines.exact), "bool", Better.HIGHER, target=1.0,
                 note="; ".join(f"{run.kind}: received {run.received} of {size} bytes on stdout, sha256 "
                                f"{'matches' if run.exact else 'differs'}" for run in (blocks, lines)))
    yield _slowdown("job_slowdown", blocks, f"{mb:g} MB in 1 MiB writes and nothing else")
    yield _slowdown("job_slowdown_lines", lines, f"{mb:g} MB of formatted log lines")
