"""What the sub-commands share: option value types, the client settings and the Client they make.

Settings come from, in order of precedence: command-line flags,
``ZMGPU_MASTER=host:port``, the client YAML file, the defaults of
:class:`zmgpu.config.ClientConfig`.  PyYAML is loaded only when a file is read.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from ..config import ClientConfig, load_config, parse_master_address
from ..model import JobState, is_job_id

#: The client file read when neither --config nor $ZMGPU_CONFIG names one (only if it exists).
DEFAULT_CONFIG = os.path.join("~", ".config", "zmgpu", "client.yaml")


class UsageError(Exception):
    """A command line that cannot be run as given (exit status 2)."""


def _number(kind, low, inclusive: bool, what: str, high=math.inf):
    """An argparse ``type``: a finite ``kind`` above ``low`` (or equal, if ``inclusive``), up to ``high``."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        in_range = value is not None and math.isfinite(value) and low <= value <= high
        if not in_range or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {what}, got '{text}'")
        return value

    parse.__name__ = what
    return parse


seconds = _number(float, 0, False, "a number of seconds > 0")
positive_int = _number(int, 1, True, "an integer >= 1")
non_negative_int = _number(int, 0, True, "an integer >= 0")
port_number = _number(int, 1, True, "a port number (1-65535)", high=65535)


def not_a_job_id(text: str) -> str:
    """The complaint about a malformed job id."""
    return f"'{text}' is not a job id (8 hex characters, or ID_INDEX for an array task)"


def job_id_arg(text: str) -> str:
    """An argparse ``type`` for a job id: refused here when malformed, so it never reaches the master."""
    if not is_job_id(text):
        raise argparse.ArgumentTypeError(not_a_job_id(text))
    return text


def ending(job: dict) -> str:
    """``job X FAILED: reason`` (or the exit code or signal when the master gave no reason)."""
    detail = job.get("reason")
    if not detail and job.get("signal"):
        detail = f"killed by signal {job['signal']}"
    elif not detail and job.get("exit_code") not in (None, 0):
        detail = f"exit code {job['exit_code']}"
    return f"job {job['job_id']} {JobState(job['state']).value}" + (f": {detail}" if detail else "")


def add_connection_timeout(parser: argparse.ArgumentParser) -> None:
    """The --connection-timeout option every command that talks to the master takes."""
    parser.add_argument(
        "--connection-timeout", type=seconds, default=None, metavar="S",
        help="how long to wait for the master to answer any request before failing with a one-line "
             "error (default: 30)")


def add_session_timeout(parser: argparse.ArgumentParser) -> None:
    """--session-timeout, for the commands that attach this terminal to a job."""
    parser.add_argument("--session-timeout", type=seconds, default=None, metavar="S",
                        help="the longest this terminal stays attached; then zmgpu detaches, leaves the job "
                             "running, says how to re-attach on stderr and exits 1 (default: 7200)")


def add_max_consecutive_timeouts(parser: argparse.ArgumentParser) -> None:
    """--max-consecutive-timeouts, for the commands that follow a job's output."""
    parser.add_argument("--max-consecutive-timeouts", type=positive_int, default=None, metavar="N",
                        help="while following the job, a request the master does not answer within a second is "
                             "made again (a restarting master is waited for); after N in a row zmgpu gives up "
                             "with a one-line error and exits 1, leaving the job as it is (default: 30)")


def silence_stdout() -> None:
    """Point stdout at /dev/null: its reader left, and Python's final flush must not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def config_path(args: argparse.Namespace, environ) -> str | None:
    """--config, else $ZMGPU_CONFIG, else the default file if it exists."""
    if args.config:
        return args.config
    if environ.get("ZMGPU_CONFIG"):
        return environ["ZMGPU_CONFIG"]
    default = os.path.expanduser(DEFAULT_CONFIG)
    return default if os.path.isfile(default) else None


def client_config(args: argparse.Namespace, environ=None) -> ClientConfig:
    """The client settings: flags > ZMGPU_MASTER > file > defaults; raises ConfigError."""
    environ = os.environ if environ is None else environ
    overrides = {}
    if environ.get("ZMGPU_MASTER"):
        overrides["host"], overrides["port"] = parse_master_address(environ["ZMGPU_MASTER"])
    # Flags beat ZMGPU_MASTER; the loader checks every value's range, whichever it came from.
    overrides.update((name, value) for name, value in vars(args).items() if value is not None)
    return load_config(ClientConfig, config_path(args, environ), overrides)


def make_client(config: ClientConfig):
    """A :class:`zmgpu.client.Client` for the master ``config`` names."""
    from ..client import Client

    return Client(host=config.host, port=config.port, pub_port=config.pub_port,
                  timeout=config.connection_timeout, secret_key_file=config.secret_key_file,
                  master_public_key_file=config.master_public_key_file)
