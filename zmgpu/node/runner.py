"""One job rank on this node: spawn it in its own session, spool its output, signal it, reap it.

A rank's stdout and stderr go to files under ``<state_dir>/jobs/<job_id>.<rank>/``.
The agent forwards them to the master from a sent offset per stream, so the
spool file is the buffer: a slow or absent master loses nothing, and a RESEND
only moves the offset back.  When a rank ends its exit status is written next
to its output, so a RESEND that arrives after the agent has reported and
forgotten the rank can still be served (:meth:`RankProcess.revive`).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass, field

from ..protocol import CHUNK_BYTES, Stream

_JOB_ID = re.compile(r"[0-9a-f]{8}")
_STATUS_FILE = "status"


def valid_rank_key(job_id: str, rank: int) -> bool:
    """True for a well-formed job id and rank; they name a spool directory, so nothing else may pass."""
    return bool(_JOB_ID.fullmatch(job_id)) and rank >= 0


def spool_dir(state_dir: str, job_id: str, rank: int) -> str:
    """Where one rank's output and exit status live."""
    return os.path.join(state_dir, "jobs", f"{job_id}.{rank}")


@dataclass
class RankProcess:
    """One rank of a job on this node, from spawn until its end and all its output are reported."""

    job_id: str
    rank: int
    spool: str
    gpu_indices: list[int] = field(default_factory=list)
    kill_grace: float = 10.0
    proc: subprocess.Popen | None = None
    exit_code: int | None = None
    signal: int | None = None
    reason: str | None = None
    ended: bool = False
    start_reported: bool = False           # JOB_STARTED is on its way to the master
    kill_deadline: float | None = None     # monotonic time for SIGKILL after a KILL
    sent: dict[Stream, int] = field(default_factory=lambda: dict.fromkeys(Stream, 0))
    _readers: dict[Stream, int] = field(default_factory=dict, repr=False)

    # -- life cycle -----------------------------------------------------------------

    @classmethod
    def spawn(cls, *, state_dir: str, node_id: str, job_id: str, rank: int, command: str, cwd: str,
              env: dict, gpu_indices: list[int], kill_grace: float) -> "RankProcess":
        """Start one rank; a rank that cannot start comes back already ended, with the reason."""
        rank_proc = cls(job_id, rank, spool_dir(state_dir, job_id, rank), list(gpu_indices), kill_grace)
        try:
            outputs = rank_proc._create_spool()
        except OSError as exc:
            rank_proc._fail(f"cannot create the output spool {rank_proc.spool} on node {node_id}: "
                            f"{exc.strerror or exc}")
            return rank_proc
        with outputs[Stream.STDOUT] as stdout, outputs[Stream.STDERR] as stderr:
            if not os.path.isdir(cwd):
                rank_proc._fail(f"working directory {cwd} does not exist on node {node_id}")
                return rank_proc
            extras = {
                # An empty list hides every GPU, so a CPU job cannot grab one by accident.
                "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in gpu_indices),
                # CUDA's own default orders by speed; NVML (and so the master) orders by PCI bus.
                "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                "ZMGPU_JOB_ID": job_id,
                "ZMGPU_NODE_ID": node_id,
            }
            try:
                rank_proc.proc = subprocess.Popen(
                    ["/bin/sh", "-c", command], cwd=cwd,
                    env={**{str(k): str(v) for k, v in env.items()}, **extras},
                    stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                    start_new_session=True, close_fds=True)
            except (OSError, ValueError) as exc:
                # ValueError: an environment name or value the kernel cannot take (NUL, '=').
                detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                rank_proc._fail(f"cannot start the job on node {node_id}: {detail}")
        return rank_proc

    @classmethod
    def revive(cls, state_dir: str, job_id: str, rank: int) -> "RankProcess | None":
        """An already reported, ended rank rebuilt from its spool, to serve a late RESEND."""
        rank_proc = cls(job_id, rank, spool_dir(state_dir, job_id, rank), start_reported=True, ended=True)
        try:
            with open(os.path.join(rank_proc.spool, _STATUS_FILE)) as fh:
                status = json.load(fh)
            rank_proc._open_readers()
        except (OSError, ValueError):
            rank_proc.close()
            return None
        rank_proc.exit_code = status.get("exit_code")
        rank_proc.signal = status.get("signal")
        rank_proc.reason = status.get("reason")
        rank_proc.sent = {stream: rank_proc.size(stream) for stream in Stream}
        return rank_proc

    def _create_spool(self) -> dict[Stream, object]:
        """Fresh, empty output files (a re-dispatched rank starts over) and readers on them."""
        os.makedirs(self.spool, exist_ok=True)
        try:
            os.unlink(os.path.join(self.spool, _STATUS_FILE))
        except FileNotFoundError:
            pass
        outputs = {stream: open(os.path.join(self.spool, stream.value), "wb") for stream in Stream}
        self._open_readers()
        return outputs

    def _open_readers(self) -> None:
        for stream in Stream:
            self._readers[stream] = os.open(os.path.join(self.spool, stream.value), os.O_RDONLY)

    def _fail(self, reason: str) -> None:
        """End a rank that never ran; there is no process to report as started."""
        self.reason = reason
        self.start_reported = True
        self._finish()

    def _finish(self) -> None:
        self.ended = True
        try:
            with open(os.path.join(self.spool, _STATUS_FILE), "w") as fh:
                json.dump({"exit_code": self.exit_code, "signal": self.signal, "reason": self.reason}, fh)
        except OSError:
            pass  # only a late RESEND needs it, and a spool that cannot be written has no output either

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and not self.ended

    def poll(self) -> bool:
        """Reap the rank's process if it has exited (waitpid, WNOHANG); True when it just ended."""
        if not self.running:
            return False
        returncode = self.proc.poll()
        if returncode is None:
            return False
        if returncode < 0:
            self.signal = -returncode
        else:
            self.exit_code = returncode
        # Whatever the leader left behind in its group (DataLoader workers, `cmd &`) would hold GPUs.
        self._signal_group(signal.SIGKILL)
        self._finish()
        return True

    def kill(self, now: float) -> bool:
        """SIGCONT and SIGTERM to the rank's process group; SIGKILL follows after the grace period."""
        if not self.running:
            return False
        if self.kill_deadline is None:
            self.kill_deadline = now + self.kill_grace
        self._signal_group(signal.SIGCONT)    # a stopped process would never see the SIGTERM
        self._signal_group(signal.SIGTERM)
        return True

    def escalate(self, now: float) -> bool:
        """SIGKILL the group once the grace period of a KILL has run out; True when it did."""
        if not self.running or self.kill_deadline is None or now < self.kill_deadline:
            return False
        self._signal_group(signal.SIGKILL)
        self.kill_deadline = None
        return True

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.proc.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already

    def describe_end(self) -> str:
        """How the rank ended, for a log line."""
        if self.signal is not None:
            return f"killed by signal {self.signal} ({_signal_name(self.signal)})"
        if self.exit_code is not None:
            return f"exited with code {self.exit_code}"
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
        """Body of the JOB_ENDED message, with the final output sizes."""
        return {"job_id": self.job_id, "rank": self.rank, "exit_code": self.exit_code,
                "signal": self.signal, "reason": self.reason,
                "sizes": {stream.value: self.sent[stream] for stream in Stream}}

    def close(self) -> None:
        """Release the spool readers; the files stay on disk."""
        for reader in self._readers.values():
            os.close(reader)
        self._readers.clear()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "unknown signal"
