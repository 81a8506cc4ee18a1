"""Scale with time limits: bench/scale.py's figures with a one-hour limit on every job.

Under a master's ``default_time_limit`` every running job has a known end, so
the first job that cannot start gets a known start, and a scheduling pass
reads on past it for jobs that could backfill; these figures show what a full
cluster and a long queue cost then.
"""

from __future__ import annotations

from typing import Iterator

from bench import scale
from bench.harness import Context, Figure

NAME = "scale_limits"
TIME_LIMIT_S = 3600


def run(ctx: Context) -> Iterator[Figure]:
    return scale.run(ctx, NAME, TIME_LIMIT_S)
