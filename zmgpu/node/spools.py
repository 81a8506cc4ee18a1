"""The node's spools as a whole: what a restarted agent takes over, reports, and removes.

Each rank's spool (see runner.py) outlives the rank: a restarted agent takes
over the ranks its predecessor left unreported, a REGISTER lists the ranks that
ended lately (for a master that missed their JOB_ENDED), and spools reported
long ago are removed so that the node's disk does not fill.  The agent lists the
jobs directory once, when it starts, and keeps a :class:`SpoolIndex` from then on.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import time

from ..protocol import Stream
from .keeper_link import STATUS_FILE, spool_file
from .runner import (SPOOL_PARTS, RankKey, RankProcess, file_size, jobs_dir_names, load_status, remove_file,
                     spool_keys, unreported)


class SpoolIndex:
    """The rank spools on this node's disk, by rank key, each with when its rank's end went to the master
    (epoch seconds; None: not yet, as far as this agent knows).

    Read from the jobs directory once, when the agent starts, and kept since by the agent as it dispatches,
    reports and prunes, so that a REGISTER, a prune or a RESEND lists no directory: with 50,000 spools (a
    day of short ranks) each listing held up the agent's loop for 0.3-0.6 s.
    """

    def __init__(self, state_dir: str, reported: dict[RankKey, float | None] | None = None):
        self.state_dir = state_dir
        self.reported = reported if reported is not None else {}
        # (job id, rank) -> the attempts spooled, so that a RESEND finds the newest without reading every spool
        # (1.6 ms at 50,000 spools, and a node that registers again gets two RESENDs per running rank).
        self._attempts: dict[tuple[str, int], set[int]] = {}
        for key in self.reported:
            self._attempts.setdefault((key.job_id, key.rank), set()).add(key.attempt)

    @classmethod
    def read(cls, state_dir: str, keys: list[RankKey] | None = None) -> "SpoolIndex":
        """The index of what lies in ``state_dir`` (``keys``: its listing, when already made).  A spool with an
        exit status counts as reported when the status was written: one still unreported is the agent's to
        report, and reporting it sets the time anew."""
        reported: dict[RankKey, float | None] = {}
        for key in spool_keys(state_dir) if keys is None else keys:
            try:
                reported[key] = os.stat(spool_file(key.spool(state_dir), STATUS_FILE)).st_mtime
            except OSError:
                reported[key] = None
        return cls(state_dir, reported)

    def add(self, key: RankKey) -> bool:
        """A rank dispatched here; False when its spool was already here (an earlier dispatch of it)."""
        fresh = key not in self.reported
        self.reported[key] = None
        self._attempts.setdefault((key.job_id, key.rank), set()).add(key.attempt)
        return fresh

    def mark_reported(self, key: RankKey, when: float) -> None:
        """The rank's end went to the master at ``when`` (epoch seconds).  A rank without a spool (refused
        before it started) stays out: it has no output to resend, and no files to remove."""
        if key in self.reported:
            self.reported[key] = when

    def attempts(self, job_id: str, rank: int) -> list[int]:
        """The attempts of a job's rank spooled here."""
        return sorted(self._attempts.get((job_id, rank), ()))

    def recent_ends(self, since: float, skip) -> list[dict]:
        """How the ranks reported after ``since`` (epoch seconds) ended, as REGISTER "jobs" entries.

        A master that missed a JOB_ENDED (it restarted, or the link dropped it) settles
        the rank from these; ranks in ``skip`` (the agent still holds them) are left out.
        """
        entries = []
        for key, when in self.reported.items():
            if when is None or when < since or key in skip:
                continue
            spool = key.spool(self.state_dir)
            try:
                status = load_status(spool)
            except (OSError, ValueError):
                continue
            sizes = {stream.value: file_size(spool_file(spool, stream.value)) for stream in Stream}
            entries.append({**key.wire(), "ended": True, **status, "sizes": sizes})
        return entries

    def prune(self, before: float, keep) -> list[RankKey]:
        """Remove the spools of ranks reported before ``before`` (epoch seconds); the keys of those that went.

        A spool still holding a spawn record is a rank the master has not heard end, and
        ranks in ``keep`` are the agent's own: both stay, whatever their age.  The master
        keeps its own copy of the output, so an old spool only fills the node's disk.
        """
        removed = []
        for key, when in list(self.reported.items()):
            if when is None or when >= before or key in keep:
                continue
            spool = key.spool(self.state_dir)
            if unreported(spool):
                continue
            try:
                # The status goes last: a spool left half removed is still found, and removed, next round.
                for part in sorted(SPOOL_PARTS, key=lambda part: part == STATUS_FILE):
                    remove_file(spool_file(spool, part))
            except OSError:
                continue    # left for the next round
            del self.reported[key]
            attempts = self._attempts[(key.job_id, key.rank)]
            attempts.discard(key.attempt)
            if not attempts:
                del self._attempts[(key.job_id, key.rank)]
            removed.append(key)
        return removed


