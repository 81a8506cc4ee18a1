"""``zmgpu demo``: a master and a node on loopback, two interactive jobs, the queue and nodes, a clean stop.

The one-command proof that an installation works: it runs the real daemons
(``python -m zmgpu.master`` and ``python -m zmgpu.node``) in a temporary
directory, with real GPUs when NVML finds some and simulated ones otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from ..config import ClientConfig
from ..model import NodeState
from .common import non_negative_int
from .nodes import format_nodes, gpu_models
from .queue import format_queue

HELP = "start a master and a node on loopback, run jobs through them, stop them"
DESCRIPTION = (
    "Check an installation end to end: start zmgpu-master and zmgpu-node on loopback in a temporary "
    "directory (real GPUs when NVML finds some, else 4 simulated ones), run an interactive job that "
    "prints where it runs, then a 2-GPU job streamed here, show the queue and the nodes, and stop both "
    "daemons.  Exit status 0 when everything worked; 1 with the reason and the daemons' log files "
    "otherwise.")

NODE_ID = "demo-node"
SIMULATED_BY_DEFAULT = 4
HEARTBEAT_INTERVAL = "0.2"      # fast, so the node registers at once
STARTUP_TIMEOUT = 30.0          # seconds for a daemon to come up (a cold Python start included)
STOP_TIMEOUT = 15.0             # seconds for a daemon to exit after SIGTERM
POLL_INTERVAL = 0.05

WHERE_COMMAND = ('echo "hostname: $(hostname)"; echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"; '
                 'echo "ZMGPU_JOB_ID=$ZMGPU_JOB_ID"')
WORK_COMMAND = ('for step in 1 2 3; do echo "step $step of 3 on GPUs [$CUDA_VISIBLE_DEVICES]"; '
                'sleep 0.2; done; echo "(a line on stderr)" >&2')


class DemoFailed(Exception):
    """A step of the demo did not work; the message says which."""


@dataclass
class Daemon:
    """A daemon the demo started, and where its log goes."""

    name: str
    log: str
    proc: subprocess.Popen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zmgpu demo``."""
    parser.add_argument("--gpus-simulated", type=non_negative_int, default=None, metavar="N",
                        help="give the node N simulated GPUs even if real ones exist (default: real "
                             f"GPUs when NVML finds some, else {SIMULATED_BY_DEFAULT} simulated)")
    parser.add_argument("--keep", action="store_true", default=None,
                        help="keep the temporary directory with the daemons' state and logs "
                             "(default: remove it on success)")


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 when every step worked."""
    from ..client import ClientError

    workdir = tempfile.mkdtemp(prefix="zmgpu-demo-")
    keep = bool(args.keep)
    daemons: list[Daemon] = []
    try:
        try:
            _walk_through(args, workdir, daemons)
        finally:
            problems = _stop(daemons)
        if problems:
            raise DemoFailed("; ".join(problems))
    except (DemoFailed, ClientError) as exc:
        print(f"zmgpu demo: {exc}", file=sys.stderr)
        for daemon in daemons:
            print(f"zmgpu demo: {daemon.name} log: {daemon.log}", file=sys.stderr)
        keep = True
        return 1
    finally:
        if keep:
            print(f"zmgpu demo: state and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\nDemo finished: both daemons stopped cleanly.")
    return 0


def _heading(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _walk_through(args: argparse.Namespace, workdir: str, daemons: list) -> None:
    """Start the daemons, run the jobs, show the queue and nodes (the daemons are stopped by the caller)."""
    from ..client import Client

    simulate = _gpus_to_simulate(args.gpus_simulated)
    _heading("Starting zmgpu-master on loopback")
    port_file = os.path.join(workdir, "master-ports.json")
    _start(daemons, "zmgpu-master", workdir, [
        "zmgpu.master", "--host", "127.0.0.1", "--port", "0", "--pub-port", "0",
        "--port-file", port_file, "--state-dir", os.path.join(workdir, "master"),
        "--heartbeat-interval", HEARTBEAT_INTERVAL,
        # The demo's jobs run as whoever runs it, root included (a fresh container): loopback, one user.
        "--allow-root-jobs"])
    ports = _wait_for(lambda: _read_ports(port_file), daemons, "the master to bind its ports")
    print(f"master: requests on tcp://127.0.0.1:{ports['port']}, "
          f"output published on tcp://127.0.0.1:{ports['pub_port']}")

    _heading("Starting zmgpu-node " + (f"with {simulate} simulated GPUs" if simulate is not None
                                       else "with the GPUs NVML finds"))
    _start(daemons, "zmgpu-node", workdir, [
        "zmgpu.node", "--node-id", NODE_ID, "--master-host", "127.0.0.1",
        "--master-port", str(ports["port"]), "--state-dir", os.path.join(workdir, "node"),
        "--heartbeat-interval", HEARTBEAT_INTERVAL, "--single-user"]   # the demo's jobs run as its own user
        + ([] if simulate is None else ["--simulate-gpus", str(simulate)]))

    # The demo's master has no keys: the user's own (for a real cluster) would only keep it from answering.
    with Client(port=ports["port"], pub_port=ports["pub_port"], timeout=10.0, default_keys=False) as client:
        node = _wait_for(lambda: _registered(client), daemons, f"node {NODE_ID} to register")
        gpu_count = len(node["gpus"])
        print(f"node {NODE_ID} registered; GPUs: "
              + (gpu_models(node["gpus"]) if gpu_count else "none, so the jobs run on CPU"))
        _run_job(client, workdir, "An interactive job that prints where it runs", "where", WHERE_COMMAND,
                 min(1, gpu_count))
        wide = min(2, gpu_count)
        kind = f"A {wide}-GPU job" if wide else "A CPU job"
        _run_job(client, workdir, f"{kind}, its output streamed as it runs", "steps", WORK_COMMAND, wide)

        width = shutil.get_terminal_size().columns
        _heading("zmgpu queue --all")
        print(format_queue(client.queue(all=True, nodes=False)["jobs"], time.time(), width))
        _heading("zmgpu nodes")
        print(format_nodes(client.nodes(), width))
    _heading("Stopping the node and the master (SIGTERM)")


def _gpus_to_simulate(forced: int | None) -> int | None:
    """How many simulated GPUs the node gets; None for the real ones."""
    if forced is not None:
        return forced
    from ..node.gpus import nvml_device_count

    return None if nvml_device_count() > 0 else SIMULATED_BY_DEFAULT


def _start(daemons: list, name: str, workdir: str, module_args: list) -> None:
    """Start ``python -m <module_args>`` with its output in a log file, in its own session."""
    log = os.path.join(workdir, f"{name}.log")
    from ..daemon import module_env   # here: every zmgpu command imports this module, few run the demo

    env = module_env()   # the daemons run the same zmgpu code as this command
    with open(log, "wb") as out:
        # A session of their own: Ctrl-C at the terminal reaches this command
        # (which cancels its job), not the daemons.
        proc = subprocess.Popen([sys.executable, "-m", *module_args], cwd=workdir, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    daemons.append(Daemon(name, log, proc))
    print(f"{name} started (pid {proc.pid}), log: {log}")


def _wait_for(probe, daemons: list, what: str):
    """Poll ``probe`` until it returns something other than None; fail if a daemon dies first."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        value = probe()
        if value is not None:
            return value
        for daemon in daemons:
            if daemon.proc.poll() is not None:
                raise DemoFailed(f"{daemon.name} exited with status {daemon.proc.returncode} "
                                 f"while waiting for {what}")
        if time.monotonic() > deadline:
            raise DemoFailed(f"gave up waiting for {what} after {STARTUP_TIMEOUT:g} s")
        time.sleep(POLL_INTERVAL)


