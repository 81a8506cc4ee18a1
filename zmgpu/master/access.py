"""Who may do what on the master: identity from keys, and the owner-or-admin rule.

With keys, identity comes from the key a message was sent with, never from
what the message says: a user key acts only as its user (a request naming
another user is refused), a node key speaks only for its own node id, and
neither may send the other's messages.  Subscriptions to a job's output and
state go to its owner and to admins only.  Without keys the master trusts the
name a client gives (the single-user default on loopback, or ``--insecure``).

The owner-or-admin rule itself (:meth:`Access.may_act`) is the same either way:
cancel, attach and logs are for the job's owner or an admin.
"""

from __future__ import annotations

from typing import Callable

from ..auth import Principal, Role, ServerKeys
from ..protocol import FROM_NODES, Message, MsgType
from .state import ClusterState

#: Subscription prefixes any user may take: node state changes are public, as `zmgpu nodes` is.
PUBLIC_TOPICS = (b"node.",)
#: Topic roots whose second part is a job id: for its owner (and admins).
JOB_TOPIC_KINDS = (b"job", b"ended")


class Access:
    """The master's admission checks and its owner-or-admin rule."""

    def __init__(self, state: ClusterState, admins: list[str], keys: ServerKeys | None,
                 node_of: Callable[[bytes], "str | None"]):
        self.state = state
        self.admins = frozenset(admins)
        self.keys = keys
        self.node_of = node_of     # routing id -> the node id registered under it, if any

    def is_admin(self, user: str) -> bool:
        return user in self.admins

    def owner(self, job_id: str) -> str | None:
        """Who submitted a job, or the tasks of an array; None for an unknown id."""
        tasks = self.state.expand(job_id)
        job = self.state.jobs.get(tasks[0]) if tasks else None
        return job.user if job is not None else None

    def may_act(self, user: str, owner: str) -> bool:
        """The owner-or-admin rule: cancel, attach and logs."""
        return owner == user or self.is_admin(user)

    # -- with keys ---------------------------------------------------------------------------------

    def admit(self, identity: bytes, key: bytes, msg: Message) -> str | None:
        """None when the key may send ``msg``; otherwise why not (the sender gets PERMISSION_DENIED)."""
        holder = self.keys.ring.holder(key)
        if holder is None:
            return "this key is no longer listed on the master"
        if msg.type in FROM_NODES:
            return self._as_node(holder, identity, msg)
        if holder.role is not Role.USER:
            return f"the key of {holder} cannot make {msg.type.name} requests (a user's)"
        if msg.body["user"] != holder.name:
            return (f"this key belongs to user {holder.name}, but the request says it comes from "
                    f"'{msg.body['user']}' (run zmgpu as {holder.name}, or ask the admin to list your key)")
        return None

    def _as_node(self, holder: Principal, identity: bytes, msg: Message) -> str | None:
        if holder.role is not Role.NODE:
            return f"the key of {holder} cannot send {msg.type.name} (a node agent's message)"
        claimed = msg.body["node_id"] if msg.type is MsgType.REGISTER else self.node_of(identity)
        if claimed is not None and claimed != holder.name:
            return f"the key of {holder} cannot speak for node {claimed}"
        return None

    def may_subscribe(self, key: bytes, topic: bytes) -> bool:
        """A job's topics are for its owner and admins; node topics for any user; the rest for admins."""
        holder = self.keys.ring.holder(key)
        if holder is None or holder.role is not Role.USER:
            return False
        if self.is_admin(holder.name):
            return True
        if topic.startswith(PUBLIC_TOPICS):
            return True
        kind, _, rest = topic.partition(b".")
        job_id, dot, _ = rest.partition(b".")
        if not dot and kind == b"ended" and job_id.endswith(b"_"):
            job_id, dot = job_id[:-1], b"_"    # "ended.<ARRAYID>_": the ends of the array's tasks
        # "job.<ID>." or "ended.<ID>." or a topic under them; a shorter prefix such as b"job." would cover
        # every job.
        return kind in JOB_TOPIC_KINDS and bool(dot) and self.owner(job_id.decode(errors="replace")) == holder.name
