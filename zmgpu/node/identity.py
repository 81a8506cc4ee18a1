"""Who this node agent is: its claim on its node id (an instance id the master checks), its address, and
how it addresses the master.

(Its claim on the state directory is the lock of zmgpu.daemon.lock_state_dir:
two agents sharing one would adopt the same ranks and report them twice.)

Two agents on different hosts (or state directories) must never share a node
id either: the master would send one agent's jobs to the other.  Each agent
process draws a fresh instance id and tells the master, with its REGISTER, the
last instance the master accepted from this state directory.  The master takes
a new instance over a live registration only when it names the live one as its
predecessor, which an agent restarted on the same state directory can do and
an impostor cannot.  The file keeps the last *accepted* instance rather than the
last started one, so that an agent that died before registering does not lock
its successor out.

With keys, the agent's ROUTER routing id also carries a secret drawn for each
connection (:func:`routing_id`): the master then lets no connection take over
another's routing id, and no other key's holder can guess this one to wait
under it, so what the master sends to a node reaches only that node.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import uuid

from ..daemon import atomic_write

INSTANCE_FILE = "instance"
_INSTANCE = re.compile(r"[0-9a-f]{32}")


def new_instance() -> str:
    """A fresh instance id for this agent process."""
    return uuid.uuid4().hex


def read_instance(state_dir: str) -> str | None:
    """The instance the master last accepted from this state directory; None if there is none (or garbage)."""
    try:
        with open(os.path.join(state_dir, INSTANCE_FILE)) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return text if _INSTANCE.fullmatch(text) else None


def write_instance(state_dir: str, instance: str) -> None:
    """Record an accepted instance atomically; raises OSError."""
    atomic_write(os.path.join(state_dir, INSTANCE_FILE), instance + "\n")


def routing_id(node_id: str, with_keys: bool) -> bytes:
    """The routing id of one connection to the master: the node id, with keys followed by "/SECRET"."""
    return f"{node_id}/{secrets.token_hex(8)}".encode() if with_keys else node_id.encode()


def route_address(host: str, port: int) -> str:
    """This host's IP address on the route to ``host`` (a UDP connect sends nothing); 127.0.0.1 if unknown."""
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.connect(sockaddr)
            return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
