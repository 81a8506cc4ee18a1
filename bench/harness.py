"""What every benchmark shares: figures as JSON lines, real daemons in a temp dir, finished-job watching, /proc.

A :class:`Cluster` starts ``python -m zmgpu.master`` (optionally under
cProfile) and ``python -m zmgpu.node --simulate-gpus N`` agents on loopback in
a fresh temporary directory, and stops them all on exit, even when the
benchmark failed.  A :class:`Figure` is one measured number with the
machine's own limit measured in the same run and issue 6's target; it prints
as one JSON line.
"""

from __future__ import annotations

import atexit
import enum
import io
import json
import os
import platform
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Iterable, Optional

import zmq

from zmgpu import Client, iothreads
from zmgpu.config import default_state_dir
from zmgpu.daemon import module_env
from zmgpu.model import FINISHED_STATES
from zmgpu.protocol import ENDED_PREFIX, MsgType
from zmgpu.stream import published


#: How long a daemon may take to come up, and to stop after SIGTERM before SIGKILL.
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
#: A profiled master is several times slower and must finish its turn to write its profile.
PROFILED_STOP_TIMEOUT = 300.0


class BenchError(Exception):
    """A benchmark that could not produce its figures; the message is one line for a person."""


class Better(str, enum.Enum):
    """Which way a figure improves."""

    LOWER = "lower"
    HIGHER = "higher"


@dataclass
class Figure:
    """One measured number, the machine's limit for the same work, and issue 6's target.

    ``ratio`` is ``value / limit``: for times, how many times the limit it takes;
    for rates, the share of the limit it reaches.  ``target`` is an absolute
    target in ``unit``; ``target_ratio`` one expressed against the limit.
    """

    bench: str
    figure: str
    value: Optional[float]
    unit: str
    better: Better
    limit: Optional[float] = None
    target: Optional[float] = None
    target_ratio: Optional[float] = None
    note: Optional[str] = None

    @property
    def ratio(self) -> Optional[float]:
        if self.value is None or not self.limit:
            return None
        return self.value / self.limit

    @property
    def meets(self) -> Optional[bool]:
        """Whether every stated target holds; None when there is no target or no value."""
        checks = [(self.value, self.target), (self.ratio, self.target_ratio)]
        checks = [(got, want) for got, want in checks if want is not None]
        if not checks or any(got is None for got, _ in checks):
            return None
        if self.better is Better.LOWER:
            return all(got <= want for got, want in checks)
        return all(got >= want for got, want in checks)

    def to_json(self, **extra) -> str:
        data = {"bench": self.bench, "figure": self.figure, "value": _round(self.value), "unit": self.unit,
                "limit": _round(self.limit), "ratio": _round(self.ratio), "target": self.target,
                "target_ratio": self.target_ratio, "better": self.better.value, "meets": self.meets,
                "machine": machine(), **extra}
        if self.note:
            data["note"] = self.note
        return json.dumps(data)


def _round(value: Optional[float]) -> Optional[float]:
    return None if value is None else float(f"{value:.4g}")


@dataclass
class Context:
    """How one benchmark should run: full or quick sizes, its time budget, where profiles go."""

    quick: bool
    budget: float                      # seconds this benchmark may take, all phases together
    profile_dir: Optional[str] = None  # run masters under cProfile and write their stats here
    keep: bool = False                 # leave the clusters' temporary directories (logs, spools) behind
    started: float = field(default_factory=time.monotonic)

    def pick(self, full, quick):
        """The full-run size, or the small one in --quick mode."""
        return quick if self.quick else full

    @property
    def deadline(self) -> float:
        """Monotonic time by which the benchmark must have finished."""
        return self.started + self.budget

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


@lru_cache(maxsize=None)
def machine() -> str:
    """Cores (as ``nproc`` counts them), CPU model and Python version of this machine."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{len(os.sched_getaffinity(0))} cores, {model}, Python {platform.python_version()}"


# -- numbers ---------------------------------------------------------------------------------------

def percentile(samples: Iterable[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0-100) of ``samples``."""
    ordered = sorted(samples)
    if not ordered:
        raise BenchError("no samples were taken")
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def median(samples: Iterable[float]) -> float:
    return percentile(samples, 50)


