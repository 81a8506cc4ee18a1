"""``zmgpu show``: every field of one job, one ``Key: value`` line each, or as JSON."""

from __future__ import annotations

import argparse
import json
import time

from ..errors import ClientError
from ..model import format_duration, format_size
from ..protocol import ErrorCode
from .common import add_connection_timeout, client_config, job_id_arg, make_client
from .queue import placement, run_time

HELP = "show every field of a job"
DESCRIPTION = (
    "Show everything the master knows about one job, one 'Key: value' line per field, like scontrol "
    "show job: times in local time, durations as [D-]H:MM:SS, the GPUs of each rank as node:indices, "
    "and how many bytes of output each rank wrote.  An array id shows every task of the array, a blank "
    "line between tasks.  Exit status 1 for a job the master does not know (finished jobs are kept for "
    "the master's retention time).")

NO_VALUE = "-"


def _plain(value) -> str:
    return NO_VALUE if value is None else str(value)


def _yes_no(value) -> str:
    return "yes" if value else "no"


def _when(epoch) -> str:
    """Epoch seconds as a local date and time."""
    return NO_VALUE if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _limit(seconds) -> str:
    return "UNLIMITED" if seconds is None else format_duration(seconds)


def _allocation(allocation: list) -> str:
    """``n1:0,1 (rank 0), n2:0 (rank 1)``."""
    return ", ".join(f"{placement([rank])} (rank {i})" for i, rank in enumerate(allocation)) or NO_VALUE


def size(nbytes: int) -> str:
    """A byte count for a person: ``512 B``, ``1.5 KiB``, ``3.0 MiB``."""
    if nbytes < 1024:
        return f"{nbytes} B"
    value = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _outputs(outputs: list) -> str:
    """``rank 0: stdout 1.5 KiB, stderr 0 B``, ranks separated by ``;``."""
    ranks: dict[int, list] = {}
    for out in outputs:
        ranks.setdefault(out["rank"], []).append(f"{out['stream']} {size(out['size'])}")
    return "; ".join(f"rank {rank}: {', '.join(parts)}" for rank, parts in sorted(ranks.items())) or NO_VALUE


#: Job dict key -> (label, how its value is shown), in the order shown; keys the master
#: adds later still show, after these, under a label made from the key.
FIELDS = {
    "job_id": ("JobId", _plain),
    "array_job_id": ("ArrayJobId", _plain),
    "array_task_id": ("ArrayTaskId", _plain),
    "name": ("Name", _plain),
    "user": ("User", _plain),
    "state": ("State", _plain),
    "reason": ("Reason", _plain),
    "priority": ("Priority", _plain),
    "command": ("Command", _plain),
    "cwd": ("WorkDir", _plain),
    "gpus": ("Gpus", _plain),
    "gpu_mem_mb": ("GpuMem", lambda mib: format_size(mib) if mib else "- (GPUs of its own)"),
    "per_gpu": ("PerGpu", _yes_no),
    "node_gpu_ids": ("NodeGpuIds", _plain),
    "allocation": ("Allocation", _allocation),
    "interactive": ("Interactive", _yes_no),
    "time_limit": ("TimeLimit", _limit),
    "requeue": ("Requeue", _yes_no),
    "requeue_count": ("RequeueCount", _plain),
    "after": ("After", lambda ids: ":".join(ids) or NO_VALUE),
    "after_any": ("AfterAny", _yes_no),
    "submit_time": ("SubmitTime", _when),
    "start_time": ("StartTime", _when),
    "end_time": ("EndTime", _when),
    "exit_code": ("ExitCode", _plain),
    "signal": ("Signal", _plain),
    "outputs": ("Output", _outputs),
    "peak_gpu_mem_mb": ("PeakGpuMem", lambda mib: f"{format_size(mib)} (on its busiest GPU)" if mib else NO_VALUE),
    "master_port": ("MasterPort", _plain),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zmgpu show``."""
    parser.add_argument("job_id", type=job_id_arg, metavar="JOB_ID",
                        help="a job id, an array task id (ID_INDEX), or an array id (all its tasks)")
    parser.add_argument("--json", action="store_true", default=None,
                        help="print the job's dict as the master gives it; a list of them for an array "
                             "id (default: Key: value lines)")
    add_connection_timeout(parser)


def run(args: argparse.Namespace) -> int:
    """Print the job (or the array's tasks)."""
    with make_client(client_config(args)) as client:
        jobs = client.queue(all=True, job_ids=[args.job_id], nodes=False)["jobs"]
    if not jobs:
        raise ClientError(ErrorCode.UNKNOWN_JOB.value, f"unknown job id '{args.job_id}'")
    one_job = len(jobs) == 1 and jobs[0]["job_id"] == args.job_id
    if args.json:
        print(json.dumps(jobs[0] if one_job else jobs, indent=2))
    else:
        print("\n\n".join(format_job(job, time.time()) for job in jobs))
    return 0


def format_job(job: dict, now: float) -> str:
    """Every field of ``job`` as ``Key: value`` lines; RunTime follows EndTime."""
    lines = []
    for key in [key for key in FIELDS if key in job] + [key for key in job if key not in FIELDS]:
        label, show = FIELDS.get(key, (_label(key), _json))
        lines.append(f"{label}: {show(job[key])}")
        if key == "end_time":
            lines.append(f"RunTime: {format_duration(run_time(job, now))}")
    return "\n".join(lines)


def _label(key: str) -> str:
    """``requeue_count`` -> ``RequeueCount``, for fields this command does not know yet."""
    return "".join(part.capitalize() for part in key.split("_"))


def _json(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)
