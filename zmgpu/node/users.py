"""Whose account a job rank runs under on this node, and how it is started there.

The master says who submitted a job (with keys, the user its key belongs to)
and whether this cluster lets jobs run as root.  The node decides the account,
from its own user database:

- An agent running as root starts each job as its submitter: uid, gid and
  supplementary groups as ``pwd``, ``grp`` and ``getgrouplist`` give them here.
  A user this node does not know ends the job FAILED with that reason.
- An agent running as an ordinary user can only run jobs as itself: it runs its
  own user's jobs and refuses other users' ones.
- ``single_user: true`` in the node's YAML makes the agent run every job as its
  own user, whoever submitted it (a personal machine; the test suite).

Whatever the rule picks, uid 0 only when the master allows root jobs.

A rank started as another user enters its working directory as that user, not
as root, so a directory root may not enter (an NFS home mounted with
root_squash) still works, and one the user may not enter fails with a clear
reason.
"""

from __future__ import annotations

import functools
import os
import pwd
import signal
import stat
import subprocess
from dataclasses import dataclass
from typing import Optional, Union

from ..model import is_count
from ..protocol import Stream
from .keeper_link import spool_file


@dataclass(frozen=True)
class Account:
    """A user a job rank is started as, as this node's user database knows them."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...]

    @classmethod
    def of(cls, entry: pwd.struct_passwd) -> "Account":
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid,
                   tuple(os.getgrouplist(entry.pw_name, entry.pw_gid)))

    def wire(self) -> dict:
        """As the agent tells its job keeper."""
        return {"name": self.name, "uid": self.uid, "gid": self.gid, "groups": list(self.groups)}

    @classmethod
    def from_wire(cls, data) -> "Account | None":
        """An account from :meth:`wire` (None: none given); ValueError for anything else."""
        if data is None:
            return None
        try:
            account = cls(data["name"], data["uid"], data["gid"], tuple(data["groups"]))
        except (KeyError, TypeError):
            raise ValueError(f"not an account: {data!r}") from None
        ids = (account.uid, account.gid, *account.groups)
        if not isinstance(account.name, str) or not all(is_count(i) for i in ids):
            raise ValueError(f"not an account: {data!r}")
        return account


@dataclass(frozen=True)
class Refusal:
    """Why a rank may not run here: it ends FAILED with this reason, never started."""

    reason: str


#: What a dispatch runs as: another account, this agent's own (None), or nothing at all.
RunAs = Optional[Union[Account, Refusal]]


@dataclass(frozen=True)
class UserPolicy:
    """This node's rule for whose account a job runs under."""

    node_id: str
    single_user: bool
    uid: int           # the agent's own (effective) uid
    name: str          # and its user name

    @classmethod
    def here(cls, node_id: str, single_user: bool) -> "UserPolicy":
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)     # a bare container without an entry for us
        return cls(node_id, single_user, uid, name)

    def describe(self) -> str:
        """One line for the log: whose jobs run here, and as whom."""
        if self.single_user:
            return f"every job runs as {self.name}, this agent's user, whoever submitted it (single_user)"
        if self.uid == 0:
            return "jobs run as the users who submitted them (accounts from this node's user database)"
        return f"jobs run as {self.name}, this agent's user; other users' jobs are refused (see single_user)"

    def run_as(self, user, allow_root: bool) -> RunAs:
        """The account for a job of ``user``, None for this agent's own, or a Refusal."""
        if self.single_user or self.uid != 0:
            if not self.single_user and user != self.name:
                return Refusal(f"node {self.node_id} runs jobs only for {self.name} (its agent is not root), "
                               f"not for {user}")
            return self._root_check(self.uid, self.name, allow_root) or None
        if not isinstance(user, str) or not user:
            return Refusal("the master did not say whose job this is")
        try:
            account = Account.of(pwd.getpwnam(user))
        except KeyError:
            return Refusal(f"user {user} is unknown on node {self.node_id}")
        return self._root_check(account.uid, user, allow_root) or account

    def _root_check(self, uid: int, name: str, allow_root: bool) -> Refusal | None:
        if uid == 0 and not allow_root:
            return Refusal(f"the job would run as root ({name}) on node {self.node_id}, and this cluster does "
                           f"not allow root jobs (allow_root_jobs in the master's YAML)")
        return None


