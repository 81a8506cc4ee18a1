"""``zmgpu cancel``: cancel jobs, one line of result per job."""

from __future__ import annotations

import argparse
import sys

from .common import add_connection_timeout, client_config, make_client

HELP = "cancel jobs"
DESCRIPTION = (
    "Cancel pending or running jobs.  A running job gets SIGCONT and SIGTERM, then SIGKILL after the "
    "master's grace period.  One line per job; the exit status is 1 if any job could not be cancelled "
    "(for example an unknown job id).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zmgpu cancel``."""
    parser.add_argument("job_ids", nargs="+", metavar="JOB_ID", help="id of a job to cancel")
    add_connection_timeout(parser)


def run(args: argparse.Namespace) -> int:
    """Cancel; report each job on its own line (failures on stderr)."""
    with make_client(client_config(args)) as client:
        results = client.cancel(*args.job_ids)
    for result in results:
        if result["ok"]:
            print(f"cancelled job {result['job_id']}")
        else:
            print(f"zmgpu: {result['message']}", file=sys.stderr)
    return 0 if all(result["ok"] for result in results) else 1
