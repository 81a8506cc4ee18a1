"""One job rank on this node: spawn it in its own session, spool its output, signal it, reap it.

A rank's files lie side by side in ``<state_dir>/jobs/``, each named
``<job_id>.<rank>.<attempt>.<what>`` (its spool; a requeued job runs again as a
new attempt, beside the old one): ``stdout``, ``stderr``, its spawn record and
its exit status.  No directory per rank: creating one cost as much as all of a
trivial job's other file work together.  The agent forwards them to the master from a
sent offset per stream, so the spool file is the buffer: a slow or absent master
loses nothing, and a RESEND only moves the offset back.  When a rank ends its
exit status is written next to its output, so a RESEND that arrives after the
agent has reported and forgotten the rank can still be served
(:meth:`RankProcess.revive`), and a master that missed the JOB_ENDED can learn
it from the agent's next REGISTER (:meth:`zmgpu.node.spools.SpoolIndex.recent_ends`).

Ranks outlive their agent: the node's job keeper (keeper.py), not the agent,
is their parent, and it writes each rank's exit status the moment it ends.  Once
a rank started the agent records who its process is (:class:`SpawnRecord`), and
empties that record once the master has the rank's end, so that a successor
takes over exactly the ranks still unreported (:meth:`RankProcess.adopt`): it
tails their output from offset 0 and signals their process groups, learns the
end of a running one from the keeper, and that of one that ended meanwhile from
its status file.  Only without a current keeper (none could be started, it died,
or it is from an older zmgpu and keeps only the ranks it had) is
a rank the agent's own child, or, after a restart, a process watched through
``/proc``, whose exit status cannot be known.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from ..daemon import write_whole
from ..model import JOB_ID_PATTERN, is_count, is_job_id
from ..protocol import CHUNK_BYTES, Stream
from .keeper_link import STATUS_FILE, KeeperLink, spool_file, write_status
from .sweep import ATTEMPT_VAR, JOB_ID_VAR, proc_start_time, proc_stat
from .users import START_ERRORS, Refusal, RunAs, missing_directory, start_error, start_rank

#: Seconds a rank's JOB_STARTED waits for its end, so that a rank this short sends one message, not two
#: (each costs the agent and the master a wake-up of two threads).  Nothing waits on it: the master counts
#: a dispatched job as running, and the rendezvous host of a multi-node job announces at once.
START_HOLD = 0.01

_SPOOL_NAME = re.compile(rf"({JOB_ID_PATTERN})\.([0-9]+)\.([0-9]+)")
#: Written at spawn and emptied once the master has the rank's end: the :class:`SpawnRecord` a
#: restarted agent takes the rank over by.  Emptied, not removed: where ext4 runs without a journal,
#: each inode removed makes the file creations after it dearer for a minute or more (the allocator
#: steps over recently freed inodes one by one), and a busy node starts hundreds of ranks a second.
PROCESS_FILE = "process"

#: Reasons for the end of a rank taken over without a keeper that knew it: its exit status is lost.
ENDED_WHILE_AWAY = "exit status unknown: the job ended while neither the node agent nor its job keeper ran"
ENDED_AFTER_RESTART = "exit status unknown: the job outlived the node process that started it"


class RankKey(NamedTuple):
    """Which rank of which attempt of a job: a requeued job runs again as attempt 1, 2, ..."""

    job_id: str
    rank: int
    attempt: int

    def valid(self) -> bool:
        """True for a well-formed key; it names spool files, so nothing else may pass."""
        return is_job_id(self.job_id) and is_count(self.rank) and is_count(self.attempt)

    @classmethod
    def parse(cls, name: str) -> "RankKey | None":
        """The key a spool's name stands for; None for any other name."""
        match = _SPOOL_NAME.fullmatch(name)
        return cls(match[1], int(match[2]), int(match[3])) if match else None

    @property
    def name(self) -> str:
        """Name of the rank's spool: the common front of its files' names."""
        return f"{self.job_id}.{self.rank}.{self.attempt}"

    def spool(self, state_dir: str) -> str:
        """Where this rank's output and exit status live: the path its files' names extend (see spool_file)."""
        return os.path.join(state_dir, "jobs", self.name)

    def wire(self) -> dict:
        """The fields naming this rank in a message to the master."""
        return {"job_id": self.job_id, "rank": self.rank, "attempt": self.attempt}

    def __str__(self) -> str:
        retry = f" (attempt {self.attempt})" if self.attempt else ""
        return f"job {self.job_id} rank {self.rank}{retry}"


