"""Command line of ``zmgpu-node``: parse options, merge the config file, find GPUs, run the agent."""

from __future__ import annotations

import argparse
import os
import re
import socket
import sys

from ..keys import CurveClient
from ..config import ConfigError, NodeConfig
from ..model import NODE_ID_PATTERN
from ..daemon import StateDirBusy, describe_state_dir_error, load_or_exit, lock_state_dir, setup_logging

PROG = "zmgpu-node"

_NODE_ID = re.compile(NODE_ID_PATTERN)


def get_parser() -> argparse.ArgumentParser:
    """The option parser (no side effects: the man page is generated from it)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Node agent of zmgpu: registers this host's GPUs with the zmgpu master, runs the job "
                    "ranks the master dispatches here, and forwards their output and exit status. Jobs run "
                    "in their own sessions, so stopping or restarting the agent does not stop them.",
        epilog="Without NVML (no NVIDIA driver, or the nvidia-ml-py package missing) the node offers no GPUs "
               "and still runs CPU jobs (zmgpu submit --gpus 0); --simulate-gpus N rehearses a GPU node "
               "on any machine. Exit status: 0 when stopped by SIGTERM or SIGINT; 1 when the state directory "
               "cannot be used or another agent runs on it; 2 for a bad option or configuration, or when the "
               "master refuses the node id because another live agent holds it.")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="YAML file with node settings (keys as in conf/node.yaml); options given on "
                             "the command line override it (default: none, built-in defaults)")
    parser.add_argument("--node-id", metavar="ID", default=None,
                        help="name of this node in the cluster, as used in --node-gpu-ids "
                             "(default: the host name)")
    parser.add_argument("--master-host", metavar="HOST", default=None,
                        help="host name or address of the zmgpu master (default: 127.0.0.1)")
    parser.add_argument("--master-port", metavar="PORT", type=int, default=None,
                        help="the master's port (default: 8080)")
    parser.add_argument("--state-dir", metavar="DIR", default=None,
                        help="directory for job output spool files "
                             "(default: $XDG_STATE_HOME/zmgpu/node or ~/.local/state/zmgpu/node)")
    parser.add_argument("--simulate-gpus", metavar="N|FILE", default=None,
                        help="offer N simulated GPUs instead of reading real ones through NVML, for "
                             "machines without NVIDIA hardware; or the GPUs a YAML file describes (a list "
                             "'gpus' of {name, memory_mb, used_mb, foreign_pids, healthy}), read again at "
                             "every heartbeat so memory use, foreign processes and health can be changed "
                             "while the node runs; simulated GPUs are marked as such everywhere "
                             "(default: real GPUs)")
    parser.add_argument("--heartbeat-interval", metavar="S", type=float, default=None,
                        help="seconds between heartbeats to the master until it names its own interval "
                             "at registration, which then wins (default: 1)")
    parser.add_argument("--master-timeout", metavar="S", type=float, default=None,
                        help="seconds without any word from the master before reconnecting, with a "
                             "backoff of 1 s doubling to 32 s between tries (default: 5)")
    parser.add_argument("--secret-key-file", metavar="FILE", default=None,
                        help="this node's CURVE secret key (zmgpu keygen NODE_ID), for a master with keys; its "
                             "public key must be listed under this node id in the master's authorized_nodes "
                             "(default: none, for a master without keys)")
    parser.add_argument("--master-public-key-file", metavar="FILE", default=None,
                        help="the master's public key (its master.key), needed with --secret-key-file "
                             "(default: none)")
    parser.add_argument("--single-user", action="store_true", default=None,
                        help="run every job as this agent's own user, whoever submitted it, as on a personal "
                             "machine (default: an agent running as root runs each job as its submitter; "
                             "one running as an ordinary user refuses other users' jobs)")
    parser.add_argument("--verbose", action="store_true", default=None,
                        help="log debug details too (default: off)")
    return parser


def _problem(config: NodeConfig) -> str | None:
    """The first setting that cannot work, as a sentence; None when all is well."""
    if not _NODE_ID.fullmatch(config.node_id):
        return (f"node id '{config.node_id}' is not usable: use letters, digits, '.', '_' and '-' "
                f"(set --node-id)")
    # Ranges (port, counts, intervals) are checked by load_config from the NodeConfig fields.
    if config.master_timeout <= config.heartbeat_interval:
        return (f"master timeout ({config.master_timeout} s) must be longer than the heartbeat "
                f"interval ({config.heartbeat_interval} s)")
    return None


def _unsafe(config: NodeConfig) -> str | None:
    """Why a root agent must not start: it would run jobs as whatever user a client claims to be."""
    if os.geteuid() != 0 or config.single_user or config.secret_key_file:
        return None
    return ("a node agent running as root starts each job as the user who submitted it, and without keys the "
            "master takes any name a client gives: set up keys (secret_key_file and master_public_key_file; "
            "see the README's 'Secure setup'), or run the agent as an ordinary user, or with --single-user "
            "to run every job as the agent's own user")


def main(argv: list[str] | None = None) -> int:
    """Run the node agent until SIGTERM or SIGINT; the exit status."""
    args = get_parser().parse_args(argv)
    config = load_or_exit(NodeConfig, args, PROG)
    if config.node_id is None:
        config.node_id = socket.gethostname()
    problem = _problem(config) or _unsafe(config)
    try:
        curve = None if problem else CurveClient.load(config.secret_key_file, config.master_public_key_file)
    except ConfigError as exc:
        problem = str(exc)
    if problem:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return 2
    log = setup_logging("zmgpu.node", config.verbose)
    try:
        os.makedirs(os.path.join(config.state_dir, "jobs"), exist_ok=True)
        lock = lock_state_dir(config.state_dir)   # held for the agent's life
    except (OSError, StateDirBusy) as exc:
        log.error("%s", describe_state_dir_error(config.state_dir, exc))
        return 1

    # Imported here so that the parser above stays cheap for the man page generator.
    from .agent import Agent
    from .gpus import SimulationError, open_source
    from .telemetry import Policy, Telemetry

    simulate = None if config.simulate_gpus is None else str(config.simulate_gpus)
    try:
        source = open_source(simulate, config.node_id, log)
    except SimulationError as exc:
        log.error("%s", exc)
        lock.close()
        return 2
    policy = Policy(config.foreign_policy, config.foreign_threshold_mb, config.gpu_mem_reserve_mb)
    telemetry = Telemetry(source, policy, log)
    gpus = telemetry.devices
    for gpu in gpus:
        log.info("GPU %d: %s, %d MiB, %s%s", gpu.index, gpu.name, gpu.memory_mb, gpu.uuid,
                 " (simulated)" if gpu.simulated else "")
    if not gpus:
        log.info("no GPUs offered: only CPU jobs (--gpus 0) will run on this node")
    try:
        agent = Agent(config, config.node_id, telemetry, log, curve)
        log.info("%s; %s", agent.users.describe(),
                 "CURVE keys: talking to the master encrypted" if curve else "no keys: the master must have none")
        return agent.run()
    finally:
        source.close()
        lock.close()
