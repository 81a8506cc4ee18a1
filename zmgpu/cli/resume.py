"""``zmgpu resume``: let a drained node take new jobs again (admins only)."""

from __future__ import annotations

import argparse

from .common import add_connection_timeout, client_config, make_client

HELP = "let a drained node take new jobs again (admins only)"
DESCRIPTION = (
    "Undo zmgpu drain: the master places new jobs on the node again.  Only the users listed in the "
    "master's 'admins' setting may do it; anyone else gets 'permission denied' and exit status 1, as "
    "does an unknown node.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zmgpu resume``."""
    parser.add_argument("node_id", metavar="NODE", help="the node's id, as zmgpu nodes shows it")
    add_connection_timeout(parser)


def run(args: argparse.Namespace) -> int:
    """Resume the node and say so."""
    with make_client(client_config(args)) as client:
        client.resume(args.node_id)
    print(f"resumed node {args.node_id}: it takes new jobs again")
    return 0
