"""``zmgpu submit``: queue a job, or run it interactively with its output streamed here."""

from __future__ import annotations

import argparse
import shlex

from ..model import parse_array_spec, parse_node_gpu_ids, parse_size, parse_time_limit
from ..stream import SignalTrap
from .attach import view
from .common import (UsageError, add_connection_timeout, add_max_consecutive_timeouts, add_session_timeout,
                     client_config, job_id_arg, make_client, non_negative_int, seconds)

HELP = "submit a job (prints its id), or run it interactively"
DESCRIPTION = (
    "Submit a command to run on GPUs of the cluster.  The command is one string, run by /bin/sh on the "
    "node, or the words after --, quoted so that each stays one argument.  The job runs in the current "
    "directory with the current environment, plus CUDA_VISIBLE_DEVICES (the GPUs it was given), "
    "CUDA_DEVICE_ORDER=PCI_BUS_ID, ZMGPU_JOB_ID and ZMGPU_NODE_ID (and ZMGPU_ARRAY_JOB_ID and "
    "ZMGPU_ARRAY_TASK_ID in an array task), and torchrun's variables: MASTER_ADDR and MASTER_PORT (a free "
    "port on the job's first node, which every rank can reach), WORLD_SIZE, RANK, NODE_RANK, NNODES, "
    "LOCAL_RANK and LOCAL_WORLD_SIZE.  By default one process per node gets all that node's GPUs, with "
    "LOCAL_WORLD_SIZE its GPU count, so 'torchrun --nnodes $NNODES --node_rank $NODE_RANK --nproc_per_node "
    "$LOCAL_WORLD_SIZE --master_addr $MASTER_ADDR --master_port $MASTER_PORT train.py' works; with "
    "--per-gpu each GPU gets a process of its own, for scripts that call torch.distributed directly.  If "
    "any rank fails, the others are stopped and the job ends FAILED naming that rank and its node.  A GPU "
    "that someone else's processes use is not given to a job, unless it declared --gpu-mem and fits beside "
    "them.  Without --interactive the job id (8 hex characters; for "
    "--array, the array id) is printed alone on stdout.  With --interactive nothing else is printed on stdout: "
    "the job's stdout and stderr come to this terminal's stdout and stderr byte for byte, and zmgpu exits "
    "with the job's exit status (128+N when a signal N killed it).  Ctrl-C, from the moment the job is "
    "submitted, cancels it and keeps showing its last output; a second Ctrl-C stops watching (exit status "
    "130).  Ctrl-\\ (SIGQUIT) detaches and leaves the job running, saying on stderr how to re-attach with "
    "zmgpu attach (exit status 1).  If the reader of stdout goes away (zmgpu submit -i ... | head), the job "
    "is cancelled and zmgpu exits 141, as a pipeline's writer would.  The session outlives a master "
    "restart: it goes on where it was, without a gap or a repeated byte.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zmgpu submit``."""
    parser.add_argument("--gpus", type=non_negative_int, default=0, metavar="N",
                        help="number of GPUs; more than one node has free spans several nodes, one "
                             "process (rank) per node, started together (default: 0, a CPU job)")
    parser.add_argument("--gpu-mem", type=_size, default=None, metavar="SIZE",
                        help="GPU memory the job needs on each of its GPUs, e.g. 800M or 12G; the job may "
                             "then share a GPU with other --gpu-mem jobs while what they declared, plus "
                             "what others' processes use, fits in its memory (less the node's reserve). "
                             "zmgpu show reports the peak a finished job used, to learn what to declare "
                             "(default: the job's GPUs are its own)")
    parser.add_argument("--per-gpu", action="store_true", default=None,
                        help="start one process per GPU, each with its own CUDA_VISIBLE_DEVICES, RANK and "
                             "LOCAL_RANK, as a plain torch.distributed script expects (default: one "
                             "process per node, given all of that node's GPUs, as torchrun expects)")
    parser.add_argument("--label", "-l", action="store_true", default=None,
                        help="with --interactive: begin each line of output with the rank that wrote it, "
                             "as srun --label does (default: the bytes as they are)")
    parser.add_argument("--node-gpu-ids", type=_gpu_pins, default=None, metavar="SPEC",
                        help="run on exactly these GPUs instead, e.g. 'node001:0,1;node002:0' "
                             "(default: any free GPUs)")
    parser.add_argument("--time", "-t", type=_time_limit, default=None, metavar="LIMIT",
                        help="stop the job after this long (TERM, then KILL after the master's grace "
                             "period) and end it TIMEOUT; Slurm's formats MM, MM:SS, HH:MM:SS, D-HH, "
                             "D-HH:MM, D-HH:MM:SS (default: the master's default limit, if any)")
    parser.add_argument("--name", "-J", type=_job_name, default=None, metavar="NAME",
                        help="a name for the job, shown by zmgpu queue (default: none; the queue shows "
                             "the command)")
    parser.add_argument("--requeue", action="store_true", default=None,
                        help="if the job's node fails, put it back in the queue with the same id, up "
                             "to the master's requeue limit (default: the job ends NODE_FAIL)")
    parser.add_argument("--after", type=_job_ids, default=None, metavar="JOB[:JOB...]",
                        help="start only after these jobs completed successfully (an array id means "
                             "all its tasks); if one does not, this job is cancelled (default: no "
                             "dependency)")
    parser.add_argument("--after-any", action="store_true", default=None,
                        help="with --after: start once those jobs have ended, in any state (default: "
                             "only after they completed)")
    parser.add_argument("--array", "-a", type=_array_spec, default=None, metavar="SPEC",
                        help="submit one task per index, e.g. 0-99, 0-99%%8 (at most 8 at once), "
                             "0-10:2 or 1,5,7, each with ZMGPU_ARRAY_JOB_ID and ZMGPU_ARRAY_TASK_ID "
                             "set; not with --interactive (default: one job)")
    parser.add_argument("--priority", type=int, default=None, metavar="N",
                        help="queue priority: higher starts first, ties in submission order; users may "
                             "only lower their own (N < 0), admins may raise it (default: 0)")
    parser.add_argument("--interactive", "-i", action="store_true", default=None,
                        help="stream the job's output here and exit with its exit status "
                             "(default: print the job id and return at once)")
    add_session_timeout(parser)
    add_connection_timeout(parser)
    parser.add_argument("--max-wait-time", type=seconds, default=None, metavar="S",
                        help="how long an interactive job may stay PENDING; then zmgpu cancels it, "
                             "says so and exits 1, like srun --immediate (default: 300)")
    add_max_consecutive_timeouts(parser)
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND",
                        help="the command line, as one string run by /bin/sh, or -- followed by a "
                             "program and its arguments; options go before it")


