"""``zmgpu drain``: stop placing new jobs on a node (admins only)."""

from __future__ import annotations

import argparse

from .common import UsageError, add_connection_timeout, client_config, make_client

HELP = "stop new jobs on a node; running ones finish (admins only)"
DESCRIPTION = (
    "Drain a node: the master places no new jobs on it, and the jobs running there finish as usual.  "
    "zmgpu nodes shows it as drained, with the reason, until zmgpu resume.  Only the users listed "
    "in the master's 'admins' setting may drain a node; anyone else gets 'permission denied' and exit "
    "status 1, as does an unknown node.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``zmgpu drain``."""
    parser.add_argument("node_id", metavar="NODE", help="the node's id, as zmgpu nodes shows it")
    parser.add_argument("--reason", required=True, metavar="TEXT",
                        help="why, shown by zmgpu nodes (required, as for scontrol update state=drain)")
    add_connection_timeout(parser)


def run(args: argparse.Namespace) -> int:
    """Drain the node and say so."""
    if not args.reason.strip():
        raise UsageError("--reason must not be empty")
    with make_client(client_config(args)) as client:
        client.drain(args.node_id, args.reason)
    print(f"drained node {args.node_id}: no new jobs start there (zmgpu resume {args.node_id} undoes it)")
    return 0
