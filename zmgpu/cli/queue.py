"""``zmgpu queue``: the jobs and nodes the master knows, as two tables or as JSON."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections import Counter

from ..model import JobState, NodeState
from .common import add_connection_timeout, client_config, make_client

HELP = "show jobs and nodes"
DESCRIPTION = (
    "Show the jobs (id, state, user, node:GPU list, elapsed time, command) and the nodes (state, GPUs "
    "free/busy/total, their model, and whether they are simulated).  A pending job shows why it waits "
    "in place of its node list.  Finished jobs are shown with --all.")

JOB_HEADERS = ("ID", "STATE", "USER", "NODES:GPUS", "ELAPSED", "COMMAND")
NODE_HEADERS = ("NODE", "STATE", "FREE/BUSY/TOTAL", "GPUS")
ELLIPSIS = "..."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zmgpu queue``."""
    parser.add_argument("--all", "-a", action="store_true", default=None,
                        help="include finished jobs (default: pending and running jobs only)")
    parser.add_argument("--json", action="store_true", default=None,
                        help='print {"jobs": [...], "nodes": [...]} as the master gives it '
                             "(default: tables)")
    add_connection_timeout(parser)


def run(args: argparse.Namespace) -> int:
    """Print the queue."""
    with make_client(client_config(args)) as client:
        listing = client.queue(all=bool(args.all))
    if args.json:
        print(json.dumps(listing, indent=2))
    else:
        print(format_queue(listing, time.time(), shutil.get_terminal_size().columns))
    return 0


def format_queue(listing: dict, now: float, width: int = 80) -> str:
    """The jobs table, a blank line, the nodes table; the last column is cut to ``width``."""
    jobs = table(JOB_HEADERS, [job_row(job, now) for job in listing["jobs"]], width)
    nodes = table(NODE_HEADERS, [node_row(node) for node in listing["nodes"]], width)
    return "\n".join(jobs + [""] + nodes)


def job_row(job: dict, now: float) -> tuple:
    """One job as table cells."""
    if job["state"] == JobState.PENDING.value:
        where = f"({job['reason']})" if job.get("reason") else "-"
    else:
        where = placement(job["allocation"]) or "-"
    return (job["job_id"], job["state"], job["user"], where,
            elapsed(job.get("start_time"), job.get("end_time"), now),
            " ".join(job["command"].split()))


def placement(allocation: list) -> str:
    """``node1:0,1 node2:0``; a rank without GPUs shows its node alone."""
    parts = []
    for rank in allocation:
        indices = ",".join(str(i) for i in rank["gpu_indices"])
        parts.append(f"{rank['node_id']}:{indices}" if indices else rank["node_id"])
    return " ".join(parts)


def elapsed(start: float | None, end: float | None, now: float) -> str:
    """Run time as H:MM:SS (0:00:00 before the job starts)."""
    seconds = 0 if start is None else max(0, int((end if end is not None else now) - start))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def node_row(node: dict) -> tuple:
    """One node as table cells; a down node has no free GPUs."""
    gpus = node["gpus"]
    busy = sum(1 for gpu in gpus if gpu.get("job_id"))
    free = len(gpus) - busy if node["state"] == NodeState.UP.value else 0
    return (node["node_id"], node["state"], f"{free}/{busy}/{len(gpus)}", gpu_models(gpus))


def gpu_models(gpus: list) -> str:
    """``4 x NVIDIA H200``; simulated GPUs say so; ``-`` for a node without GPUs."""
    counts = Counter("simulated" if gpu.get("simulated") else gpu["name"] for gpu in gpus)
    return ", ".join(f"{n} x {name}" for name, n in counts.items()) or "-"


def table(headers: tuple, rows: list, width: int) -> list:
    """Left-aligned columns two spaces apart; the last cell is cut so a line fits ``width``."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = []
    for row in (headers, *rows):
        head = "  ".join(str(cell).ljust(w) for cell, w in zip(row[:-1], widths))
        lines.append(head + "  " + fit(str(row[-1]), width - len(head) - 2))
    return lines


def fit(text: str, room: int) -> str:
    """``text`` cut to ``room`` characters, ending in ``...`` when cut (at least the ellipsis shows)."""
    if len(text) <= room:
        return text
    return text[:max(0, room - len(ELLIPSIS))] + ELLIPSIS
