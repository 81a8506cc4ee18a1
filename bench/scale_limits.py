"""Scale with time limits: bench/scale.py's figures with a one-hour limit on every job, one job that
shares GPUs (``--gpu-mem``) waiting last in the queue, and a CPU-only job waiting for that one (``--after``).

Under a master's ``default_time_limit`` every running job has a known end, so
the first job that cannot start gets a known start, and a scheduling pass
reads on past it for jobs that could backfill.  Once every free GPU is that
job's it reads on only the jobs behind that may still start: CPU-only ones,
those sharing GPUs while some GPU has room for one (here none has), and, while
a GPU is free, those that end before the reservation starts.  These figures
show that neither waiting job makes every pass read the whole queue of a full
cluster, and ``submits_reserved_per_s`` that a reservation of free GPUs does
not either: a submit whose job would outlast the reservation costs no pass.
"""

from __future__ import annotations

from typing import Iterator

from bench import scale
from bench.harness import Context, Figure

NAME = "scale_limits"
TIME_LIMIT_S = 3600


def run(ctx: Context) -> Iterator[Figure]:
    return scale.run(ctx, NAME, TIME_LIMIT_S, sharer=True)