#: What a spool's files may hold, after the rank's name.
SPOOL_PARTS = (*(stream.value for stream in Stream), STATUS_FILE, PROCESS_FILE)


def jobs_dir_names(state_dir: str) -> list[str]:
    """The names in the jobs directory under ``state_dir`` (none when it cannot be listed)."""
    try:
        return os.listdir(os.path.join(state_dir, "jobs"))
    except OSError:
        return []


def spool_keys(state_dir: str, names: list[str] | None = None) -> list[RankKey]:
    """The key of every spool under ``state_dir`` (a rank with any file there), in name order; from
    ``names``, the jobs directory's listing, when the caller has it."""
    if names is None:
        names = jobs_dir_names(state_dir)
    # Each spool has up to four files: its name is parsed once, not per file.
    stems = {stem for stem, _, part in (name.rpartition(".") for name in names) if part in SPOOL_PARTS}
    keys = [key for key in map(RankKey.parse, stems) if key is not None]
    return sorted(keys, key=lambda key: key.name)


def load_status(spool: str) -> dict:
    """The exit status a rank's end recorded; OSError, or ValueError for a file that is not one."""
    with open(spool_file(spool, STATUS_FILE)) as fh:
        status = json.load(fh)
    if not isinstance(status, dict):
        raise ValueError(f"{STATUS_FILE} is not an exit status")
    return {name: status.get(name) for name in ("exit_code", "signal", "reason")}


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


