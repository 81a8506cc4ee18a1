"""The master's output spool: one append-only file per (job, rank, stream), written by offset.

Node agents send output with the byte offset it starts at.  Appending is
idempotent: bytes the spool already has are skipped, so a chunk sent twice
(after a reconnect) never duplicates output, and a chunk that starts past the
end reveals a gap that the reactor asks the node to fill.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..protocol import Stream

Key = tuple[str, int, str]   # (job id, rank, stream)
STREAMS = tuple(s.value for s in Stream)


@dataclass(frozen=True)
class Appended:
    """Result of :meth:`OutputSpool.append`: new bytes and where they start, or a gap."""

    offset: int          # where ``data`` starts in the stream
    data: bytes          # bytes newly added (empty if nothing new)
    gap: bool = False    # the chunk started past the end; nothing was written


class OutputSpool:
    """Job output on the master's disk under ``<state_dir>/output``."""

    def __init__(self, state_dir: str):
        self.root = os.path.join(state_dir, "output")
        os.makedirs(self.root, exist_ok=True)
        self.sizes: dict[Key, int] = {}

    def _path(self, key: Key) -> str:
        job_id, rank, stream = key
        return os.path.join(self.root, f"{job_id}.{rank}.{stream}")

    def size(self, key: Key) -> int:
        """Bytes held for ``key``; learned from the file the first time (a restarted master)."""
        size = self.sizes.get(key)
        if size is None:
            try:
                size = os.path.getsize(self._path(key))
            except FileNotFoundError:
                size = 0
            self.sizes[key] = size
        return size

    def starts_empty(self, job_id: str, ranks: int) -> None:
        """A job starts: this attempt has no output yet (an earlier one's is set aside), so its sizes need no
        look at the disk."""
        for key in self._keys(job_id, ranks):
            self.sizes[key] = 0

    def append(self, key: Key, offset: int, data: bytes) -> Appended:
        """Add the part of ``data`` (starting at ``offset``) that the spool lacks."""
        end = self.size(key)
        if offset > end:
            return Appended(end, b"", gap=True)
        new = data[end - offset:]
        if new:
            with open(self._path(key), "ab") as fh:
                fh.write(new)
            self.sizes[key] = end + len(new)
        return Appended(end, new)

    def read(self, key: Key, offset: int, limit: int) -> bytes:
        """Up to ``limit`` bytes from ``offset`` (empty past the end)."""
        if offset >= self.size(key):
            return b""
        with open(self._path(key), "rb") as fh:
            fh.seek(offset)
            return fh.read(limit)

    def _keys(self, job_id: str, ranks: int) -> list[Key]:
        return [(job_id, rank, stream) for rank in range(ranks) for stream in STREAMS]

    def set_aside(self, job_id: str, ranks: int, attempt: int) -> None:
        """Keep a requeued job's earlier output as ``*.attemptN`` files; the new attempt starts at 0."""
        for key in self._keys(job_id, ranks):
            if self.size(key):
                os.replace(self._path(key), f"{self._path(key)}.attempt{attempt}")
            self.sizes.pop(key, None)

    def discard(self, job_ids: set[str]) -> None:
        """Delete forgotten jobs' output, set-aside attempts too, in one pass over the spool directory."""
        if not job_ids:
            return
        for key in [k for k in self.sizes if k[0] in job_ids]:
            del self.sizes[key]
        with os.scandir(self.root) as entries:
            for entry in entries:
                if entry.name.split(".", 1)[0] in job_ids:
                    try:
                        os.unlink(entry.path)
                    except FileNotFoundError:
                        pass
