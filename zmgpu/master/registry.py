"""Node registry on the master: registration, heartbeats both ways, and declaring nodes dead.

Liveness is not capacity: a heartbeat records when the node was last heard
and carries what changed on its GPUs (memory, utilization, temperature,
processes, foreign use, health, leftovers of ended jobs), which the allocator
reads; free GPUs are the allocator's business.  Any message from a node counts
as a sign of life.  Two thresholds: a node silent for ``node_timeout`` is
suspect (nothing new is placed there, its jobs go on); one silent for
``node_dead_timeout`` is down, and each of its live job ranks ends through the
job service's common path as a lost rank (NODE_FAIL, or requeued).
"""

from __future__ import annotations

import logging
import time

from ..model import GpuInfo, JobState, NodeState, has_type
from ..protocol import Message, MsgType, node_topic, valid_gpu_fields
from .jobs import JobService
from .output import STREAMS
from .reactor import Reactor
from .state import ClusterState, NodeRecord


#: The fields that decide whether a GPU can take a job.
_PLACEMENT_FIELDS = ("busy", "healthy", "dirty", "foreign_mb")
_UNSET = object()


class NodeRegistry:
    """Handlers and timers for node agents."""

    def __init__(self, state: ClusterState, reactor: Reactor, jobs: JobService, heartbeat_interval: float,
                 node_timeout: float, dead_timeout: float, log: logging.Logger):
        self.state = state
        self.reactor = reactor
        self.jobs = jobs
        self.heartbeat_interval = heartbeat_interval
        self.node_timeout = node_timeout
        self.dead_timeout = max(dead_timeout, node_timeout)
        self.log = log
        # Routing id -> node, so the per-message liveness check costs one dict lookup.
        self.by_identity: dict[bytes, NodeRecord] = {}

    def handlers(self) -> dict:
        return {MsgType.REGISTER: self.on_register, MsgType.HEARTBEAT: self.on_heartbeat}

    def seen(self, identity: bytes) -> bool:
        """Refresh a live node's deadline; True when ``identity`` is a known node."""
        node = self.by_identity.get(identity)
        if node is None:
            return False
        if node.up and node.registered:
            node.heard, node.last_seen = time.monotonic(), time.time()
            self._set_reachable(node, True)
            if node.suspect:
                self.log.info("node %s is answering again", node.node_id)
                node.suspect = False
                self.publish(node)
        return True

    def _set_reachable(self, node: NodeRecord, reachable: bool) -> None:
        """Whether a send to the node can go out (not published: no node dict shows it); a change makes a
        pass due, since jobs may start there, or no longer."""
        if node.reachable != reachable:
            node.reachable = reachable
            self.jobs.dirty = True

    def restore(self, node: NodeRecord) -> None:
        """A node known before a master restart: suspect until it registers, dead if it never does."""
        node.state, node.suspect, node.heard, node.registered = NodeState.UP, True, time.monotonic(), False
        self.state.nodes[node.node_id] = node
        self.state.nodes_version += 1
        self.by_identity[node.route] = node

    def on_register(self, identity: bytes, msg: Message) -> None:
        """A node agent (re)joins: record its GPUs, reconcile its jobs, welcome it."""
        body = msg.body
        node_id = body["node_id"]
        # With keys the routing id is "NODE_ID/SECRET" (see zmgpu.node.identity.routing_id).
        if identity.partition(b"/")[0] != node_id.encode():
            self.log.warning("refused registration: routing id %r does not match node id %r", identity, node_id)
            return
        try:
            gpus = [GpuInfo.from_dict(g) for g in body["gpus"]]
        except ValueError as exc:
            self.log.warning("refused registration of node %s: %s", node_id, exc)
            return
        node = self.state.nodes.get(node_id)
        instance = body.get("instance")
        if node is not None and self._impostor(node, instance, body.get("previous_instance")):
            reason = (f"node id {node_id} is in use by a live agent on {node.hostname} ({node.address}); give this "
                      f"agent another --node-id (if that agent is gone, start again after {self.node_timeout:g} s)")
            self.log.warning("refused registration of %s from %s (%s): %s",
                             node_id, body["hostname"], body["address"], reason)
            self.reactor.send(identity, MsgType.REFUSED, {"reason": reason})
            return
        if node is None:
            node = self.state.nodes[node_id] = NodeRecord(node_id, body["hostname"], body["address"], gpus)
        else:
            node.hostname, node.address, node.gpus = body["hostname"], body["address"], gpus
            self.by_identity.pop(node.route, None)
        node.route = identity
        self.by_identity[identity] = node
        node.telemetry = {}
        node.master_host = body["master_host"] if isinstance(body.get("master_host"), str) else ""
        policy = body.get("gpu_policy")
        reserve = policy.get("gpu_mem_reserve_mb") if isinstance(policy, dict) else None
        node.reserve_mb = reserve if has_type(reserve, int) and reserve >= 0 else 0
        self.state.nodes_version += 1
        self._apply_telemetry(node, body.get("telemetry"))
        node.state, node.instance, node.suspect, node.registered = NodeState.UP, instance, False, True
        node.heard, node.last_seen, node.reachable = time.monotonic(), time.time(), True
        self._log_connected(node)
        self._reconcile(node, body["jobs"])
        # How long the node's keeper lets jobs run with no agent: a little less than the time after which
        # this master declares the node dead and may run them elsewhere, so no job ever runs twice.
        lease = self.dead_timeout - min(self.node_timeout, self.dead_timeout / 2)
        self.reactor.send(identity, MsgType.REGISTERED, {"heartbeat_interval": self.heartbeat_interval,
                                                         "dead_timeout": lease})
        self.publish(node)

    def _impostor(self, node: NodeRecord, instance, previous) -> bool:
        """A second live agent under the same node id (not the same agent, nor its restarted successor)."""
        return (node.up and node.registered and node.instance is not None and instance != node.instance
                and previous != node.instance)

    def _log_connected(self, node: NodeRecord) -> None:
        self.log.info("node %s connected from %s (host %s) with %d GPU(s)",
                      node.node_id, node.address, node.hostname, len(node.gpus))
        for gpu in node.gpus:
            mark = " (simulated)" if gpu.simulated else ""
            self.log.info("  %s GPU %d: %s, %d MiB, %s%s", node.node_id, gpu.index, gpu.name,
                          gpu.memory_mb, gpu.uuid, mark)

    def _reconcile(self, node: NodeRecord, reported: list) -> None:
        """Match the ranks a returning node reports with what the master thinks runs there.

        Current ranks go on (or are settled, if the node says they ended while
        the master did not hear); ranks the master no longer wants are killed;
        ranks the node does not report are lost.
        """
        still_running, stopping = set(), {}
        for entry in reported:
            if not (isinstance(entry, dict) and isinstance(entry.get("job_id"), str)
                    and isinstance(entry.get("rank"), int) and isinstance(entry.get("attempt", 0), int)):
                continue
            job = self.state.jobs.get(entry["job_id"])
            key = (entry["job_id"], entry["rank"])
            current = job is not None and key in node.ranks and entry.get("attempt", 0) == job.attempt
            if entry.get("ended"):
                if current:
                    self.jobs.settle_rank(node.route, job, entry["rank"], entry)
            elif current:
                still_running.add(key)
                # The node resends each stream from what the master holds (chunks sent into a dead link).
                for stream in STREAMS:
                    self.jobs.ask_resend(node.route, job.job_id, entry["rank"], stream)
                stopping[job.job_id] = job      # a stop it may not have heard goes again, once per job
            else:
                self.log.info("node %s still runs job %s, which the master ended; stopping it",
                              node.node_id, entry["job_id"])
                self.reactor.send(node.route, MsgType.KILL,
                                  {"job_id": entry["job_id"], "attempt": entry.get("attempt", 0),
                                   "reason": "the master no longer runs this job here"})
        for job in stopping.values():
            self.jobs.repeat_kill(job)
        for job_id, rank in sorted(node.ranks - still_running):
            job = self.state.jobs[job_id]
            if job.state is not JobState.RUNNING or job.ranks[rank].ended or job.ranks[rank].held_back:
                continue   # settled by an earlier entry of this loop, or waiting for its first node's port
            if job.ranks[rank].pid is None:
                # Never confirmed started (its DISPATCH died with a master or a connection): run it again.
                self.jobs.undo_start(job, f"node {node.node_id} never started it")
            else:
                self.jobs.end_rank(job, rank, lost=True,
                                   reason=f"node {node.node_id} came back without the job's process")

    def on_heartbeat(self, identity: bytes, msg: Message) -> None:
        """A node is alive, with what changed on its GPUs; one the master does not know must register again."""
        node = self.by_identity.get(identity)
        if node is None or not node.up or not node.registered:
            self.reactor.send(identity, MsgType.REREGISTER, {})
            return
        if msg.body.get("gpus") and self._apply_telemetry(node, msg.body["gpus"]):
            self.reactor.publish(node_topic(node.node_id), MsgType.NODE_STATE, node.to_dict)

    def _apply_telemetry(self, node: NodeRecord, report) -> bool:
        """Merge a node's GPU report (index -> changed fields); True when anything changed.

        Fields of the wrong type are dropped: the allocator does arithmetic on them.
        """
        if not isinstance(report, dict):
            return False
        known = {g.index for g in node.gpus}
        changed = False
        for key, fields in report.items():
            index = int(key) if isinstance(key, str) and key.isdigit() else None
            if index not in known or not isinstance(fields, dict):
                continue
            state = node.telemetry.setdefault(index, {})
            news = {k: v for k, v in valid_gpu_fields(fields).items() if state.get(k, _UNSET) != v}
            if not news:
                continue
            changed = True
            before = {k: state.get(k) for k in _PLACEMENT_FIELDS}
            state.update(news)
            if (before["healthy"] is False) != (state.get("healthy") is False):
                self._log_health(node, index, state)
            if any(state.get(k) != before[k] for k in _PLACEMENT_FIELDS):
                self.jobs.dirty = True   # a GPU came free (or was taken) outside the scheduler
        return changed

    def _log_health(self, node: NodeRecord, index: int, state: dict) -> None:
        if state.get("healthy", True):
            self.log.info("node %s GPU %d is healthy again; it takes jobs again", node.node_id, index)
        else:
            self.log.warning("node %s GPU %d drained: %s", node.node_id, index, state.get("health") or "unhealthy")

    def send_heartbeats(self) -> None:
        """Tell every live node the master is alive (they reconnect when it goes quiet)."""
        for node in self.state.nodes.values():
            if node.up:
                # A failed send means its connection is gone: place nothing there until it speaks again.
                self._set_reachable(node, self.reactor.send(node.route, MsgType.HEARTBEAT, {}))

    def check_expiry(self) -> None:
        """Mark silent nodes suspect, then dead; a dead node's job ranks are lost."""
        now = time.monotonic()
        for node in self.state.nodes.values():
            silent = now - node.heard
            if node.up and silent > self.dead_timeout:
                self._node_down(node)
            elif node.up and not node.suspect and silent > self.node_timeout:
                node.suspect = True
                self.log.warning("node %s suspect: no heartbeat for %g s; nothing new goes there, its jobs go on",
                                 node.node_id, self.node_timeout)
                self.publish(node)

    def _node_down(self, node: NodeRecord) -> None:
        node.state = NodeState.DOWN
        reason = f"node {node.node_id} stopped responding (no heartbeat for {self.dead_timeout:g} s)"
        self.log.warning("node %s down: no heartbeat for %g s; %d job rank(s) lost",
                         node.node_id, self.dead_timeout, len(node.ranks))
        for job_id, rank in sorted(node.ranks):
            self.jobs.end_rank(self.state.jobs[job_id], rank, reason=reason, lost=True)
        self.publish(node)

    def set_drain(self, node: NodeRecord, reason: str | None, user: str) -> None:
        """An admin drains a node (no new jobs there; running ones finish) or, with None, resumes it."""
        node.drain_reason = reason
        self.log.info("node %s %s by %s%s", node.node_id, "drained" if reason else "resumed", user,
                      f": {reason}" if reason else "")
        self.publish(node)

    def publish(self, node: NodeRecord) -> None:
        """The node's state changed: tell subscribers, have the store write the node at the end of the turn,
        and make a pass due (what it may take, or what waited on it, changed)."""
        self.jobs.dirty = True
        self.jobs.store.node_changed(node)
        self.reactor.publish(node_topic(node.node_id), MsgType.NODE_STATE, node.to_dict)
