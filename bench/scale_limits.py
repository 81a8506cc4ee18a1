"""Scale with time limits: bench/scale.py's figures with a one-hour limit on every job, one job that
shares GPUs (``--gpu-mem``) waiting last in the queue, and a CPU-only job waiting for that one (``--after``).

Under a master's ``default_time_limit`` every running job has a known end, so
the first job that cannot start gets a known start, and a scheduling pass
reads on past it for jobs that could backfill.  It stops once no GPU is free,
and reads on only the jobs behind that need no free GPU: CPU-only ones, and
those sharing GPUs while some GPU has room for one (here none has).  These
figures show that neither waiting job makes every pass read the whole queue of
a full cluster.
"""

from __future__ import annotations

from typing import Iterator

from bench import scale
from bench.harness import Context, Figure

NAME = "scale_limits"
TIME_LIMIT_S = 3600


def run(ctx: Context) -> Iterator[Figure]:
    return scale.run(ctx, NAME, TIME_LIMIT_S, sharer=True)