@dataclass
class SpawnRecord:
    """Who a rank's process is, kept in its spool so that a restarted agent can find it again."""

    pid: int
    pgid: int                   # the rank leads its own session, so this is its pid
    start_time: int | None      # /proc start time: tells the process from a later one given its pid
    kill_grace: float
    spawned_at: float           # wall-clock time of the spawn
    master_port: int | None = None   # the rendezvous port picked here, which a restarted agent reports again

    @classmethod
    def of(cls, pid: int, kill_grace: float, start_time: int | None = None,
           master_port: int | None = None) -> "SpawnRecord":
        """The record of a process just spawned in a session of its own (start time from /proc if not given)."""
        return cls(pid, pid, start_time if start_time is not None else proc_start_time(pid), kill_grace,
                   time.time(), master_port)

    @classmethod
    def load(cls, spool: str) -> "SpawnRecord":
        """Read the record; OSError, or ValueError for a file that is not one."""
        with open(spool_file(spool, PROCESS_FILE)) as fh:
            fields = json.load(fh)
        try:
            record = cls(**fields)
        except TypeError:
            raise ValueError(f"{PROCESS_FILE} is not a spawn record") from None
        # A group id of 0 or 1 would make killpg hit this agent's own group or every process.
        if not (all(isinstance(n, int) and n > 1 for n in (record.pid, record.pgid))
                and isinstance(record.kill_grace, (int, float)) and record.kill_grace >= 0):
            raise ValueError(f"{PROCESS_FILE} holds bad values: {fields}")
        return record

    def save(self, spool: str) -> None:
        """Write the record in one write(2) (see daemon.write_whole): the spool never holds an older record
        (a re-dispatch removes it), and a record torn by a system crash reads as none (see
        :meth:`RankProcess.adopt`)."""
        write_whole(spool_file(spool, PROCESS_FILE), json.dumps(vars(self)))

    def alive(self) -> bool:
        """True while this very process runs; a zombie has ended, a new process with its pid is not it."""
        stat = proc_stat(self.pid)
        return stat is not None and stat[0] not in "ZXx" and stat[1] == self.start_time

    def signal_group(self, signum: int) -> None:
        """Signal the process group, unless a new process has taken the leader's pid (and so the group id)."""
        leader = proc_start_time(self.pgid)
        if leader is not None and leader != self.start_time:
            return
        try:
            os.killpg(self.pgid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already


@dataclass
class RankProcess:
    """One rank of a job on this node, from spawn until its end and all its output are reported."""

    key: RankKey
    spool: str
    node_id: str = ""                      # for the reason of a rank that cannot start
    gpu_indices: list[int] = field(default_factory=list)
    kill_grace: float = 10.0
    proc: subprocess.Popen | None = None   # set only for our own child, which waitpid reaps
    kept: bool = False                     # the keeper is its parent (or asked to be): it reports the end
    spawned: SpawnRecord | None = None     # set for every rank that ran, adopted ones included
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    reaped: bool = False                   # its exit status is known; poll() ends the rank
    ended: bool = False
    start_reported: bool = False           # JOB_STARTED (or a JOB_ENDED that carries the start) went out
    announce_by: float = 0.0               # monotonic time by which JOB_STARTED must go, if it has not ended
    killed: bool = False                   # a KILL came: its end must leave no process of the job behind
    kill_deadline: float | None = None     # monotonic time for SIGKILL after a KILL
    gpu_mem_mb: int | None = None          # the --gpu-mem it declared (None: its GPUs are its own)
    master_port: int | None = None         # the rendezvous port this node picked for the job
    peak_gpu_mem_mb: int | None = None     # the most GPU memory its processes were seen using on one GPU
    dirty_gpus: list[int] = field(default_factory=list)   # its GPUs that still listed its processes at the end
    refusal: str | None = None             # never started: its GPUs were found taken (the job goes back in line)
    sent: dict[Stream, int] = field(default_factory=lambda: dict.fromkeys(Stream, 0))
    _readers: dict[Stream, int] = field(default_factory=dict, repr=False)

    # -- life cycle -----------------------------------------------------------------

    @classmethod
    def spawn(cls, *, state_dir: str, node_id: str, key: RankKey, command: str, cwd: str, env: dict,
              gpu_indices: list[int], kill_grace: float, keeper: KeeperLink | None,
              run_as: RunAs = None, master_port: int | None = None, hosts_rendezvous: bool = False,
              gpu_mem_mb: int | None = None, fresh: bool = False) -> "RankProcess":
        """Start one rank (as ``run_as``: see users.py), through the keeper if there is one; a rank that
        cannot start comes back ended.

        A rank asked of the keeper comes back :attr:`pending` until its answer is
        passed to :meth:`started`.  Raises keeper_link.KeeperLost when the link to the keeper
        broke: the rank may have started.  ``fresh``: no file of an earlier dispatch of this rank can be in
        the spool.
        """
        rank_proc = cls(key, key.spool(state_dir), node_id, list(gpu_indices), kill_grace, master_port=master_port,
                        gpu_mem_mb=gpu_mem_mb)
        try:
            if not fresh:
                rank_proc._forget_earlier_dispatch()
        except OSError as exc:
            rank_proc._fail(f"cannot clear the spool {rank_proc.spool} of an earlier dispatch on node {node_id}: "
                            f"{exc.strerror or exc}")
            return rank_proc
        if isinstance(run_as, Refusal):
            rank_proc._fail(run_as.reason)
            return rank_proc
        if missing_directory(cwd):
            rank_proc._fail(f"working directory {cwd} does not exist on node {node_id}")
            return rank_proc
        env = {**{str(k): str(v) for k, v in env.items()}, **_job_marks(key, gpu_indices, node_id)}
        # Held from the asking, not from the keeper's answer (itself held until the rank ends or 10 ms pass).
        # The rendezvous host of a multi-node job is never held: its other nodes wait for the port it reports
        # (0: before any turn's clock reading, which may be older than this start).
        rank_proc.announce_by = 0.0 if hosts_rendezvous else time.monotonic() + START_HOLD
        if keeper is not None:
            keeper.spawn(key.name, command, cwd, env, run_as.wire() if run_as else None)
            rank_proc.kept = True
            return rank_proc
        try:
            # Another user's rank enters its directory in a preexec chdir: only a plain system call between
            # fork and exec, which the agent's other (ZeroMQ) threads cannot upset.
            rank_proc.proc = start_rank(rank_proc.spool, command, env, run_as, cwd)
        except START_ERRORS as exc:
            rank_proc._fail_start(start_error(exc, run_as, cwd))
            return rank_proc
        rank_proc._begin(rank_proc.proc.pid, None)
        return rank_proc

    def started(self, pid: int | None, start_time: int | None, error: str | None) -> None:
        """The keeper answered the spawn request: the rank runs as ``pid``, or it could not start (``error``)."""
        if error is not None or pid is None:
            self.kept = False   # no process: the end to record is this agent's
            self._fail_start(error or "the keeper gave no pid")
            return
        self._begin(pid, start_time)
        if self.killed:
            self._terminate()   # a KILL came while the keeper was starting it

    @classmethod
    def adopt(cls, state_dir: str, key: RankKey, kept: dict[str, int]) -> "RankProcess | None":
        """A rank that a previous agent started and did not report ended; None if the spool holds no such rank.

        ``kept`` is what the keeper runs (spool name -> pid).  The rank's output goes
        out again from offset 0 (the master skips what it has).  A rank whose process
        is gone and that no keeper saw end comes back ended, its exit status unknown.
        Raises ValueError when the spool cannot be read.
        """
        spool = key.spool(state_dir)
        if key.name not in kept and not unreported(spool):
            return None     # reported already (its record emptied), or never started
        rank_proc = cls(key, spool, kept=True)
        try:
            rank_proc.spawned = SpawnRecord.load(spool)
            rank_proc.kill_grace, rank_proc.master_port = rank_proc.spawned.kill_grace, rank_proc.spawned.master_port
        except (FileNotFoundError, json.JSONDecodeError):
            # No record, or one torn by a system crash (it is written in one go).
            if key.name not in kept:
                return None     # reported already, or never started
            # The agent died between the keeper's spawn and its record of it.
            rank_proc._record_spawn(kept[key.name], None)
        except (OSError, ValueError) as exc:
            raise ValueError(f"unreadable spool {spool}: {exc}") from None
        try:
            rank_proc._open_readers()
        except OSError as exc:
            rank_proc.close()
            raise ValueError(f"unreadable spool {spool}: {exc}") from None
        rank_proc.rejoin(kept)
        if not rank_proc.kept and not rank_proc.spawned.alive():
            rank_proc.reason = ENDED_WHILE_AWAY
            rank_proc._end()
        return rank_proc

    def rejoin(self, kept: dict[str, int]) -> None:
        """Learn how a rank the keeper held is doing after the link to it broke (``kept``: what it runs now)."""
        if not self.kept or not self.running or self.reaped:
            return
        try:
            status = load_status(self.spool)
        except (OSError, ValueError):
            # Still running under this keeper, or orphaned by a keeper that died: only /proc can tell then.
            self.kept = kept.get(self.key.name) == self.pid
            return
        self.exit_code, self.signal, self.reason = status["exit_code"], status["signal"], status["reason"]
        self.reaped = True

    def exited(self, exit_code: int | None, signum: int | None) -> None:
        """The keeper saw the rank's process end; the next poll() ends the rank."""
        if self.kept and self.running:
            self.exit_code, self.signal, self.reaped = exit_code, signum, True

    @classmethod
    def refused(cls, state_dir: str, key: RankKey, why: str) -> "RankProcess":
        """A rank this node would not start (its GPUs were taken meanwhile): ended, to be reported as such."""
        rank_proc = cls(key, key.spool(state_dir), refusal=why)
        rank_proc.reason, rank_proc.start_reported, rank_proc.ended = why, True, True
        return rank_proc

    @classmethod
    def revive(cls, state_dir: str, key: RankKey) -> "RankProcess | None":
        """An already reported, ended rank rebuilt from its spool, to serve a late RESEND."""
        rank_proc = cls(key, key.spool(state_dir), start_reported=True, ended=True)
        try:
            status = load_status(rank_proc.spool)
            rank_proc._open_readers()
        except (OSError, ValueError):
            rank_proc.close()
            return None
        rank_proc.exit_code, rank_proc.signal, rank_proc.reason = (
            status["exit_code"], status["signal"], status["reason"])
        rank_proc.sent = {stream: rank_proc.size(stream) for stream in Stream}
        return rank_proc

    def _forget_earlier_dispatch(self) -> None:
        """Remove the end and the spawn record that an earlier dispatch of this very rank left (the master lost
        a commit in a power cut and dispatched it again): the rank starts over.

        Only for a rank whose spool may hold them: removing a file, even one that is not
        there, locks the jobs directory against the keeper creating the files of other
        ranks.  The output files are emptied by whoever starts the rank (see users.start_rank).
        """
        for name in (STATUS_FILE, PROCESS_FILE):
            remove_file(spool_file(self.spool, name))

    def _open_readers(self) -> None:
        for stream in Stream:
            self._readers[stream] = os.open(spool_file(self.spool, stream.value), os.O_RDONLY)

    def _record_spawn(self, pid: int, start_time: int | None) -> None:
        self.spawned = SpawnRecord.of(pid, self.kill_grace, start_time, self.master_port)
        try:
            self.spawned.save(self.spool)
        except OSError:
            pass  # the job runs all the same; only an agent restarted meanwhile would not find it

    def _begin(self, pid: int, start_time: int | None) -> None:
        """The rank just started as ``pid``: record who it is and read its output from now on."""
        self._record_spawn(pid, start_time)
        try:
            self._open_readers()
        except OSError:
            self.close()    # its output is lost (the spool went away); its end is still reported

    def _fail_start(self, detail: str) -> None:
        self._fail(f"cannot start the job on node {self.node_id}: {detail}")

    def _fail(self, reason: str) -> None:
        """End a rank that never ran; there is no process to report as started."""
        self.reason = reason
        self.start_reported = True
        self._finish()

    def _finish(self) -> None:
        self.ended = True
        if self.kept and file_size(spool_file(self.spool, STATUS_FILE)) > 0:
            return  # the keeper recorded the end as it saw it (one from an older zmgpu wrote it elsewhere)
        try:
            write_status(self.spool, self.exit_code, self.signal, self.reason)
        except OSError:
            pass  # only a late RESEND needs it, and a spool that cannot be written has no output either

    def _end(self) -> None:
        """The rank's leader has ended: clear out its group and record the end."""
        # Whatever the leader left behind in its group (DataLoader workers, `cmd &`) would hold GPUs.
        self.spawned.signal_group(signal.SIGKILL)
        self._finish()

    @property
    def pid(self) -> int | None:
        return self.spawned.pid if self.spawned is not None else None

    @property
    def running(self) -> bool:
        return self.spawned is not None and not self.ended

    @property
    def pending(self) -> bool:
        """Asked of the keeper, which has not answered yet: neither running nor ended."""
        return self.kept and self.spawned is None and not self.ended

    def poll(self) -> bool:
        """True when the rank has just ended: reported by the keeper, reaped if our child, gone from /proc."""
        if not self.running:
            return False
        if self.kept:
            if not self.reaped:
                return False
        elif self.proc is not None:
            returncode = self.proc.poll()     # waitpid, WNOHANG
            if returncode is None:
                return False
            if returncode < 0:
                self.signal = -returncode
            else:
                self.exit_code = returncode
        else:
            # Taken over without a keeper that knows it: not our child, so no exit status.
            if self.spawned.alive():
                return False
            self.reason = ENDED_AFTER_RESTART
        self._end()
        return True

    def kill(self, now: float) -> bool:
        """SIGCONT and SIGTERM to the rank's process group; SIGKILL follows after the grace period.

        A pending rank gets them once it has started.
        """
        if self.ended:
            return False
        self.killed = True
        if self.kill_deadline is None:
            self.kill_deadline = now + self.kill_grace
        if self.spawned is not None:
            self._terminate()
        return True

    def _terminate(self) -> None:
        self.spawned.signal_group(signal.SIGCONT)    # a stopped process would never see the SIGTERM
        self.spawned.signal_group(signal.SIGTERM)

    def escalate(self, now: float) -> bool:
        """SIGKILL the group once the grace period of a KILL has run out; True when it did."""
        if not self.running or self.kill_deadline is None or now < self.kill_deadline:
            return False
        self.spawned.signal_group(signal.SIGKILL)
        self.kill_deadline = None
        return True

    def describe_end(self) -> str:
        """How the rank ended, for a log line."""
        if self.signal is not None:
            return f"killed by signal {self.signal} ({_signal_name(self.signal)})"
        if self.exit_code is not None:
            return f"exited with code {self.exit_code}"
        if self.spawned is not None:
            return f"ended; {self.reason}"
        return f"failed: {self.reason}"

    # -- output -----------------------------------------------------------------------

    def size(self, stream: Stream) -> int:
        """Bytes in the spool file of ``stream`` so far."""
        reader = self._readers.get(stream)
        return os.fstat(reader).st_size if reader is not None else 0

    def has_unsent(self) -> bool:
        return any(self.size(stream) > self.sent[stream] for stream in Stream)

    def read_chunk(self, stream: Stream, limit: int) -> bytes:
        """The next unsent bytes of ``stream``, at most ``limit`` and CHUNK_BYTES; b"" when all is sent."""
        reader = self._readers.get(stream)
        if reader is None:
            return b""
        return os.pread(reader, min(limit, CHUNK_BYTES), self.sent[stream])

    def advance(self, stream: Stream, count: int) -> None:
        """``count`` more bytes of ``stream`` are on their way to the master."""
        self.sent[stream] += count

    def rewind(self, stream: Stream, offset: int) -> bool:
        """Send ``stream`` again from ``offset`` (the master has a gap there); False if nothing to redo."""
        if not 0 <= offset < self.sent[stream]:
            return False
        self.sent[stream] = offset
        return True

    def ended_body(self) -> dict:
        """Body of the JOB_ENDED message, with the final output sizes (and the start, if still unreported)."""
        start = {} if self.start_reported else {"pid": self.pid, "master_port": self.master_port}
        return {**self.key.wire(), **start, "exit_code": self.exit_code,
                "signal": self.signal, "reason": self.reason,
                "sizes": {stream.value: self.sent[stream] for stream in Stream},
                "peak_gpu_mem_mb": self.peak_gpu_mem_mb, "dirty_gpus": self.dirty_gpus,
                **({"refused": self.refusal} if self.refusal else {})}

    def close(self) -> None:
        """Release the spool readers; the files stay on disk."""
        for reader in self._readers.values():
            os.close(reader)
        self._readers.clear()

    def forget(self) -> None:
        """The rank's end is on its way to the master: close, and let no later agent take the rank over."""
        self.close()
        forget_spawn(self.spool)


def forget_spawn(spool: str) -> None:
    """Empty a spool's spawn record: its rank is reported, and an empty record reads as none."""
    try:
        os.truncate(spool_file(spool, PROCESS_FILE), 0)
    except FileNotFoundError:
        pass


def unreported(spool: str) -> bool:
    """True while a spool's rank has a spawn record: the master may not have heard it end."""
    return file_size(spool_file(spool, PROCESS_FILE)) > 0


def declared_memory(ranks) -> dict[int, int]:
    """GPU index -> the --gpu-mem MiB that the shared ``ranks`` still running declared on it."""
    declared: dict[int, int] = {}
    for rank in ranks:
        if rank.gpu_mem_mb and not rank.ended:
            for index in rank.gpu_indices:
                declared[index] = declared.get(index, 0) + rank.gpu_mem_mb
    return declared


def free_port() -> int:
    """A TCP port free on this host now, for a job's torch.distributed rendezvous (torchrun does the same)."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def _job_marks(key: RankKey, gpu_indices: list[int], node_id: str) -> dict[str, str]:
    """What the runner adds to a rank's environment."""
    return {
        # An empty list hides every GPU, so a CPU job cannot grab one by accident.
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpu_indices),
        # CUDA's own default orders by speed; NVML (and so the master) orders by PCI bus.
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        # These two mark every process of the job, wherever it goes (see sweep.py);
        # the attempt count is Slurm's SLURM_RESTART_COUNT.
        JOB_ID_VAR: key.job_id,
        ATTEMPT_VAR: str(key.attempt),
        "ZMGPU_NODE_ID": node_id,
    }


def remove_file(path: str) -> None:
    """Remove ``path`` if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "unknown signal"
