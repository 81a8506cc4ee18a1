"""Command line and start-up of ``zmgpu-master``: parse, configure, bind, run the reactor."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from .. import __version__
from ..config import MasterConfig
from ..daemon import SignalPipe, load_or_exit, setup_logging, write_port_file
from ..model import parse_time_limit

PROG = "zmgpu-master"


def get_parser() -> argparse.ArgumentParser:
    """The master's argument parser (also read by argparse-manpage)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="The zmgpu master: queues jobs, tracks node agents and their GPUs, places jobs "
                    "first-come first-served (across several nodes when one is not enough), and fans out "
                    "job output and events to clients. Settings come from --config, then these flags.",
    )
    parser.add_argument("--config", metavar="FILE",
                        help="YAML settings file (keys as in conf/master.yaml); flags given here win")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1; 0.0.0.0 for a cluster)")
    parser.add_argument("--port", type=int,
                        help="ROUTER port for node agents and clients (default 8080; 0 picks a free port)")
    parser.add_argument("--pub-port", type=int,
                        help="PUB port for job output and events (default: port + 1; 0 picks a free port)")
    parser.add_argument("--state-dir", metavar="DIR",
                        help="where job output is spooled (default ~/.local/state/zmgpu/master)")
    parser.add_argument("--heartbeat-interval", type=float, metavar="S",
                        help="seconds between heartbeats to node agents (default 1)")
    parser.add_argument("--node-timeout", type=float, metavar="S",
                        help="a node not heard from for this many seconds is down and its jobs end "
                             "NODE_FAIL (default 5)")
    parser.add_argument("--kill-grace", type=float, metavar="S",
                        help="seconds between SIGTERM and SIGKILL when a job is cancelled (default 10)")
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


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    config = load_or_exit(MasterConfig, args, PROG)
    log = setup_logging("zmgpu.master", config.verbose)
    try:
        os.makedirs(config.state_dir, exist_ok=True)
    except OSError as exc:
        print(f"{PROG}: cannot create state directory {config.state_dir}: {exc.strerror}", file=sys.stderr)
        return 1

    # Imported here so `--help` (and the man page build) does not need zmq.
    from .jobs import JobService
    from .output import OutputSpool
    from .reactor import BindError, Reactor
    from .registry import NodeRegistry
    from .requests import ClientRequests
    from .state import ClusterState

    limits = _time_limits(config, args.config)
    if limits is None:
        return 2

    try:
        reactor = Reactor(config.host, config.port, config.pub_port, log)
    except BindError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    state = ClusterState()
    jobs = JobService(state, reactor, OutputSpool(config.state_dir), config.kill_grace, config.max_requeue,
                      config.user_gpu_limit, config.finished_retention, log)
    requests = ClientRequests(state, jobs, config.admins, *limits)
    registry = NodeRegistry(state, reactor, jobs, config.heartbeat_interval, config.node_timeout, log)
    reactor.handlers = {**requests.handlers(), **jobs.handlers(), **registry.handlers()}
    reactor.peer_seen = registry.seen
    reactor.after_turn = jobs.schedule
    reactor.add_timer(config.heartbeat_interval, registry.send_heartbeats)
    # Checking twice per interval keeps a dead node's detection within half an interval of its deadline.
    reactor.add_timer(config.heartbeat_interval / 2, registry.check_expiry)
    reactor.add_timer(0.5, jobs.check_time_limits)
    # Often enough that a short retention (tests, tiny labs) is honoured within half of it.
    reactor.add_timer(min(60.0, max(config.finished_retention / 2, 0.5)), jobs.purge_finished)
    signals = SignalPipe([signal.SIGTERM, signal.SIGINT])

    def on_signal() -> None:
        if signals.drain():
            log.info("stopping on signal")
            reactor.stop()

    reactor.add_fd(signals.fileno(), on_signal)

    log.info("listening on tcp://%s:%d (clients and nodes), tcp://%s:%d (output and events); state in %s",
             config.host, reactor.port, config.host, reactor.pub_port, config.state_dir)
    if config.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening beyond loopback: anyone who reaches port %d can submit jobs", reactor.port)
    if args.port_file:
        write_port_file(args.port_file, port=reactor.port, pub_port=reactor.pub_port)
    try:
        reactor.run()
    finally:
        reactor.close()
        signals.close()
    log.info("stopped")
    return 0