#: What :func:`start_rank` raises for a start that failed (ValueError, TypeError: an environment the kernel
#: cannot take, NUL or '=' in a name; SubprocessError: the working directory could not be entered).
START_ERRORS = (OSError, ValueError, TypeError, subprocess.SubprocessError)

#: Signals Python ignores for itself, which an exec'd program would inherit ignored (Popen restores them too).
_DEFAULT_IN_JOBS = (signal.SIGPIPE, signal.SIGXFSZ)


class SpawnedRank:
    """A rank the keeper started with posix_spawn: what the keeper keeps of a Popen (its own waitpid(-1)
    reaps every child and sets ``returncode``)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None


Started = Union[subprocess.Popen, SpawnedRank]


def start_rank(spool: str, command: str, env: dict, account: Account | None, cwd: str,
               devnull: int | None = None) -> Started:
    """Start a rank: ``/bin/sh -c COMMAND`` in a session of its own, as ``account`` (None: as this process),
    its stdout and stderr going to the spool's files, emptied first (a re-dispatched rank starts over).

    The one way ranks start, by the keeper or (without one) by the agent itself.  A caller whose
    every descriptor but 0, 1 and 2 is close-on-exec (the keeper, started with close_fds and opening
    nothing inheritable) passes its own open /dev/null as ``devnull``, and starts its own user's
    ranks with posix_spawn, about half the CPU of a Popen (no error pipe, no sweep of descriptors);
    it enters the working directory around the spawn, so it must have no other thread using
    relative paths.  Otherwise, and for another user's rank (its uid, gid and groups), Popen.
    """
    outputs = []
    try:
        for stream in Stream:
            outputs.append(_create_output(spool_file(spool, stream.value)))
        argv = ["/bin/sh", "-c", command]
        if account is not None or devnull is None:
            return subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL if devnull is None else devnull,
                                    stdout=outputs[0], stderr=outputs[1], start_new_session=True, close_fds=True,
                                    **popen_options(account, cwd))
        return SpawnedRank(_spawn_in(cwd, argv, env, [devnull, *outputs]))
    finally:
        for fd in outputs:
            os.close(fd)


def _create_output(path: str) -> int:
    """One of a rank's output files, created empty; its directory too if it went missing (the agent makes it at
    start: looking for it at every rank would lock its parent for nothing)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        return os.open(path, flags, 0o644)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return os.open(path, flags, 0o644)


def _spawn_in(cwd: str, argv: list[str], env: dict, stdio: list[int]) -> int:
    """posix_spawn ``argv`` in ``cwd`` with ``stdio`` as its fds 0, 1 and 2, in a new session; its pid.

    The dup2s run in order, so none of ``stdio`` may itself be 0, 1 or 2 (the keeper's never are: its own
    0, 1 and 2 are open).
    """
    here = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.chdir(cwd)
        return os.posix_spawn(argv[0], argv, env, setsid=True, setsigdef=_DEFAULT_IN_JOBS, setsigmask=(),
                              file_actions=[(os.POSIX_SPAWN_DUP2, fd, target) for target, fd in enumerate(stdio)])
    finally:
        os.fchdir(here)
        os.close(here)


def popen_options(account: Account | None, cwd: str) -> dict:
    """Popen keywords that start a rank in ``cwd``, as ``account`` when given (else as this process)."""
    if account is None:
        return {"cwd": cwd}
    # Entered after the switch (preexec runs after setuid; Popen's cwd= would be entered as root).
    return {"user": account.uid, "group": account.gid, "extra_groups": list(account.groups),
            "preexec_fn": functools.partial(os.chdir, cwd)}


def start_error(exc: Exception, account: Account | None, cwd: str) -> str:
    """Why a rank did not start, from what Popen raised."""
    if isinstance(exc, subprocess.SubprocessError) and account is not None:
        return f"user {account.name} cannot enter the working directory {cwd}"
    if isinstance(exc, OSError) and exc.strerror:
        # The path says which: the working directory, an output file of the spool, or the shell.
        return f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return str(exc)


def missing_directory(cwd: str) -> bool:
    """True when ``cwd`` is surely no directory here (one this process may not look into may still be one)."""
    try:
        return not stat.S_ISDIR(os.stat(cwd).st_mode)
    except PermissionError:
        return False    # root-squashed NFS, say: the job's user may still enter it
    except OSError:
        return True
