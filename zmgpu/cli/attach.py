"""``zmgpu attach``: make this terminal a running job's interactive view again, from any machine.

:func:`view` is the interactive session itself, shared with ``zmgpu submit
--interactive``: the job's stdout and stderr to this terminal's, Ctrl-C cancels,
Ctrl-\\ detaches, a reader of stdout that leaves ends the job, and the exit
status is the job's.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys

from ..errors import Detached, LocalError, MasterUnreachable
from ..model import JobState, shell_exit_status
from .common import (add_connection_timeout, add_max_consecutive_timeouts, add_session_timeout, client_config,
                     ending, job_id_arg, make_client, silence_stdout)

HELP = "show a running job's output here again, as submit --interactive does"
DESCRIPTION = (
    "Attach this terminal to a job, from any machine, as if it had been submitted here with --interactive: "
    "first what the job already wrote (unless --from-now), then its output as it is produced, stdout to "
    "stdout and stderr to stderr, byte for byte.  zmgpu exits with the job's exit status when it ends "
    "(128+N when a signal N killed it); a finished job's output is shown whole, with its status.  Ctrl-\\ "
    "(SIGQUIT) detaches and leaves the job running, saying on stderr how to re-attach (exit status 1), as "
    "does --session-timeout.  The first Ctrl-C cancels the job and keeps showing its last output; a second "
    "Ctrl-C stops watching (exit status 130).  If the reader of stdout goes away (zmgpu attach JOB | head), "
    "the job is cancelled and zmgpu exits 141, as a pipeline's writer would.  A pending job is waited for "
    "as long as it takes.")

#: Exit status of a session that stopped watching a job which had not ended, by the reason.
DETACHED_STATUS = {LocalError.DETACHED: 1, LocalError.SESSION_TIMEOUT: 1, LocalError.INTERRUPTED: 130}

#: Seconds the cancel of a first Ctrl-C may wait for the master.
CANCEL_TIMEOUT = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zmgpu attach``."""
    parser.add_argument("job_id", type=job_id_arg, metavar="JOB_ID", help="the job (or array task) to attach to")
    parser.add_argument("--from-now", action="store_true", default=None,
                        help="skip what the job wrote before attaching (default: show it all first)")
    parser.add_argument("--label", "-l", action="store_true", default=None,
                        help="begin each line of output with the rank that wrote it, as srun --label does "
                             "(default: the bytes as they are)")
    add_session_timeout(parser)
    add_max_consecutive_timeouts(parser)
    add_connection_timeout(parser)


def run(args: argparse.Namespace) -> int:
    """Attach; the job's exit status, or why the session ended first."""
    config = client_config(args)
    with make_client(config) as client:
        return view(client, args.job_id, config, from_now=bool(args.from_now), label=bool(args.label))


def view(client, job_id: str, config, trap=None, max_wait_time: float = math.inf, from_now: bool = False,
         label: bool = False) -> int:
    """Show a job here until it ends; the shell exit status it ended with, or why the session ended first.

    ``trap``: the :class:`zmgpu.stream.SignalTrap` the caller opened already (Ctrl-C during a submit);
    ``max_wait_time``: how long the job may stay pending before it is cancelled.
    """
    sys.stdout.flush()   # earlier text output must come before the job's bytes
    try:
        job = client.stream(job_id, sys.stdout.buffer, sys.stderr.buffer,
                            session_timeout=config.session_timeout, max_wait_time=max_wait_time,
                            max_consecutive_timeouts=config.max_consecutive_timeouts,
                            on_interrupt=lambda jid, count: _on_interrupt(client, jid, count),
                            from_now=from_now, detach_on_quit=True, signals=trap, label=label)
    except Detached as exc:
        print(f"zmgpu: {exc}", file=sys.stderr, flush=True)
        return DETACHED_STATUS[LocalError(exc.code)]
    except BrokenPipeError:
        # The reader of our output left (`| head`): end the job as srun's step would, and say nothing.
        silence_stdout()
        client.cancel(job_id)
        return 128 + signal.SIGPIPE
    _report_end(job)
    return shell_exit_status(job["exit_code"], job["signal"])


def _on_interrupt(client, job_id: str, count: int) -> bool:
    """First Ctrl-C cancels the job and keeps showing its last output; the second stops watching."""
    if count > 1:
        return False
    print(f"zmgpu: cancelling job {job_id} (Ctrl-C again to stop watching)", file=sys.stderr, flush=True)
    try:
        # Briefly: a master that is away must not freeze the terminal for the whole connection timeout.
        results = client.cancel(job_id, timeout=CANCEL_TIMEOUT)
    except MasterUnreachable:
        print(f"zmgpu: the master did not answer, so job {job_id} is not cancelled yet; Ctrl-C again to stop "
              f"watching, then zmgpu cancel {job_id}", file=sys.stderr, flush=True)
        return True
    for result in results:
        if not result["ok"]:
            print(f"zmgpu: {result['message']}", file=sys.stderr, flush=True)
    return True


def _report_end(job: dict) -> None:
    """Say on stderr why a job ended, unless its exit status tells it (stderr stays the job's own)."""
    state = JobState(job["state"])
    ran_to_an_exit = job["exit_code"] is not None or job["signal"] is not None
    if state is JobState.COMPLETED or (state is JobState.FAILED and ran_to_an_exit):
        return
    print(f"zmgpu: {ending(job)}", file=sys.stderr, flush=True)
