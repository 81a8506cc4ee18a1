"""``zmgpu queue``: the jobs the master knows, as one squeue-like table or as JSON."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass

from ..model import JobState, foreign_pids, format_duration, format_size, in_foreign_use
from .common import add_connection_timeout, client_config, make_client

HELP = "show jobs (pending and running; finished ones with --all)"
DESCRIPTION = (
    "Show one line per job, as squeue does: ID, NAME (the command when the job has no name), USER, STATE, "
    "TIME (elapsed; 0:00 while pending), GPUS, and NODELIST(REASON): the node:GPU list of a running or "
    "finished job, or why a pending job waits in parentheses (Resources, Priority, Dependency, "
    "UserGPULimit, NodeDown, PinnedGPUsBusy, ArrayLimit).  The pending tasks of an array that are "
    "consecutive (in submission order) and wait for the same reason share one line, ARRAYID_[ranges%N] "
    "(%N when the array has a limit), as in squeue; --array lists them one by one.  Cells that do not fit "
    "the terminal end in '+'.  zmgpu nodes shows the nodes.")

#: Slurm's short state codes (squeue -t), accepted by --state beside the full names.
STATE_CODES = {"PD": JobState.PENDING, "R": JobState.RUNNING, "CD": JobState.COMPLETED,
               "F": JobState.FAILED, "CA": JobState.CANCELLED, "TO": JobState.TIMEOUT,
               "NF": JobState.NODE_FAIL}

CUT = "+"            # marks a cell cut to fit, as sacct does
GAP = "  "           # between columns
NAME_MIN = 8         # a name is never cut shorter than squeue's 8 characters ...
USER_MAX = 8         # ... and a user name never shown longer
ID_MAX = 24          # an array's pending tasks shown as one (ARRAYID_[ranges]) may have a long id: cut there


@dataclass(frozen=True)
class Column:
    """One column of the table: its header, and whether its cells align right (numbers)."""

    header: str
    right: bool = False


COLUMNS = (Column("ID"), Column("NAME"), Column("USER"), Column("STATE"), Column("TIME", right=True),
           Column("GPUS", right=True), Column("NODELIST(REASON)"))
ID, NAME, USER, NODELIST = 0, 1, 2, 6   # the columns whose width depends on the room left, or is capped


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zmgpu queue``."""
    parser.add_argument("--all", "-a", action="store_true", default=None,
                        help="include finished jobs, as long as the master keeps them (default: pending "
                             "and running jobs only)")
    parser.add_argument("--user", "-u", default=None, metavar="USER",
                        help="only this user's jobs (default: everyone's)")
    parser.add_argument("--state", "-t", type=_states, default=None, metavar="STATE[,STATE...]",
                        help="only jobs in these states: " + ", ".join(s.value for s in JobState)
                             + ", or Slurm's codes " + ", ".join(STATE_CODES) + "; a finished state "
                             "implies --all (default: every state shown)")
    parser.add_argument("--array", "-r", action="store_true", default=None,
                        help="one line per pending array task (default: the pending tasks of an array that "
                             "are consecutive and wait for the same reason share one line, ARRAYID_[ranges], "
                             "with %%N when the array has a limit)")
    parser.add_argument("--json", action="store_true", default=None,
                        help='print {"jobs": [...], "nodes": [...]} as the master gives it, one dict per job '
                             "(default: a table)")
    add_connection_timeout(parser)


def _states(text: str) -> list[JobState]:
    """``running,PD`` -> [RUNNING, PENDING]."""
    states = []
    for word in filter(None, (w.strip().upper() for w in text.split(","))):
        state = STATE_CODES.get(word) or JobState.__members__.get(word)
        if state is None:
            raise argparse.ArgumentTypeError(f"unknown job state '{word}'")
        states.append(state)
    if not states:
        raise argparse.ArgumentTypeError("no state given")
    return states


def run(args: argparse.Namespace) -> int:
    """Print the queue."""
    states = args.state or []
    finished_wanted = any(state.finished for state in states)
    with make_client(client_config(args)) as client:
        listing = client.queue(all=bool(args.all) or finished_wanted, user=args.user,
                               states=[state.value for state in states] or None,
                               collapse=not (args.array or args.json), fields=None if args.json else TABLE_FIELDS,
                               nodes=True if args.json else "foreign")
    if args.json:
        print(json.dumps(listing, indent=2))
    else:
        width = shutil.get_terminal_size().columns
        print(format_queue(listing["jobs"], time.time(), width))
        for line in others_lines(listing["nodes"]):
            print(cut(line, width))
    return 0


