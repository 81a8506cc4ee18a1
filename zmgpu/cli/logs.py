"""``zmgpu logs``: a job's whole output, byte for byte, and with --follow as it is produced."""

from __future__ import annotations

import argparse
import sys

from ..protocol import Stream
from .common import (add_connection_timeout, add_max_consecutive_timeouts, client_config, job_id_arg,
                     make_client, non_negative_int)

HELP = "print a job's output (stdout, or --stderr), following it with --follow"
DESCRIPTION = (
    "Print one output stream of a running or finished job, byte for byte, on stdout: its stdout, or its "
    "stderr with --stderr.  A job on several nodes has one process (rank) per node: their output comes "
    "one rank after the other, in rank order, or only --rank N's.  Without --follow zmgpu prints what "
    "the master holds now (everything, once the job has ended) and exits 0.  With --follow it goes on "
    "like tail -f until the job has ended and every byte is printed, then exits 0 (the exit status is "
    "not the job's: zmgpu show or zmgpu wait tell that); with several ranks, rank 0 is shown as it is "
    "produced and each next rank once the job has ended.  A pending job is waited for.  The master keeps "
    "a finished job's output for its retention time.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zmgpu logs``."""
    parser.add_argument("job_id", type=job_id_arg, metavar="JOB_ID", help="the job (or array task)")
    parser.add_argument("--follow", "-f", action="store_true", default=None,
                        help="keep printing output as the job produces it, until the job ends (default: "
                             "print what there is and exit)")
    parser.add_argument("--stderr", action="store_true", default=None,
                        help="print the job's stderr instead (default: its stdout)")
    parser.add_argument("--rank", type=non_negative_int, default=None, metavar="N",
                        help="only rank N's output, 0 being the first node of the job (default: every rank, "
                             "in rank order)")
    add_max_consecutive_timeouts(parser)
    add_connection_timeout(parser)


def run(args: argparse.Namespace) -> int:
    """Print the output."""
    config = client_config(args)
    stream = Stream.STDERR if args.stderr else Stream.STDOUT
    with make_client(config) as client:
        client.logs(args.job_id, sys.stdout.buffer, stream.value, rank=args.rank, follow=bool(args.follow),
                    max_consecutive_timeouts=config.max_consecutive_timeouts)
    return 0
