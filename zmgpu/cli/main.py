"""The ``zmgpu`` command: global options, a table of sub-commands, and errors as one line.

:func:`get_parser` builds the whole parser without side effects or heavy
imports, so argparse-manpage can read it to write ``man/zmgpu.1``.  ZeroMQ is
loaded only when a command talks to the master, PyYAML only when a client
config file is read.
"""

from __future__ import annotations

import argparse
import signal
import sys

from .. import __version__
from ..config import ConfigError
from ..errors import BadAddress, ClientError
from . import attach, cancel, demo, drain, keygen, logs, nodes, queue, resume, show, submit, wait
from .common import DEFAULT_CONFIG, UsageError, port_number, silence_stdout

#: Sub-command name -> module with HELP, DESCRIPTION, add_arguments(parser) and run(args) -> int.
COMMANDS = {"submit": submit, "queue": queue, "show": show, "logs": logs, "attach": attach, "wait": wait,
            "cancel": cancel, "nodes": nodes, "drain": drain, "resume": resume, "keygen": keygen, "demo": demo}

#: Expected failures -> exit status (the first class that matches); each is printed as one line,
#: never a traceback.
EXIT_STATUS = {ConfigError: 2, UsageError: 2, BadAddress: 2, ClientError: 1}

DESCRIPTION = (
    "Submit jobs to a zmgpu master, watch them, follow or re-attach to their output, wait for them and "
    "cancel them; list and drain nodes; write CURVE keys.  "
    "The master is found from --host and --port, else ZMGPU_MASTER=host:port, else the client config "
    "file, else 127.0.0.1:8080.")

EPILOG = (
    f"Environment: ZMGPU_MASTER=host:port names the master (flags win over it, it wins over the config "
    f"file); ZMGPU_CONFIG names the client config file (default {DEFAULT_CONFIG}, read only if it "
    f"exists).  Exit status: 0 on success, 1 when a request fails or the master does not answer, 2 for a "
    f"usage or config error (a malformed master address included), 141 when the reader of stdout went "
    f"away; an interactive job's own exit status for submit --interactive and attach, and the first "
    f"unsuccessful job's for wait.")


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line: what is wrong, and where the usage is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message}; see '{self.prog} --help'\n")


def get_parser() -> argparse.ArgumentParser:
    """The full ``zmgpu`` parser (no side effects: argparse-manpage calls this)."""
    parser = _Parser(prog="zmgpu", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"zmgpu {__version__}")
    parser.add_argument("--host", default=None, metavar="HOST",
                        help="the master's host name or address (default: 127.0.0.1)")
    parser.add_argument("--port", type=port_number, default=None, metavar="PORT",
                        help="the master's request port (default: 8080)")
    parser.add_argument("--pub-port", type=port_number, default=None, metavar="PORT",
                        help="the master's publish port, for following output and events (default: the "
                             "port the master names when asked)")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"client YAML file (default: $ZMGPU_CONFIG, else {DEFAULT_CONFIG} "
                             f"if it exists)")
    commands = parser.add_subparsers(dest="subcommand", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        module.add_arguments(commands.add_parser(name, help=module.HELP, description=module.DESCRIPTION))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``zmgpu``; returns the exit status."""
    args = get_parser().parse_args(argv)
    try:
        return COMMANDS[args.subcommand].run(args)
    except tuple(EXIT_STATUS) as exc:
        print(f"zmgpu: {exc}", file=sys.stderr)
        return next(status for kind, status in EXIT_STATUS.items() if isinstance(exc, kind))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `zmgpu queue | head`: the reader left; say nothing, and end as a writer killed by SIGPIPE would.
        silence_stdout()
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    raise SystemExit(main())
