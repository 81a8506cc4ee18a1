"""``zmgpu wait``: block until jobs end; the exit status says whether they all succeeded."""

from __future__ import annotations

import argparse
import sys

from ..model import JobState, shell_exit_status
from .common import add_connection_timeout, client_config, ending, job_id_arg, make_client

HELP = "wait until jobs end; exit with the first failure's status"
DESCRIPTION = (
    "Block until every given job has ended (an array id stands for all its tasks).  Prints nothing when "
    "they all completed, and exits 0.  Otherwise it prints one line per job that did not complete on "
    "stderr and exits with the status of the first of them in the order given: its exit code, 128+N "
    "when signal N killed it, or 1 when it ended without an exit code of its own (cancelled while "
    "pending, node failure).  Ctrl-C stops waiting (exit status 130) and leaves the jobs as they are.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zmgpu wait``."""
    parser.add_argument("job_ids", nargs="+", type=job_id_arg, metavar="JOB_ID",
                        help="a job id, an array task id (ID_INDEX), or an array id (all its tasks)")
    add_connection_timeout(parser)


def run(args: argparse.Namespace) -> int:
    """Wait, report the jobs that did not complete, and return the first one's status."""
    with make_client(client_config(args)) as client:
        jobs = client.wait(args.job_ids)
    failed = [job for job in jobs if job["state"] != JobState.COMPLETED.value]
    for job in failed:
        print(f"zmgpu: {ending(job)}", file=sys.stderr)
    return exit_status(failed[0]) if failed else 0


def exit_status(job: dict) -> int:
    """What a shell would report for a job that did not complete; never 0 (a cancelled job may exit 0)."""
    return shell_exit_status(job["exit_code"], job["signal"]) or 1
