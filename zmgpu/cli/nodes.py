"""``zmgpu nodes``: each node's status and each of its GPUs, or the master's node dicts as JSON."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections import Counter

from ..model import NodeStatus, format_size
from .common import add_connection_timeout, client_config, make_client
from .queue import GAP, cut, foreign_use

HELP = "show nodes and their GPUs"
DESCRIPTION = (
    "Show one line per node: its name, STATUS (idle, mixed: some GPUs busy, allocated: all busy, "
    "drained: an admin stopped new jobs there, down: not heard from), its GPUs free for new jobs out of "
    "its total, and the reason it was drained.  Under it, one line per GPU: index, model, memory in use "
    "of its total, utilization and temperature as the node last reported them, 'simulated' for a "
    "simulated GPU, and who has it: the job holding it, the --gpu-mem jobs sharing it and the room left, "
    "'others: pid ...' for processes zmgpu did not start, 'drained: ...' when NVML reports it unhealthy, "
    "'dirty: ...' while processes of an ended job still hold it, or '-' when free.  A master that accepts "
    "anyone on the network without keys (--insecure) earns a warning line on stderr.")

NODE_HEADERS = ("NODE", "STATUS", "FREE/TOTAL", "REASON")
#: Statuses in which a node takes new jobs, so its unheld GPUs count as free.
PLACEABLE = frozenset({NodeStatus.IDLE, NodeStatus.MIXED, NodeStatus.ALLOCATED})
INDENT = "  "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zmgpu nodes``."""
    parser.add_argument("--json", action="store_true", default=None,
                        help='print {"nodes": [...]} as the master gives it (default: a listing)')
    add_connection_timeout(parser)


#: Printed (on stderr) when the master accepts anyone on the network without keys.
INSECURE_WARNING = ("zmgpu: WARNING: this master runs --insecure: anyone who can reach it can run any "
                    "command on every node, as any user (see README, 'Secure setup')")


def run(args: argparse.Namespace) -> int:
    """Print the nodes (and a warning about a master that runs without keys for the whole network)."""
    with make_client(client_config(args)) as client:
        cluster = client.cluster()
    if cluster["insecure"]:
        print(INSECURE_WARNING, file=sys.stderr)
    if args.json:
        print(json.dumps(cluster, indent=2))
    else:
        print(format_nodes(cluster["nodes"], shutil.get_terminal_size().columns))
    return 0


def format_nodes(nodes: list, width: int = 80) -> str:
    """A line per node (the drain reason cut to ``width``), then an indented line per GPU."""
    node_rows = [NODE_HEADERS] + [node_row(node) for node in nodes]
    node_widths = _widths(node_rows)
    gpu_rows = {node["node_id"]: [gpu_row(gpu) for gpu in node["gpus"]] for node in nodes}
    gpu_widths = _widths([row for rows in gpu_rows.values() for row in rows])
    lines = [_line(NODE_HEADERS, node_widths, width)]
    for node, row in zip(nodes, node_rows[1:]):
        lines.append(_line(row, node_widths, width))
        lines.extend(INDENT + _line(gpu, gpu_widths, width - len(INDENT)) for gpu in gpu_rows[node["node_id"]])
    return "\n".join(lines)


def _widths(rows: list) -> list:
    return [max(len(cell) for cell in column) for column in zip(*rows)] if rows else []


def _line(row: tuple, widths: list, width: int) -> str:
    """Cells left-aligned in their columns (empty columns left out); the last one cut to fit ``width``."""
    head = "".join(cell.ljust(w) + GAP for cell, w in zip(row[:-1], widths) if w)
    return (head + cut(row[-1], width - len(head))).rstrip()


def node_row(node: dict) -> tuple:
    """NODE, STATUS, FREE/TOTAL, REASON; a node that takes no new jobs has no free GPUs."""
    status = NodeStatus(node["status"])
    gpus = node["gpus"]
    free = sum(1 for gpu in gpus if gpu.get("free")) if status in PLACEABLE else 0
    return node["node_id"], status.value, f"{free}/{len(gpus)}", node.get("drain_reason") or ""


def gpu_row(gpu: dict) -> tuple:
    """``GPU 0``, model, memory used/total, utilization, temperature, ``simulated`` or nothing, who has it."""
    used = gpu.get("used_mb")
    total = format_size(gpu["memory_mb"])
    usage = f"{format_size(used)}/{total}" if used is not None else total
    util = f"{gpu['utilization']}%" if gpu.get("utilization") is not None else ""
    temp = f"{gpu['temperature']}C" if gpu.get("temperature") is not None else ""
    return (f"GPU {gpu['index']}", gpu["name"], usage, util, temp,
            "simulated" if gpu.get("simulated") else "", gpu_user(gpu))


def gpu_user(gpu: dict) -> str:
    """Who has the GPU: a job, sharing jobs, others, or why no one may; ``-`` when free."""
    if gpu.get("unavailable"):
        return gpu["unavailable"]
    if gpu.get("job_id"):
        who = gpu["job_id"]
    elif gpu.get("shared_by"):
        who = f"shared: {','.join(gpu['shared_by'])} ({format_size(max(gpu.get('room_mb') or 0, 0))} left)"
    else:
        who = "-"
    foreign = foreign_use(gpu)
    return f"{who}; {foreign}" if foreign and who != "-" else foreign or who


def gpu_models(gpus: list) -> str:
    """``4 x NVIDIA H200``; simulated GPUs say so; ``-`` for a node without GPUs."""
    counts = Counter("simulated" if gpu.get("simulated") else gpu["name"] for gpu in gpus)
    return ", ".join(f"{n} x {name}" for name, n in counts.items()) or "-"