def others_lines(nodes: list) -> list[str]:
    """One line per GPU that processes zmgpu did not start are using, so waiting jobs make sense."""
    return [f"{node['node_id']} GPU {gpu['index']} in use by {use}"
            for node in nodes for gpu in node["gpus"] if (use := foreign_use(gpu))]


def foreign_use(gpu: dict) -> str:
    """``others: pid 4242 (3 GiB)`` for processes zmgpu did not start; empty when there are none."""
    if not in_foreign_use(gpu):
        return ""
    pids = [str(pid) for pid in foreign_pids(gpu)]
    shown = ",".join(pids[:3]) + ("..." if len(pids) > 3 else "")
    return f"others: {'pid ' + shown if pids else 'no listed process'} ({format_size(gpu.get('foreign_mb') or 0)})"


def format_queue(jobs: list, now: float, width: int = 80) -> str:
    """The jobs as a table whose lines fit ``width`` (NAME and NODELIST(REASON) give way first)."""
    cells = [tuple(column.header for column in COLUMNS)] + [job_row(job, now) for job in jobs]
    natural = [max(map(len, column)) for column in zip(*cells)]
    widths = list(natural)
    widths[USER] = min(widths[USER], USER_MAX)
    widths[ID] = min(widths[ID], ID_MAX)
    # NAME and NODELIST share what the fixed columns leave.  When both are long, where jobs run
    # matters more: NODELIST keeps two thirds (at least its header's width), NAME the rest (at
    # least NAME_MIN).
    fixed = sum(w for i, w in enumerate(widths) if i not in (NAME, NODELIST)) + len(GAP) * (len(COLUMNS) - 1)
    room = max(0, width - fixed)
    nodelist_share = min(widths[NODELIST], max(len(COLUMNS[NODELIST].header), room * 2 // 3))
    widths[NAME] = min(widths[NAME], max(NAME_MIN, room - nodelist_share))
    widths[NODELIST] = max(len(CUT), room - widths[NAME])
    # One format for every line; only the columns narrower than their longest cell need cutting.
    line = GAP.join(f"{{:{'>' if column.right else '<'}{w}}}" for column, w in zip(COLUMNS, widths)).format
    narrowed = [i for i, w in enumerate(widths) if w < natural[i]]
    if narrowed:
        cells = [_cut_cells(row, narrowed, widths) for row in cells]
    return "\n".join(line(*row).rstrip() for row in cells)


def _cut_cells(row: tuple, narrowed: list[int], widths: list[int]) -> list[str]:
    """The row with its cells in the ``narrowed`` columns cut to their widths."""
    row = list(row)
    for i in narrowed:
        row[i] = cut(row[i], widths[i])
    return row


def cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, its end replaced by ``+`` when cut."""
    return text if len(text) <= width else text[:max(0, width - len(CUT))] + CUT


#: The job dict keys the table reads (see job_row): the master sends only these.
TABLE_FIELDS = ("job_id", "name", "command", "user", "state", "start_time", "end_time", "gpus", "allocation",
                "reason")


def job_row(job: dict, now: float) -> tuple:
    """One job as table cells."""
    name = job.get("name") or " ".join(job["command"].split())
    return (job["job_id"], name, job["user"], job["state"], format_duration(run_time(job, now)),
            str(job["gpus"]), nodelist_or_reason(job))


def run_time(job: dict, now: float) -> float:
    """Seconds the job has run (until it ended, or until ``now``); 0 before it starts."""
    start, end = job.get("start_time"), job.get("end_time")
    return 0 if start is None else (end if end is not None else now) - start


def nodelist_or_reason(job: dict) -> str:
    """Where the job runs or ran (``n1:0,1 n2:0``); why it waits, or why it never ran, in parentheses."""
    if job["state"] != JobState.PENDING.value:
        where = placement(job["allocation"])
        if where:
            return where
    return f"({job.get('reason') or 'None'})"


def placement(allocation: list) -> str:
    """``node1:0,1 node2:0``; a rank without GPUs shows its node alone."""
    parts = []
    for rank in allocation:
        indices = ",".join(str(i) for i in rank["gpu_indices"])
        parts.append(f"{rank['node_id']}:{indices}" if indices else rank["node_id"])
    return " ".join(parts)

