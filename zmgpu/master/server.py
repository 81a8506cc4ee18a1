"""The assembled master: store, reactor, job service, client requests and node registry, wired once.

With keys (:class:`zmgpu.auth.ServerKeys`) the reactor checks every message and
subscription against them through :class:`Access`; SIGHUP re-reads the lists.

Start-up restores what the store holds: pending jobs queue again, running jobs
keep their GPUs, and the nodes they ran on are suspect until their agents
register again (and report the jobs they still hold) or are declared dead.
Each reactor turn ends with one store transaction before any reply goes out.
"""

from __future__ import annotations

import logging

from ..auth import Role, ServerKeys
from ..config import ConfigError, MasterConfig
from ..model import JobState
from .access import Access
from .jobs import JobService
from .output import OutputSpool
from .reactor import Reactor
from .registry import NodeRegistry
from .requests import ClientRequests, SubmitLimits
from .state import ClusterState
from .store import Store, StoreError


class Master:
    """Every part of the master, ready to run."""

    def __init__(self, config: MasterConfig, time_limits: tuple[int | None, int | None], log: logging.Logger,
                 keys: ServerKeys | None = None, exposed: bool = False):
        self.log = log
        self.keys = keys
        self.store = Store(config.state_dir)                      # StoreError: caller reports it
        self.reactor = Reactor(config.host, config.port, config.pub_port, log,    # BindError likewise
                               config.max_message_bytes, keys)
        self.state = ClusterState()
        self.jobs = JobService(self.state, self.reactor, OutputSpool(config.state_dir), self.store,
                               config.kill_grace, config.max_requeue, config.user_gpu_limit,
                               config.finished_retention, log, config.allow_root_jobs)
        self.registry = NodeRegistry(self.state, self.reactor, self.jobs, config.heartbeat_interval,
                                     config.node_timeout, config.node_dead_timeout, log)
        access = Access(self.state, config.admins, keys,
                        lambda route: node.node_id if (node := self.registry.by_identity.get(route)) else None)
        limits = SubmitLimits(config.max_command_bytes, config.max_env_bytes, config.max_pending_per_user,
                              config.allow_root_jobs, *time_limits)
        self.requests = ClientRequests(self.state, self.jobs, self.registry, access, limits, exposed)
        if keys is not None:
            self.reactor.admit, self.reactor.may_subscribe = access.admit, access.may_subscribe
        self.reactor.handlers = {**self.requests.handlers(), **self.jobs.handlers(), **self.registry.handlers()}
        self.reactor.peer_seen = self.registry.seen
        self.reactor.peer_known = self.registry.by_identity.__contains__
        self.reactor.after_turn = self._end_of_turn
        self.reactor.add_timer(config.heartbeat_interval, self.registry.send_heartbeats)
        # Checking twice per interval keeps detection within half an interval of each threshold.
        self.reactor.add_timer(config.heartbeat_interval / 2, self.registry.check_expiry)
        self.reactor.add_timer(0.5, self.jobs.check_time_limits)
        # Often enough that a short retention (tests, tiny labs) is honoured within half of it.
        self.reactor.add_timer(min(60.0, max(config.finished_retention / 2, 0.5)), self.jobs.purge_finished)
        self.store_failing = False
        self._restore()

    def _restore(self) -> None:
        """Rebuild the in-memory indexes from the store."""
        jobs, nodes = self.store.load()
        for node in nodes:
            self.registry.restore(node)
        # Submission order only orders jobs that are still known: it goes on from the newest of them.
        self.state.next_seq = max((job.seq for job in jobs), default=0)
        for job in sorted(jobs, key=lambda j: j.seq):
            self.state.jobs[job.job_id] = job
            if job.array_job_id is not None:
                self.state.arrays.setdefault(job.array_job_id, []).append(job.job_id)
            if job.state is JobState.PENDING:
                self.jobs.join_queue(job)      # its stored reason may be stale: the first pass says it again
            elif job.state is JobState.RUNNING:
                self._hold(job)
        for job in jobs:
            self.jobs.cancel_if_dependency_failed(job)
        if jobs or nodes:
            self.log.info("restored %d job(s) (%d pending, %d running) and %d node(s) from %s",
                          len(jobs), len(self.state.pending), len(self.state.running), len(nodes),
                          self.store.db_path)
        self.jobs.dirty = True

    def _hold(self, job) -> None:
        """A restored running job keeps its GPUs until its nodes say otherwise."""
        self.state.running.add(job.job_id)
        for rank, part in job.live_ranks():
            if part.node_id in self.state.nodes:
                self.jobs.hold_rank(job, rank)
            else:
                self.jobs.end_rank(job, rank, lost=True, reason=f"node {part.node_id} is unknown after a restart")

    def _end_of_turn(self) -> None:
        """Commit and answer this turn's requests, schedule once, commit that, then dispatch."""
        self.requests.commit_and_reply(self.store)
        self.jobs.schedule()
        try:
            self.store.flush()
        except StoreError as exc:
            if not self.store_failing:
                self.log.error("%s; retrying every turn", exc)
            self.store_failing = True
            return   # dispatches wait until their jobs are stored as running
        self.store_failing = False
        self.jobs.send_dispatches()

    def reload_keys(self) -> None:
        """SIGHUP: read the lists of node and user keys again; a bad list leaves the old keys in force."""
        if self.keys is None:
            self.log.info("SIGHUP: this master has no keys to reload")
            return
        try:
            self.keys.reload()
        except ConfigError as exc:
            self.log.error("SIGHUP: %s; the keys read before stay in force", exc)
            return
        self.log.info("SIGHUP: %d node key(s) and %d user key(s) in force", self.keys.ring.count(Role.NODE),
                      self.keys.ring.count(Role.USER))

    def run(self) -> None:
        try:
            self.reactor.run()
        finally:
            try:
                self.store.flush()
            except StoreError as exc:
                self.log.error("%s; the last changes are lost", exc)
            self.store.close()
            self.reactor.close()
