"""Fixtures that run real zmgpu daemons on loopback and the real CLI as subprocesses.

A :class:`Cluster` owns one master and any number of node agents (simulated GPUs, fast heartbeats),
each logging to a file in the test's temporary directory; the logs are attached to the report of a
failing test.  Every process a cluster starts, and every job those processes start, carries a
marker in its environment, so teardown can find and kill all of them, even jobs that live in their
own sessions or outlived a killed node agent.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
import zmq

from zmgpu.model import FINISHED_STATES
from zmgpu.protocol import MsgType, decode, encode

REPO = Path(__file__).resolve().parent.parent
MARKER = "ZMGPU_TEST_CLUSTER"
HEARTBEAT = 0.2
NODE_TIMEOUT = 1.5
KILL_GRACE = 2
CLI_TIMEOUT = 60
#: States a job never leaves.
FINISHED = FINISHED_STATES


#: A home directory with nothing in it, for every daemon and command the tests start.
EMPTY_HOME = tempfile.mkdtemp(prefix="zmgpu-tests-home-")
atexit.register(shutil.rmtree, EMPTY_HOME, True)


def base_env(token: str) -> dict:
    """The test process's environment, running this checkout and marked with ``token``."""
    # The caller's own choice of master or client file must not leak into the tests.
    env = {k: v for k, v in os.environ.items() if k not in ("ZMGPU_MASTER", "ZMGPU_CONFIG")}
    # Nor their own client file and keys under ~/.config/zmgpu: the test clusters have none.
    env["HOME"] = EMPTY_HOME
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env[MARKER] = token
    return env


def poll(condition, timeout: float, what: str, interval: float = 0.05):
    """Call ``condition`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def written(path: Path, timeout: float = 20) -> str:
    """The stripped text of a file a job writes, once it is there and not empty."""
    return poll(lambda: path.exists() and path.read_text().strip(), timeout, f"{path.name} to be written")


def process_state(pid: int) -> str | None:
    """The state letter of ``pid`` in /proc (R, S, T for stopped, Z for a zombie, ...); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    return process_state(pid) not in (None, "Z")