def _checked(parse, keep_text: bool):
    """An argparse ``type`` that runs a model parser here, so a typo fails before reaching the master.

    The parser's ValueError is already a sentence for the user.  ``keep_text``: the option's value is
    the text as given (the master reads the spec itself), else what ``parse`` returned.
    """
    def check(text: str):
        try:
            value = parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text if keep_text else value

    return check


_gpu_pins = _checked(parse_node_gpu_ids, keep_text=True)
_array_spec = _checked(parse_array_spec, keep_text=True)
_time_limit = _checked(parse_time_limit, keep_text=False)   # seconds
_size = _checked(parse_size, keep_text=False)               # MiB


def _job_name(text: str) -> str:
    """A --name: not blank, and on one line so the queue table stays a table."""
    if not text.strip() or not text.isprintable():
        raise argparse.ArgumentTypeError(f"bad job name {text!r}: expected printable text on one line")
    return text


def _job_ids(text: str) -> list[str]:
    """An --after list ``JOB[:JOB...]``."""
    return [job_id_arg(word) for word in text.split(":")]


def command_line(words: list[str]) -> str:
    """One string for /bin/sh: one quoted command as it is, or the program and its arguments quoted."""
    if words and words[0] == "--":
        words = words[1:]
        if not words:
            raise UsageError("no command after --")
        return shlex.join(words)
    if not words:
        raise UsageError('no command given: zmgpu submit [options] "command" or -- program args...')
    if len(words) > 1 and not any(c.isspace() for c in words[0]):
        # `zmgpu submit python train.py --lr 3`: words go to the program, as srun and sbatch pass them.
        return shlex.join(words)
    if len(words) > 1:
        # Without this, `submit "cmd" --gpus 2` would quietly run `cmd --gpus 2` on no GPU.
        raise UsageError(f"the command {shlex.quote(words[0])} is followed by more words ({shlex.join(words[1:])}): "
                         f"put options before the command, or use -- program args... for a program and its "
                         f"arguments")
    return words[0]


def run(args: argparse.Namespace) -> int:
    """Submit; print the id, or show the job here and return its exit status."""
    command = command_line(args.command)
    if args.interactive and args.array:
        raise UsageError("--array cannot be --interactive: submit the array, then zmgpu wait for it")
    if args.after_any and not args.after:
        raise UsageError("--after-any needs --after JOB[:JOB...]")
    if args.label and not args.interactive:
        raise UsageError("--label labels the output shown here: it needs --interactive")
    config = client_config(args)
    options = dict(gpus=args.gpus, node_gpu_ids=args.node_gpu_ids, interactive=bool(args.interactive),
               name=args.name, time_limit=args.time, requeue=bool(args.requeue), after=args.after or [],
               after_any=bool(args.after_any), array=args.array, priority=args.priority or 0,
               gpu_mem_mb=args.gpu_mem, per_gpu=bool(args.per_gpu))
    with make_client(config) as client:
        if not args.interactive:
            print(client.submit(command, **options))
            return 0
        # Trapped before the submit: a Ctrl-C while it is on its way cancels the job once its id is known.
        with SignalTrap() as trap:
            job_id = client.submit(command, **options)
            return view(client, job_id, config, trap, max_wait_time=config.max_wait_time, label=bool(args.label))