def _read_ports(path: str) -> dict | None:
    """The master's port file, once it is written (atomically)."""
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None


def _registered(client) -> dict | None:
    """The demo node's dict once the master lists it as up."""
    for node in client.nodes():
        if node["node_id"] == NODE_ID and node["state"] == NodeState.UP.value:
            return node
    return None


def _run_job(client, workdir: str, title: str, name: str, command: str, gpus: int) -> None:
    """Submit ``command`` interactively and stream it; fail unless it exits 0."""
    from .attach import view

    _heading(title)
    print(f"$ zmgpu submit --interactive --gpus {gpus} --name {name} {shlex.quote(command)}", flush=True)
    job_id = client.submit(command, gpus=gpus, cwd=workdir, interactive=True, name=name)
    status = view(client, job_id, ClientConfig())
    if status != 0:
        raise DemoFailed(f"job {job_id} ended with exit status {status}")


def _stop(daemons: list) -> list:
    """SIGTERM every daemon, then wait for each; the problems seen."""
    # All are signalled before anything is printed, so even a closed stdout leaves none running.
    for daemon in reversed(daemons):
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGTERM)
    problems, stopped = [], []
    for daemon in reversed(daemons):
        try:
            status = daemon.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            daemon.proc.kill()
            daemon.proc.wait()
            problems.append(f"{daemon.name} did not stop within {STOP_TIMEOUT:g} s of SIGTERM")
            continue
        if status != 0:
            problems.append(f"{daemon.name} exited with status {status}")
        else:
            stopped.append(daemon.name)
    if stopped:
        print(f"stopped: {', '.join(stopped)}")
    return problems
