"""The master's durable state: SQLite in WAL mode under the state directory.

The reactor marks records dirty as it changes them and calls :meth:`Store.flush`
once per turn: one transaction for everything that changed, committed before
any reply of that turn goes out, so an acknowledged submit is on disk.  WAL with
``synchronous=NORMAL`` survives a crash of the master process (``kill -9``); a
power cut may lose the last commits, which is the usual trade for throughput.

Jobs and nodes are stored as JSON documents keyed by id; environments, which
an array's tasks share and which are large, are stored once by content hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3

from ..model import GpuInfo, JobState, NodeState
from .state import JOB_FIELDS, JobRecord, NodeRecord, RankRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, env_id TEXT NOT NULL, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS envs (env_id TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (node_id TEXT PRIMARY KEY, data TEXT NOT NULL);
"""

# A job's row is written three times or more (queued, started, ended).  An upsert changes the row where it
# is; INSERT OR REPLACE would delete it and insert it again under a new rowid, rewriting a table page and an
# index page each time, which doubled the cost of a commit.
# (SQLite before 3.24 has no upsert: there the old way.)
_UPSERT_JOB = ("INSERT INTO jobs VALUES (?, ?, ?) "
               "ON CONFLICT (job_id) DO UPDATE SET env_id = excluded.env_id, data = excluded.data"
               if sqlite3.sqlite_version_info >= (3, 24) else "INSERT OR REPLACE INTO jobs VALUES (?, ?, ?)")

# Node fields that describe the node itself; liveness and holders are rebuilt at run time.
_NODE_FIELDS = ("node_id", "hostname", "address", "drain_reason", "instance")


class StoreError(Exception):
    """The state directory cannot be written (disk full, read-only, ...)."""


def env_id(env: dict) -> str:
    """The content hash an environment is stored under (computed once per submit, not per write)."""
    return hashlib.sha1(json.dumps(env, sort_keys=True).encode()).hexdigest()


_JOB_FIELDS = [name for name in JOB_FIELDS if name not in ("env", "env_id", "ranks", "state")]


def job_to_row(job: JobRecord) -> tuple[str, str, str]:
    # Field by field rather than asdict(), which would deep-copy the (large, stored apart) environment.
    data = {name: getattr(job, name) for name in _JOB_FIELDS}
    data["state"] = job.state.value
    # A rank holds only plain values, lists and dicts of them: its own fields serialise as they are,
    # without the deep copy asdict() makes (this runs several times per job).
    data["ranks"] = [vars(r) for r in job.ranks]
    return job.job_id, job.env_id, json.dumps(data, separators=(",", ":"))


def job_from_row(data: str, env_key: str, env: dict) -> JobRecord:
    fields = json.loads(data)
    fields["env_id"] = env_key
    fields["state"] = JobState(fields["state"])
    fields["ranks"] = tuple(RankRecord(**r) for r in fields["ranks"])
    fields["after"] = tuple(fields.get("after") or ())
    return JobRecord(env=env, **fields)


class Store:
    """Write-behind persistence of jobs and nodes, one transaction per reactor turn."""

    def __init__(self, state_dir: str):
        path = self.db_path = os.path.join(state_dir, "master.db")
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the job database {path}: {exc}") from None
        self.known_envs: set[str] = set()
        self.dirty_jobs: dict[str, JobRecord] = {}
        self.deleted_jobs: set[str] = set()
        self.dirty_nodes: dict[str, NodeRecord] = {}

    # -- marking -----------------------------------------------------------------------------------

    def job_changed(self, job: JobRecord) -> None:
        self.deleted_jobs.discard(job.job_id)
        self.dirty_jobs[job.job_id] = job

    def job_deleted(self, job_id: str) -> None:
        self.dirty_jobs.pop(job_id, None)
        self.deleted_jobs.add(job_id)

    def node_changed(self, node: NodeRecord) -> None:
        self.dirty_nodes[node.node_id] = node

    @property
    def pending_writes(self) -> bool:
        return bool(self.dirty_jobs or self.deleted_jobs or self.dirty_nodes)

    # -- writing and reading -----------------------------------------------------------------------

    def flush(self) -> None:
        """Commit every change marked since the last flush; StoreError (and nothing written) on failure."""
        if not self.pending_writes:
            return
        jobs = list(self.dirty_jobs.values())
        envs = {}
        for job in jobs:
            # Once per environment: an array's ten thousand tasks share one.
            if job.env_id not in self.known_envs and job.env_id not in envs:
                envs[job.env_id] = json.dumps(job.env)
        try:
            with self.db:
                self.db.execute("BEGIN")
                if envs:
                    self.db.executemany("INSERT OR IGNORE INTO envs VALUES (?, ?)", envs.items())
                self.db.executemany(_UPSERT_JOB, [job_to_row(j) for j in jobs])
                kept = None
                if self.deleted_jobs:
                    self.db.executemany("DELETE FROM jobs WHERE job_id = ?", [(j,) for j in self.deleted_jobs])
                    # Environments are shared by content; drop those no job uses any more.
                    self.db.execute("DELETE FROM envs WHERE env_id NOT IN (SELECT env_id FROM jobs)")
                    kept = {env_id for (env_id,) in self.db.execute("SELECT env_id FROM envs")}
                if self.dirty_nodes:
                    rows = [(n.node_id, json.dumps(self._node_data(n))) for n in self.dirty_nodes.values()]
                    self.db.executemany("INSERT OR REPLACE INTO nodes VALUES (?, ?)", rows)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write the job database: {exc}") from None
        if kept is not None:
            self.known_envs = kept
        self.known_envs.update(envs)
        self.dirty_jobs.clear()
        self.deleted_jobs.clear()
        self.dirty_nodes.clear()

    def forget_unsaved(self, job_ids) -> None:
        """Drop pending writes of jobs that were never acknowledged (their submit failed)."""
        for job_id in job_ids:
            self.dirty_jobs.pop(job_id, None)

    @staticmethod
    def _node_data(node: NodeRecord) -> dict:
        data = {name: getattr(node, name) for name in _NODE_FIELDS}
        data["gpus"] = [g.to_dict() for g in node.gpus]
        return data

    def load(self) -> tuple[list[JobRecord], list[NodeRecord]]:
        """Everything stored: jobs, and nodes (down until they register again)."""
        envs = {env_id: json.loads(data) for env_id, data in self.db.execute("SELECT env_id, data FROM envs")}
        self.known_envs.update(envs)
        jobs = [job_from_row(data, key, envs[key]) for key, data in self.db.execute("SELECT env_id, data FROM jobs")]
        nodes = []
        for (data,) in self.db.execute("SELECT data FROM nodes"):
            fields = json.loads(data)
            gpus = [GpuInfo.from_dict(g) for g in fields.pop("gpus")]
            nodes.append(NodeRecord(gpus=gpus, state=NodeState.DOWN, **fields))
        return jobs, nodes

    def close(self) -> None:
        self.db.close()