def marked_pids(token: str) -> list[int]:
    """Processes whose environment carries ``MARKER=token``."""
    needle = f"{MARKER}={token}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                if needle in fh.read().split(b"\0"):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL a process and the process group it leads or belongs to; gone already is fine."""
    for kill, target in ((os.killpg, _pgid(pid)), (os.kill, pid)):
        try:
            if target is not None:
                kill(target, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _pgid(pid: int) -> int | None:
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        return None
    # Never the test runner's own group: a process that stayed in it is killed alone.
    return None if pgid == os.getpgrp() else pgid


@dataclass
class Daemon:
    """One started daemon process and its log file."""

    name: str
    argv: list[str]
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            self.popen.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Exit status, failing the test if the process is still running at the deadline."""
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} still running {timeout} s after being told to stop") from None


@dataclass
class Cluster:
    """A master and node agents on loopback, plus ways to drive them the way a user would."""

    root: Path
    token: str = field(default_factory=lambda: uuid.uuid4().hex)
    master: Daemon | None = None
    nodes: dict[str, Daemon] = field(default_factory=dict)
    port: int = 0
    pub_port: int = 0
    curve: object = None        # a zmgpu.keys.CurveClient for a master with keys: direct requests use it
    user: str = "tester"        # the name direct requests carry (with keys: the name listed for curve's key)
    _stopped: list[Daemon] = field(default_factory=list)
    _req: int = 0

    def __post_init__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        self.env = base_env(self.token)
        self.ctx = zmq.Context()

    # -- processes ------------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> Daemon:
        log = self.root / f"{name}.log"
        with open(log, "ab") as fh:
            fh.write(f"==== {' '.join(argv)}\n".encode())
            fh.flush()
            popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                     cwd=self.root, env=self.env, start_new_session=True)
        return Daemon(name, argv, popen, log)

    def start_master(self, port: int = 0, pub_port: int = 0, *extra: str, root_jobs: bool = True) -> Daemon:
        """Start the master (port 0: a free port) and wait until it reports its ports.

        ``root_jobs``: the suite runs as root (in CI), and its jobs run as the agents' own user.
        """
        port_file = self.root / "master.ports"
        port_file.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "zmgpu.master", "--port", str(port), "--pub-port", str(pub_port),
                "--port-file", str(port_file), "--state-dir", str(self.root / "master-state"),
                "--heartbeat-interval", str(HEARTBEAT), "--node-timeout", str(NODE_TIMEOUT), "--node-dead-timeout", str(NODE_TIMEOUT),
                "--kill-grace", str(KILL_GRACE), *(["--allow-root-jobs"] if root_jobs else []), *extra]
        self.master = self._spawn("master", argv)

        def ports():
            if not self.master.alive():
                raise AssertionError(f"master exited with {self.master.popen.returncode}:\n{self.log_tail()}")
            try:
                return json.loads(port_file.read_text())
            except (FileNotFoundError, ValueError):
                return None

        info = poll(ports, 20, "the master's port file")
        self.port, self.pub_port = info["port"], info["pub_port"]
        assert info["pid"] == self.master.popen.pid
        return self.master

    def start_node(self, node_id: str, gpus: int | str | None = 4, *extra: str, single_user: bool = True) -> Daemon:
        """Start a node agent with ``gpus`` simulated GPUs (a count, or a simulated-GPU file; None: this
        machine's real GPUs through NVML); does not wait for registration.

        ``single_user``: every job runs as the agent's user, so tests may submit as made-up users.
        """
        simulate = [] if gpus is None else ["--simulate-gpus", str(gpus)]
        argv = [sys.executable, "-m", "zmgpu.node", "--node-id", node_id, "--master-port", str(self.port),
                "--state-dir", str(self.root / f"node-{node_id}"), *simulate,
                "--heartbeat-interval", str(HEARTBEAT), "--master-timeout", str(NODE_TIMEOUT),
                *(["--single-user"] if single_user else []), *extra]
        self.nodes[node_id] = self._spawn(f"node-{node_id}", argv)
        return self.nodes[node_id]

    def stop(self, daemon: Daemon, signum: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Signal a daemon and wait for it to exit; returns its exit status."""
        daemon.signal(signum)
        status = daemon.wait(timeout)
        self._stopped.append(daemon)
        return status

    def close(self) -> None:
        """Kill every process this cluster started, their process groups and every marked job."""
        daemons = [*self.nodes.values(), *([self.master] if self.master else []), *self._stopped]
        for daemon in daemons:
            kill_tree(daemon.popen.pid)
        for pid in marked_pids(self.token):
            kill_tree(pid)
        for daemon in daemons:
            try:
                daemon.popen.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.ctx.destroy(linger=0)

    def log_tail(self, lines: int = 60) -> str:
        parts = []
        for log in sorted(self.root.glob("*.log")):
            text = log.read_text(errors="replace").splitlines()
            parts.append(f"---- {log.name} (last {lines} lines)\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)

    # -- the command line -----------------------------------------------------------------------

    def cli_argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "zmgpu.cli.main", "--host", "127.0.0.1", "--port", str(self.port),
                "--pub-port", str(self.pub_port), *args]

    def cli(self, *args: str, check: bool = True, cwd=None, env: dict | None = None,
            timeout: float = CLI_TIMEOUT, **popen_kw) -> subprocess.CompletedProcess:
        """Run ``zmgpu ARGS`` against this cluster; text output unless stdout/stderr are redirected."""
        popen_kw.setdefault("capture_output", "stdout" not in popen_kw)
        popen_kw.setdefault("text", "stdout" not in popen_kw)
        proc = subprocess.run(self.cli_argv(*args), cwd=cwd or self.root, env={**self.env, **(env or {})},
                              timeout=timeout, stdin=subprocess.DEVNULL, **popen_kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"zmgpu {' '.join(args)} exited {proc.returncode}\n"
                                 f"stdout: {proc.stdout!r}\nstderr: {proc.stderr!r}")
        return proc

    def submit(self, command: str, *flags: str, cwd=None, env: dict | None = None) -> str:
        """``zmgpu submit FLAGS COMMAND``; returns the job id it printed."""
        proc = self.cli("submit", *flags, command, cwd=cwd, env=env)
        job_id = proc.stdout.strip()
        assert len(job_id) == 8 and all(c in "0123456789abcdef" for c in job_id), proc.stdout
        return job_id

    # -- direct requests, for fast polling ------------------------------------------------------

    def request(self, msg_type: MsgType, timeout: float = 5, **body) -> dict | None:
        """One request on a fresh DEALER (survives master restarts); the reply body or None."""
        self._req += 1
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.curve is not None:
            self.curve.apply(sock)
        try:
            sock.connect(f"tcp://127.0.0.1:{self.port}")
            sock.send_multipart(encode(msg_type, {"user": self.user, "req": self._req, **body}))
            if not sock.poll(int(timeout * 1000)):
                return None
            return decode(sock.recv_multipart()).body
        finally:
            sock.close()

    def queue_json(self, all_jobs: bool = True) -> dict:
        """``{"jobs", "nodes"}`` as the master holds them."""
        reply = self.request(MsgType.QUEUE, all=all_jobs)
        assert reply is not None and reply["ok"], reply
        return reply

    def job(self, job_id: str) -> dict:
        reply = self.request(MsgType.JOB, job_id=job_id)
        assert reply is not None and reply["ok"], reply
        return reply["job"]

    def node(self, node_id: str) -> dict | None:
        return next((n for n in self.queue_json()["nodes"] if n["node_id"] == node_id), None)

    def wait_job_state(self, job_id: str, states, timeout: float = 20) -> dict:
        """Poll until the job is in one of ``states``; returns its dict."""
        wanted = {states} if isinstance(states, str) else set(states)
        last = {}

        def reached():
            last["job"] = self.job(job_id)
            return last["job"] if last["job"]["state"] in wanted else None

        try:
            return poll(reached, timeout, f"job {job_id} to reach {sorted(wanted)}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last seen: {last.get('job')}") from None

    def wait_jobs_ended(self, job_ids, timeout: float = 20) -> dict[str, dict]:
        """Poll until every one of ``job_ids`` has ended; their dicts by job id."""
        return {job_id: self.wait_job_state(job_id, FINISHED, timeout) for job_id in job_ids}

    def cancel_leftovers(self) -> list[str]:
        """Cancel every job not yet ended (what a failed test left), and wait until they have; their ids."""
        jobs = self.queue_json(all_jobs=False)["jobs"]
        for owner in {job["user"] for job in jobs}:   # only a job's owner (or an admin) may cancel it
            self.request(MsgType.CANCEL, user=owner, job_ids=[job["job_id"] for job in jobs if job["user"] == owner])
        job_ids = [job["job_id"] for job in jobs]
        self.wait_jobs_ended(job_ids, timeout=KILL_GRACE + 8)
        return job_ids

    def client(self, **kw):
        """A :class:`zmgpu.Client` for this cluster's master (the caller closes it)."""
        from zmgpu import Client

        # Keys only when a test names them: the tester's own (~/.config/zmgpu) are not this cluster's.
        return Client(host="127.0.0.1", port=self.port, pub_port=self.pub_port, default_keys=False, **kw)

    def output_size(self, job_id: str, stream: str = "stdout", rank: int = 0) -> int:
        """Bytes of one stream of a job that the master holds (0 before any)."""
        sizes = {(o["rank"], o["stream"]): o["size"] for o in self.job(job_id)["outputs"]}
        return sizes.get((rank, stream), 0)

    def output(self, job_id: str, stream: str = "stdout", rank: int = 0) -> bytes:
        """Every byte of one stream of a job that the master holds, fetched chunk by chunk."""
        data = bytearray()
        with self.client(timeout=10) as client:
            while True:
                chunk, size = client.fetch(job_id, rank, stream, len(data))
                data += chunk
                if not chunk or len(data) >= size:
                    return bytes(data)

    def wait_node_state(self, node_id: str, state: str, timeout: float = 20) -> dict:
        return poll(lambda: (n := self.node(node_id)) and n["state"] == state and n,
                    timeout, f"node {node_id} to be {state}")

    def wait_nodes_up(self, count: int, timeout: float = 20) -> list[dict]:
        """Poll until at least ``count`` nodes are UP; returns them."""
        def up():
            reply = self.request(MsgType.QUEUE, all=False, timeout=1)
            nodes = [n for n in (reply or {}).get("nodes", []) if n["state"] == "UP"]
            return nodes if len(nodes) >= count else None

        return poll(up, timeout, f"{count} node(s) UP")


def one_line_error(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    """The single stderr line of a command that failed with ``code`` (and no traceback)."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def queue_table(cluster: Cluster, *args: str) -> tuple[list[str], dict[str, str]]:
    """``zmgpu queue ARGS`` on an 80-column terminal: its lines (checked to fit), and each job's
    NODELIST(REASON) cell by job id."""
    lines = cluster.cli("queue", *args, env={"COLUMNS": "80"}).stdout.rstrip("\n").split("\n")
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    header = lines[0]
    assert header.split() == ["ID", "NAME", "USER", "STATE", "TIME", "GPUS", "NODELIST(REASON)"], header
    at = header.index("NODELIST(REASON)")
    return lines, {line.split()[0]: line[at:].strip() for line in lines[1:]}


def as_user(name: str) -> dict:
    """Environment that makes the ``zmgpu`` command line ask as user ``name`` (getpass reads these)."""
    return {"LOGNAME": name, "USER": name}


def make_cluster(root: Path, nodes: dict[str, int], master_config: dict | None = None,
                 master_args: tuple[str, ...] = ()):
    """Generator behind the cluster fixtures: start (the master reading ``master_config`` as its YAML
    file, if given, and taking ``master_args`` as extra flags), yield, always clean up."""
    cluster = Cluster(root)
    try:
        extra = [*master_args]
        if master_config is not None:
            path = root / "master.yaml"
            path.write_text(yaml.safe_dump(master_config))
            extra += ["--config", str(path)]
        cluster.start_master(0, 0, *extra)
        for node_id, gpus in nodes.items():
            cluster.start_node(node_id, gpus)
        cluster.wait_nodes_up(len(nodes))
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A master and two 4-GPU nodes, n1 and n2, shared by a module whose tests leave them idle."""
    yield from make_cluster(tmp_path_factory.mktemp("pair"), {"n1": 4, "n2": 4})


@pytest.fixture
def fresh_pair(tmp_path):
    """A master and two 4-GPU nodes of the test's own, for tests that kill daemons."""
    yield from make_cluster(tmp_path / "cluster", {"n1": 4, "n2": 4})


@pytest.fixture
def bare_cluster(tmp_path):
    """A cluster with nothing started: the test starts what it needs."""
    cluster = Cluster(tmp_path / "cluster")
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def run_program(tmp_path):
    """Run a command line with this checkout on the path; kills it and its group on timeout."""
    token = uuid.uuid4().hex

    def run(argv, timeout: float = 30, env_extra: dict | None = None, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env={**base_env(token), **(env_extra or {})}, capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=kw.pop("cwd", tmp_path),
                              **kw)

    yield run
    for pid in marked_pids(token):
        kill_tree(pid)


@pytest.fixture
def workdir(tmp_path):
    """A per-test directory that jobs run in and write their records to."""
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach the daemons' logs to the report of a failing test."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            if isinstance(value, Cluster):
                report.sections.append((f"zmgpu logs ({value.root.name})", value.log_tail()))