def adopt_leftovers(state_dir: str, kept: dict[str, int],
                    log: logging.Logger) -> tuple[dict[RankKey, RankProcess], SpoolIndex]:
    """The ranks a previous agent started and did not report ended, taken over so that REGISTER reports them;
    and the index of every spool found (from the same listing of the jobs directory).

    ``kept`` is what the keeper runs (spool name -> pid).
    """
    names = jobs_dir_names(state_dir)
    if _flatten_older(state_dir, names, kept, log):
        names = jobs_dir_names(state_dir)    # once, after an upgrade: the moved files have new names
    ranks = {}
    keys = spool_keys(state_dir, names)
    for key in keys:
        try:
            rank_proc = RankProcess.adopt(state_dir, key, kept)
        except ValueError as exc:
            log.warning("%s: cannot take it over: %s", key, exc)
            continue
        if rank_proc is None:
            continue
        ranks[key] = rank_proc
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rank_proc.spawned.spawned_at))
        if rank_proc.ended:
            log.info("%s (started %s) %s", key, started, rank_proc.describe_end())
        else:
            log.info("%s: taken over from the previous node agent (pid %d, started %s%s)", key,
                     rank_proc.pid, started, "" if rank_proc.kept else "; its exit status will be unknown")
    return ranks, SpoolIndex.read(state_dir, keys)


def _real_directory(path: str) -> bool:
    """A directory, not a link to one (a link's target is not this node's to move or remove)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _flatten_older(state_dir: str, names: list[str], kept: dict[str, int], log: logging.Logger) -> bool:
    """Move the spools of an older zmgpu (a directory per rank) to today's names, so that they are taken
    over, reported and pruned like the others; whether there were any among ``names`` (the jobs directory's).
    A rank still running writes on: its files keep their inodes.

    The directory of a rank in ``kept`` stays, empty: the older keeper running it writes its status
    there when it ends, and the next start moves that too.
    """
    # Such a directory has a spool's name (two dots), its files one part more: only those names are parsed
    # (a tenth of the time of parsing each of 200,000 names), and no file is looked at.
    older = [name for name in names if name.count(".") == 2 and RankKey.parse(name)
             and _real_directory(os.path.join(state_dir, "jobs", name))]
    for name in older:
        spool = os.path.join(state_dir, "jobs", name)
        try:
            moved = [part for part in SPOOL_PARTS if os.path.exists(os.path.join(spool, part))]
            for part in moved:
                os.replace(os.path.join(spool, part), spool_file(spool, part))
            if name not in kept:
                shutil.rmtree(spool)
        except OSError as exc:
            log.warning("%s: cannot move the spool of an older zmgpu: %s", spool, exc.strerror or exc)
            continue
        if moved:
            log.info("%s: spool of an older zmgpu moved beside the others", name)
    return bool(older)