def popen_true_seconds(count: int, argv: tuple[str, ...] = ("true",)) -> list[float]:
    """Wall time of ``count`` plain ``Popen(["true"]).wait()`` calls, one by one: the spawn limit; with
    another ``argv``, the same loop of that."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        subprocess.Popen(argv).wait()
        times.append(time.perf_counter() - start)
    return times


def wakeup_round_trip_us(count: int, cpus: tuple[int, int]) -> float:
    """Mean microseconds for a byte to reach a forked process and come back, over two pipes, the two
    processes held to ``cpus`` (the same CPU twice, or two): each round trip is two wake-ups.

    Each step of a zmgpu job from one process or thread to another (a daemon, or one of its ZeroMQ I/O
    threads, woken by another) is such a wake-up, so this is what the machine charges for each, apart from
    any work.
    """
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    own = os.sched_getaffinity(0)
    pid = os.fork()
    if pid == 0:   # only system calls and _exit: safe whatever threads the parent has
        try:
            os.close(down_w)
            os.close(up_r)
            os.sched_setaffinity(0, {cpus[1]})
            # Until the parent closes its end (EOF), or all the round trips are done.
            for _ in range(count):
                if not os.read(down_r, 1):
                    break
                os.write(up_w, b"x")
        finally:
            os._exit(0)
    os.close(down_r)
    os.close(up_w)
    try:
        os.sched_setaffinity(0, {cpus[0]})
        start = time.perf_counter()
        for _ in range(count):
            os.write(down_w, b"x")
            os.read(up_r, 1)
        elapsed = time.perf_counter() - start
    finally:
        os.sched_setaffinity(0, own)
        os.close(down_w)    # the child, if still reading, sees the end and exits
        os.close(up_r)
        os.waitpid(pid, 0)
    return elapsed / count * 1e6


# -- /proc -----------------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as fh:
        # The command name may hold spaces; the fields after its closing ')' do not.
        rest = fh.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident memory (VmRSS) of a process, in MiB."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for process {pid}")


# -- processes -------------------------------------------------------------------------------------

def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_strays(marker: str) -> None:
    """Stop processes whose command line names ``marker`` (a cluster's temp dir): job keepers, stray jobs.

    A node agent's job keeper outlives the agent by design, so stopping the
    agent is not enough to leave nothing behind.
    """
    strays = []
    for pid in (int(entry) for entry in os.listdir("/proc") if entry.isdigit()):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if pid != os.getpid() and marker.encode() in fh.read():
                    strays.append(pid)
        except OSError:
            continue   # gone already
    for signum in (signal.SIGTERM, signal.SIGKILL):
        for pid in strays:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + STOP_TIMEOUT
        while strays and time.monotonic() < deadline:
            strays = [pid for pid in strays if _running(pid)]
            time.sleep(0.05)


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for a parent to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def profile_summary(path: str, top: int = 15) -> str:
    """A cProfile dump's top zmgpu functions by cumulative time, then the top functions of all by own time."""
    out = io.StringIO()
    stats = pstats.Stats(path, stream=out)
    # Restricting to zmgpu's files skips the interpreter's start-up frames that head any cumulative list.
    stats.sort_stats("cumulative").print_stats(f"{os.sep}zmgpu{os.sep}", top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _tail(path: str, lines: int = 15) -> str:
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    except OSError:
        return ""


def bench_root() -> str:
    """Where the clusters' state goes: $ZMGPU_BENCH_DIR, else beside zmgpu's own default state directory.

    The daemons' state lives there in real use (or under /var/lib); some machines' /tmp is far slower at
    creating files, which would measure the temporary directory rather than zmgpu.
    """
    root = os.environ.get("ZMGPU_BENCH_DIR") or os.path.dirname(default_state_dir())
    os.makedirs(root, exist_ok=True)
    return root


#: Cluster directories to remove when this process exits (see :func:`remove_at_exit`).
_LEFT_BEHIND: list[str] = []


def _remove_left_behind() -> None:
    while _LEFT_BEHIND:
        shutil.rmtree(_LEFT_BEHIND.pop(), ignore_errors=True)


def remove_at_exit(path: str) -> None:
    """Remove ``path`` when this process exits, not now.

    Where ext4 runs without a journal (this machine's root file system does),
    every inode deleted within the last minute (six, while its inode table is
    dirty) is skipped, one by one, by the next file creations in its block group:
    removing a finished benchmark's thousands of spool files at once made the next
    benchmark's file creations ten to twenty times dearer (0.7 ms of kernel CPU each,
    measured), which would charge zmgpu for the previous benchmark's clean-up.
    """
    if not _LEFT_BEHIND:
        atexit.register(_remove_left_behind)
    _LEFT_BEHIND.append(path)


class Cluster:
    """A master and ``nodes`` simulated-GPU node agents on loopback, in a temp dir, stopped on exit.

    With ``ctx.profile_dir`` the master runs under cProfile; on exit its stats
    go to ``<profile_dir>/<name>.master.prof`` and a summary to stderr.
    """

    def __init__(self, name: str, ctx: Context, nodes: int = 1, gpus: int = 4, admin: Optional[str] = None):
        self.name = name
        self.nodes = nodes
        self.gpus = gpus
        self.admin = admin      # a user name the master makes an admin (who may raise a job's priority)
        self.profile_dir = ctx.profile_dir
        self.keep = ctx.keep
        self.dir = ""
        self.master: Optional[subprocess.Popen] = None
        self.agents: list[subprocess.Popen] = []
        self.port = self.pub_port = self.master_pid = 0

    def __enter__(self) -> "Cluster":
        self.dir = tempfile.mkdtemp(prefix=f"zmgpu-bench-{self.name}-", dir=bench_root())
        try:
            self._start_master()
            for index in range(self.nodes):
                self._start_node(f"{self.name}-node{index}")
            if self.nodes:
                self._wait_for_nodes()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self.agents and self.master is not None and self.master.poll() is None:
                self._cancel_active()
            for agent in self.agents:
                stop_process(agent)
            if self.master is not None:
                stop_process(self.master, PROFILED_STOP_TIMEOUT if self._profile_path else STOP_TIMEOUT)
            if self.dir:
                stop_strays(self.dir)
            if exc_type is not None and self.dir:
                print(f"bench: {self.name}: master log ends with:\n{_tail(self._log('master'))}", file=sys.stderr)
            self._report_profile()
        finally:
            if self.keep:
                print(f"bench: {self.name}: logs and spools kept in {self.dir}", file=sys.stderr)
            else:
                remove_at_exit(self.dir)

    @property
    def work_dir(self) -> str:
        """A directory for the jobs' own files (their working directory)."""
        path = os.path.join(self.dir, "work")
        os.makedirs(path, exist_ok=True)
        return path

    def client(self, timeout: float = 30.0, user: Optional[str] = None) -> Client:
        return Client(port=self.port, pub_port=self.pub_port, timeout=timeout, user=user)

    def _log(self, who: str) -> str:
        return os.path.join(self.dir, f"{who}.log")

    def _spawn(self, who: str, argv: list[str]) -> subprocess.Popen:
        with open(self._log(who), "wb") as log:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                    env=module_env(), cwd=self.dir)

    @property
    def _profile_path(self) -> Optional[str]:
        if not self.profile_dir:
            return None
        return os.path.join(os.path.abspath(self.profile_dir), f"{self.name}.master.prof")

    def _start_master(self) -> None:
        port_file = os.path.join(self.dir, "master.port")
        profiler = ["-m", "cProfile", "-o", self._profile_path] if self._profile_path else []
        config = os.path.join(self.dir, "master.yaml")
        with open(config, "w") as fh:
            # The scale benchmark queues 100,000 jobs of one user, ten times a user's default limit.
            fh.write("max_pending_per_user: 1000000\n")
            if self.admin is not None:
                fh.write(f"admins: [{json.dumps(self.admin)}]\n")
        self.master = self._spawn("master", [
            sys.executable, *profiler, "-m", "zmgpu.master", "--port", "0", "--pub-port", "0",
            "--port-file", port_file, "--state-dir", os.path.join(self.dir, "master"), "--kill-grace", "1",
            "--config", config,
            # Benchmarks may run as root (CI, containers); their jobs run as the agents' own user.
            "--allow-root-jobs"])
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(port_file):
            self._check_alive(self.master, "master")
            if time.monotonic() > deadline:
                raise BenchError(f"the master wrote no port file within {START_TIMEOUT:g} s")
            time.sleep(0.02)
        with open(port_file) as fh:
            ports = json.load(fh)
        self.port, self.pub_port, self.master_pid = ports["port"], ports["pub_port"], ports["pid"]

    def _start_node(self, node_id: str) -> None:
        self.agents.append(self._spawn(node_id, [
            sys.executable, "-m", "zmgpu.node", "--node-id", node_id, "--master-port", str(self.port),
            "--simulate-gpus", str(self.gpus), "--state-dir", os.path.join(self.dir, node_id), "--single-user"]))

    def _check_alive(self, proc: subprocess.Popen, who: str) -> None:
        if proc.poll() is not None:
            raise BenchError(f"{who} exited with status {proc.returncode}: {_tail(self._log(who), 3).strip()}")

    def _wait_for_nodes(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        with self.client(timeout=5) as client:
            while sum(n["state"] == "UP" for n in client.nodes()) < self.nodes:
                for index, agent in enumerate(self.agents):
                    self._check_alive(agent, f"{self.name}-node{index}")
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.nodes} node agent(s) did not register within {START_TIMEOUT:g} s")
                time.sleep(0.05)

    def _cancel_active(self) -> None:
        """Best effort: stop jobs still running, so no job process outlives the benchmark."""
        try:
            with self.client(timeout=5) as client:
                active = [job["job_id"] for job in client.queue()["jobs"]]
                if active:
                    client.cancel(*active)
                    deadline = time.monotonic() + STOP_TIMEOUT
                    while client.queue()["jobs"] and time.monotonic() < deadline:
                        time.sleep(0.1)
        except Exception as exc:  # the cluster is going away anyway; say so and stop it
            print(f"bench: {self.name}: could not cancel the remaining jobs: {exc}", file=sys.stderr)

    def _report_profile(self) -> None:
        path = self._profile_path
        if path is None:
            return
        if not os.path.exists(path):
            print(f"bench: {self.name}: the master wrote no profile", file=sys.stderr)
            return
        summary = profile_summary(path)
        with open(path[:-len(".prof")] + ".txt", "w") as fh:
            fh.write(summary)
        print(f"bench: {self.name}: master profile ({path}):\n{summary}", file=sys.stderr)


class StateWatcher:
    """Finished jobs as the master publishes them, with a poll every second for events PUB dropped."""

    def __init__(self, cluster: Cluster):
        self.ctx = iothreads.context()   # as a zmgpu client's (see zmgpu.iothreads)
        self.sub = self.ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 0)   # keep every event we are sent; the master's SNDHWM still drops
        self.sub.setsockopt(zmq.SUBSCRIBE, ENDED_PREFIX)   # each job once, at its end
        self.sub.connect(f"tcp://127.0.0.1:{cluster.pub_port}")
        self.finished: dict[str, dict] = {}

    def __enter__(self) -> "StateWatcher":
        return self

    def __exit__(self, *exc_info) -> None:
        self.sub.close()
        self.ctx.term()

    def unfollow(self) -> None:
        """Subscribe to no more ends (the events already queued stay readable)."""
        self.sub.setsockopt(zmq.UNSUBSCRIBE, ENDED_PREFIX)

    def _drain(self) -> list[str]:
        """Take the published ends; return the ids of the jobs they ended."""
        ended = []
        for msg in published(self.sub):
            if msg.type is MsgType.JOB_STATE:   # under ended.: only final states are published there
                self.finished[msg.body["job_id"]] = msg.body
                ended.append(msg.body["job_id"])
        return ended

    def wait(self, client: Client, job_ids: Iterable[str], deadline: float) -> dict[str, dict]:
        """The final dicts of ``job_ids`` once all have finished; BenchError past ``deadline`` (monotonic)."""
        wanted = list(job_ids)
        missing = set(wanted) - set(self.finished)
        next_check = time.monotonic() + 1.0
        while missing:
            now = time.monotonic()
            if now > deadline:
                raise BenchError(f"{len(missing)} of {len(wanted)} job(s) still unfinished at the time limit")
            if now >= next_check:
                # Only the ended ones: the dicts of a thousand running or pending jobs would cost the master
                # (and this load generator) more than the jobs being measured.
                for job in client.queue(all=True, job_ids=sorted(missing), states=FINISHED_STATES,
                                        nodes=False)["jobs"]:
                    self.finished[job["job_id"]] = job
                    missing.discard(job["job_id"])
                next_check = time.monotonic() + 1.0
            elif self.sub.poll(max(1, int((min(next_check, deadline) - now) * 1000))):
                # Only what this wake-up brought: going over every job finished so far would make the
                # watcher's cost grow with the run (quadratic over thousands of jobs).
                missing.difference_update(self._drain())
        return {job_id: self.finished[job_id] for job_id in wanted}


# -- the command line, as users run it ------------------------------------------------------------

def wall_seconds(argv: list[str], runs: int, env: dict, cwd: str) -> list[float]:
    """Wall time of ``runs`` runs of ``argv``, after one untimed run (it fills the bytecode cache);
    BenchError if one fails."""
    times = []
    for _ in range(runs + 1):
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            last = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no message"]
            raise BenchError(f"'{' '.join(argv[1:])}' exited with status {done.returncode}: {last[0]}")
    return times[1:]


def cli_env(cluster: Cluster) -> dict:
    """The environment the ``zmgpu`` commands run in: this cluster's master, no config file, bytecode cached
    in the cluster's own directory."""
    env = module_env(ZMGPU_MASTER=f"127.0.0.1:{cluster.port}",
                     PYTHONPYCACHEPREFIX=os.path.join(cluster.work_dir, "pycache"))
    env.pop("ZMGPU_CONFIG", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


#: The command line of ``zmgpu``, as the installed script runs it.
ZMGPU = [sys.executable, "-m", "zmgpu.cli"]
