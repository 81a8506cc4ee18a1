"""The agent's claims: its state directory (a lock) and its node id (an instance id the master checks).

Two agents must never share a state directory: both would adopt the same ranks
and report them twice.  An exclusive ``flock`` on ``<state_dir>/lock``, held for
the agent's life and released by the kernel when it dies, keeps a second one out.

Two agents on different hosts (or state directories) must never share a node
id either: the master would send one agent's jobs to the other.  Each agent
process draws a fresh instance id and tells the master, with its REGISTER, the
last instance the master accepted from this state directory.  The master takes
a new instance over a live registration only when it names the live one as its
predecessor, which an agent restarted on the same state directory can do and
an impostor cannot.  The file keeps the last *accepted* instance rather than the
last started one, so that an agent that died before registering does not lock
its successor out.
"""

from __future__ import annotations

import fcntl
import os
import re
import uuid

LOCK_FILE = "lock"
INSTANCE_FILE = "instance"
_INSTANCE = re.compile(r"[0-9a-f]{32}")


def new_instance() -> str:
    """A fresh instance id for this agent process."""
    return uuid.uuid4().hex


def lock_state_dir(state_dir: str) -> int | None:
    """Lock the state directory for this process's life: the lock's fd, or None if another agent holds it."""
    return lock_file(os.path.join(state_dir, LOCK_FILE))


def lock_file(path: str) -> int | None:
    """Lock ``path`` (created if need be) for this process's life: the lock's fd, or None if another holds it.

    Raises OSError when the file cannot be opened.  The fd is not inherited by
    jobs (Python opens it close-on-exec), so a job outliving its agent never holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


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
    path = os.path.join(state_dir, INSTANCE_FILE)
    with open(path + ".tmp", "w") as fh:
        fh.write(instance + "\n")
    os.replace(path + ".tmp", path)
