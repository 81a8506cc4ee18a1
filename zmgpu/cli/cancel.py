"""``zmgpu cancel``: cancel jobs, one line of result per job."""

from __future__ import annotations

import argparse
import sys

from ..model import is_job_id
from .common import add_connection_timeout, client_config, make_client, not_a_job_id

HELP = "cancel jobs"
DESCRIPTION = (
    "Cancel pending or running jobs.  A running job gets SIGCONT and SIGTERM, then SIGKILL after the "
    "master's grace period.  An array id cancels every unfinished task of the array, ARRAYID_INDEX one "
    "task.  One line per id; the exit status is 1 if any could not be cancelled (for example an "
    "unknown or malformed job id).")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zmgpu cancel``."""
    parser.add_argument("job_ids", nargs="+", metavar="JOB_ID",
                        help="a job id, an array id (all its tasks) or ARRAYID_INDEX (one task)")
    add_connection_timeout(parser)


def run(args: argparse.Namespace) -> int:
    """Cancel; report each id on its own line, in the order given (failures on stderr)."""
    valid = [job_id for job_id in args.job_ids if is_job_id(job_id)]
    answers = iter(())
    if valid:
        with make_client(client_config(args)) as client:
            answers = iter(client.cancel(*valid))   # one result per id, in order
    ok = True
    for job_id in args.job_ids:
        result = next(answers) if is_job_id(job_id) else {"ok": False, "message": not_a_job_id(job_id)}
        if result["ok"]:
            print(f"cancelled job {job_id}")
        else:
            print(f"zmgpu: {result['message']}", file=sys.stderr)
        ok = ok and result["ok"]
    return 0 if ok else 1
