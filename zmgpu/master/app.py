"""Command line and start-up of ``zmgpu-master``: parse, configure, bind, run the reactor."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .. import __version__
from ..auth import Role, ServerKeys
from ..config import ConfigError, MasterConfig
from ..daemon import (SignalPipe, StateDirBusy, describe_state_dir_error, load_or_exit, lock_state_dir,
                      setup_logging, write_port_file)
from ..model import is_loopback, parse_time_limit

PROG = "zmgpu-master"


def get_parser() -> argparse.ArgumentParser:
    """The master's argument parser (also read by argparse-manpage)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The zmgpu master: queues jobs, tracks node agents and their GPUs (and what else runs "
                    "on them), places jobs by priority then submission order with backfill (across several "
                    "nodes when one is not enough, sharing GPUs between --gpu-mem jobs), and fans out job "
                    "output and events to clients. Settings come from --config, then these flags.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help="YAML settings file (keys as in conf/master.yaml); flags given here win")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for a cluster)")
    parser.add_argument("--port", type=int,
                        help="ROUTER port for node agents and clients (default 8080; 0 picks a free port)")
    parser.add_argument("--pub-port", type=int,
                        help="PUB port for job output and events (default: port + 1; 0 picks a free port)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where the job database (SQLite) and job output live; one master per directory "
                             "(default ~/.local/state/zmgpu/master)")
    parser.add_argument("--heartbeat-interval", type=float, metavar="S",
                        help="seconds between heartbeats to node agents (default 1)")
    parser.add_argument("--node-timeout", type=float, metavar="S",
                        help="a node not heard from for this many seconds is suspect: nothing new is placed "
                             "there, its jobs go on (default 5)")
    parser.add_argument("--node-dead-timeout", type=float, metavar="S",
                        help="a node not heard from for this many seconds is down: its jobs end NODE_FAIL, or "
                             "go back to the queue if they asked for --requeue (default 60)")
    parser.add_argument("--kill-grace", type=float, metavar="S",
                        help="seconds between SIGTERM and SIGKILL when a job is cancelled (default 10)")
    parser.add_argument("--secret-key-file", metavar="FILE",
                        help="the master's CURVE secret key (zmgpu keygen master): only the nodes and users "
                             "whose public keys are listed in the authorized files may connect "
                             "(default: none, no keys)")
    parser.add_argument("--authorized-nodes", metavar="FILE",
                        help="'NODE_ID PUBLIC_KEY' lines, one per node key; re-read on SIGHUP "
                             "(default: authorized_nodes beside the secret key file)")
    parser.add_argument("--authorized-users", metavar="FILE",
                        help="'USER PUBLIC_KEY' lines, one per user key; re-read on SIGHUP "
                             "(default: authorized_users beside the secret key file)")
    parser.add_argument("--insecure", action="store_true", default=None,
                        help="listen beyond loopback without keys, so that anyone who reaches the ports can "
                             "run jobs as any user: only on a trusted network (default: refuse to start)")
    parser.add_argument("--allow-root-jobs", action="store_true", default=None,
                        help="let jobs run as root (submitted by root, or on a node that runs every job as "
                             "its own root user); for a single-user machine or a container (default: refused)")
    parser.add_argument("--port-file", metavar="FILE",
                        help="once listening, write the ports as JSON {port, pub_port, pid} to FILE "
                             "(for supervisors and tests that use port 0)")
    parser.add_argument("--verbose", action="store_true", default=None, help="log every message (debug)")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def _time_limits(config: MasterConfig, path: str | None) -> tuple[int | None, int | None] | None:
    """The default and maximum time limits in seconds; None (after saying why) if one is malformed."""
    limits = []
    for key in ("default_time_limit", "max_time_limit"):
        text = getattr(config, key)
        try:
            limits.append(None if text is None else parse_time_limit(text))
        except ValueError as exc:
            print(f"{PROG}: {path or 'config'}: key '{key}': {exc}", file=sys.stderr)
            return None
    return limits[0], limits[1]


def _security(config: MasterConfig, path: str | None) -> tuple:
    """``(keys or None, exposed)`` for the master's settings; SystemExit(2) after one line saying why not."""
    where = path or "config"
    problem = None
    if config.max_message_bytes < config.max_command_bytes + config.max_env_bytes + (1 << 20):
        problem = (f"{where}: key 'max_message_bytes' ({config.max_message_bytes}) must exceed max_command_bytes + "
                   f"max_env_bytes by 1 MiB at least, or a submit within those limits would be cut off unanswered")
    elif config.secret_key_file is None and not is_loopback(config.host) and not config.insecure:
        problem = (f"refusing to listen on {config.host} without keys: anyone who reaches port {config.port} "
                   f"could run any command on every node. Set secret_key_file (see README, 'Secure setup'), "
                   f"or pass --insecure on a trusted network")
    if problem is None and config.secret_key_file is not None:
        try:
            return ServerKeys.load(config.secret_key_file, config.authorized_nodes, config.authorized_users), False
        except ConfigError as exc:
            problem = str(exc)
    if problem is not None:
        print(f"{PROG}: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return None, not is_loopback(config.host)


def main(argv: list[str] | None = None) -> int:
    """Run the master until SIGTERM or SIGINT; returns the exit status."""
    args = get_parser().parse_args(argv)
    config = load_or_exit(MasterConfig, args, PROG)
    limits = _time_limits(config, args.config)
    if limits is None:
        return 2
    keys, exposed = _security(config, args.config)
    log = setup_logging("zmgpu.master", config.verbose)
    try:
        os.makedirs(config.state_dir, exist_ok=True)
        lock = lock_state_dir(config.state_dir)
    except (OSError, StateDirBusy) as exc:
        print(f"{PROG}: {describe_state_dir_error(config.state_dir, exc)}", file=sys.stderr)
        return 1

    # Imported here so `--help` (and the man page build) does not need zmq.
    from .reactor import BindError
    from .server import Master
    from .store import StoreError

    try:
        master = Master(config, limits, log, keys, exposed)
    except (BindError, StoreError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    signals = SignalPipe([signal.SIGTERM, signal.SIGINT, signal.SIGHUP])

    def on_signal() -> None:
        received = signals.drain()
        if signal.SIGHUP in received:
            master.reload_keys()
        if received & {signal.SIGTERM, signal.SIGINT}:
            log.info("stopping on signal")
            master.reactor.stop()

    master.reactor.add_fd(signals.fileno(), on_signal)
    port, pub_port = master.reactor.port, master.reactor.pub_port
    log.info("listening on tcp://%s:%d (clients and nodes), tcp://%s:%d (output and events); state in %s",
             config.host, port, config.host, pub_port, config.state_dir)
    if keys is not None:
        log.info("CURVE keys: only the %d node key(s) in %s and the %d user key(s) in %s may connect",
                 keys.ring.count(Role.NODE), keys.nodes_path, keys.ring.count(Role.USER), keys.users_path)
    elif exposed:
        log.warning("INSECURE (--insecure): listening beyond loopback without keys: anyone who reaches port %d "
                    "can run any command on every node, as any user", port)
    if args.port_file:
        write_port_file(args.port_file, port=port, pub_port=pub_port)
    try:
        master.run()
    finally:
        signals.close()
        lock.close()
    log.info("stopped")
    return 0
