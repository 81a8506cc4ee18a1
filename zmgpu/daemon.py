"""Pieces both daemons share: logging set-up, signals as a pollable fd, port files, config loading."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import signal
import sys

from .config import ConfigError, load_config


def setup_logging(name: str, verbose: bool) -> logging.Logger:
    """Log lines a person can read, to stderr (journald adds its own timestamps)."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
    )
    return logging.getLogger(name)


class SignalPipe:
    """Signals delivered as bytes on a pipe, so a zmq.Poller loop wakes at once.

    Python runs the real handler between bytecodes; the wakeup fd makes the
    poll return, and :meth:`drain` tells the loop which signals arrived.
    """

    def __init__(self, signums):
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        for signum in signums:
            # The handler itself does nothing: the byte on the wakeup fd is the message.
            signal.signal(signum, lambda *_: None)

    def fileno(self) -> int:
        return self._r

    def drain(self) -> set[int]:
        """The signals received since the last call."""
        got: set[int] = set()
        while True:
            try:
                data = os.read(self._r, 4096)
            except BlockingIOError:
                return got
            if not data:
                return got
            got.update(data)

    def close(self) -> None:
        signal.set_wakeup_fd(-1)
        os.close(self._r)
        os.close(self._w)


def atomic_write(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader (or a crash) never sees half of it; raises OSError."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def write_whole(path: str, text: str) -> None:
    """Create or empty ``path`` and write ``text`` in one write(2); raises OSError.

    Cheaper than :func:`atomic_write` (one file created, not two, and no rename), for
    files whose readers take an empty or unparsable one for none: a reader (or a
    process killed meanwhile) may see the file empty, and a system crash may leave
    it torn.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        data = memoryview(text.encode())
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def write_port_file(path: str, **ports: int) -> None:
    """Write the bound ports as JSON, for supervisors and tests using port 0."""
    atomic_write(path, json.dumps({**ports, "pid": os.getpid()}))


def load_or_exit(cls, args, prog: str):
    """Merge ``args.config`` with the parsed flags into ``cls``; exit 2 on a config error."""
    try:
        return load_config(cls, args.config, vars(args))
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


class StateDirBusy(Exception):
    """Another live daemon holds the state directory's lock."""


def lock_state_dir(state_dir: str, name: str = "lock"):
    """Hold an exclusive lock on ``<state_dir>/<name>`` for the life of the process (the file object is the
    lock); StateDirBusy if a live process holds it.

    The kernel drops the lock when the process dies, even by ``kill -9``, so a
    stale lock file never blocks a restart.
    """
    fh = open(os.path.join(state_dir, name), "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        fh.seek(0)
        holder = fh.read().strip()
        fh.close()
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            raise StateDirBusy(f"pid {holder}" if holder else "another process") from None
        raise
    fh.seek(0)
    fh.truncate()
    fh.write(str(os.getpid()))
    fh.flush()
    return fh


def describe_state_dir_error(state_dir: str, exc: Exception) -> str:
    """One line for a state directory that cannot be created, written or locked."""
    if isinstance(exc, StateDirBusy):
        return f"state directory {state_dir} is in use by {exc} (one daemon per state directory)"
    return f"cannot use state directory {state_dir}: {getattr(exc, 'strerror', None) or exc}"


def module_env(**extra: str) -> dict:
    """This process's environment (with ``extra``), in which ``python -m zmgpu...`` runs this very zmgpu
    code, installed or not, for the daemons and helpers zmgpu starts itself."""
    env = dict(os.environ, **extra)
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return env
