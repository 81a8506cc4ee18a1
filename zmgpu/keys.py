"""CURVE key files: what ``zmgpu keygen`` writes and what node agents and clients load.

A key pair is two files that ``zmgpu keygen NAME`` writes: ``NAME.key`` (the
public key, to hand out) and ``NAME.key_secret`` (both keys, mode 0600), in
ZeroMQ's certificate format, so pyzmq's ``zmq.auth.load_certificate`` reads
them too.  They are parsed here rather than with ``zmq.auth``, which would
cost every ``zmgpu`` command a few milliseconds of imports; for the same
reason this module holds only what a client needs (the master's side is
zmgpu.auth).
"""

from __future__ import annotations

import os
import re
import stat
import time
from dataclasses import dataclass

from .config import ConfigError

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
#: Where ``zmgpu keygen`` writes by default and where a client looks for its keys.
CONFIG_DIR = os.path.join("~", ".config", "zmgpu")
DEFAULT_USER_SECRET = os.path.join(CONFIG_DIR, "user" + SECRET_SUFFIX)
DEFAULT_MASTER_PUBLIC = os.path.join(CONFIG_DIR, "master" + PUBLIC_SUFFIX)

_KEY_LINE = re.compile(r'\s*(public|secret)-key\s*=\s*"?([^"\s]*)"?\s*$')
_Z85_KEY = re.compile(r"[0-9a-zA-Z.:+=^!/*?&<>()\[\]{}@%$#-]{40}")
_KEY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


class KeyFileError(ConfigError):
    """A key file or a list of keys that cannot be used; the message names the file (and line)."""


@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, both halves in Z85 text (40 characters each)."""

    public: bytes
    secret: bytes


def z85_key(text: str, where: str) -> bytes:
    """``text`` as a Z85 public or secret key; KeyFileError naming ``where`` if it is none."""
    if not _Z85_KEY.fullmatch(text):
        raise KeyFileError(f"{where}: not a CURVE key (expected 40 Z85 characters, as zmgpu keygen writes)")
    from zmq.utils import z85

    try:
        z85.decode(text)   # a group of five characters may still overflow 32 bits
    except Exception:
        raise KeyFileError(f"{where}: not a CURVE key (it does not decode as Z85)") from None
    return text.encode()


def read_lines(path: str, what: str) -> list[str]:
    """The lines of a text file of keys; KeyFileError, naming the file and ``what`` it should be, if unread."""
    try:
        with open(path) as fh:
            return fh.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or "not a text file"
        raise KeyFileError(f"{path}: cannot read {what}: {why}") from None


def _read_key_file(path: str) -> dict[str, bytes]:
    """The keys a certificate file holds, by kind ("public", "secret")."""
    keys = {}
    for number, line in enumerate(read_lines(path, "key file"), 1):
        match = _KEY_LINE.match(line)     # a comment line never matches
        if match:
            keys[match[1]] = z85_key(match[2], f"{path}:{number}")
    if "public" not in keys:
        raise KeyFileError(f"{path}: no public-key line: not a key file written by zmgpu keygen")
    return keys


def load_public_key(path: str) -> bytes:
    """The public key in a ``.key`` (or ``.key_secret``) file."""
    return _read_key_file(os.path.expanduser(path))["public"]


def load_key_pair(path: str) -> KeyPair:
    """Both keys of a ``.key_secret`` file, which only its owner may read."""
    path = os.path.expanduser(path)
    keys = _read_key_file(path)
    if "secret" not in keys:
        raise KeyFileError(f"{path}: holds no secret key: name the {SECRET_SUFFIX} file, not the public one")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        raise KeyFileError(f"{path}: secret key file is readable by other users (mode {mode:04o}): "
                           f"chmod 600 {path}")
    return KeyPair(keys["public"], keys["secret"])


def write_key_pair(directory: str, name: str, force: bool = False) -> tuple[str, str]:
    """Write ``NAME.key`` and ``NAME.key_secret`` (mode 0600) in ``directory``; their paths.

    An existing file is replaced only with ``force``.  The secret file is created
    with its final mode, so the secret is never readable by others, not even for
    a moment.
    """
    import zmq

    if not _KEY_NAME.fullmatch(name):
        raise KeyFileError(f"'{name}' cannot name a key: use letters, digits, '.', '_' and '-'")
    directory = os.path.expanduser(directory)
    public_path = os.path.join(directory, name + PUBLIC_SUFFIX)
    secret_path = os.path.join(directory, name + SECRET_SUFFIX)
    for path in (public_path, secret_path):
        if os.path.lexists(path) and not force:
            raise KeyFileError(f"{path} exists: keep it, or pass --force to replace it")
    public, secret = (key.decode() for key in zmq.curve_keypair())
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _write_new(secret_path, 0o600, f"#   zmgpu CURVE secret key of {name}, generated {stamp}\n"
                                       f"#   Never give this file away nor loosen its mode.\n\nmetadata\ncurve\n"
                                       f'    public-key = "{public}"\n    secret-key = "{secret}"\n')
        _write_new(public_path, 0o644, f"#   zmgpu CURVE public key of {name}, generated {stamp}\n"
                                       f"#   Hand it to the master's admin (or, for the master, to nodes and users).\n"
                                       f'\nmetadata\ncurve\n    public-key = "{public}"\n')
    except OSError as exc:
        raise KeyFileError(f"{exc.filename or directory}: cannot write key file: {exc.strerror or exc}") from None
    return public_path, secret_path


def _write_new(path: str, mode: int, text: str) -> None:
    """Replace ``path`` by a new file of ``mode`` (no earlier file's mode or owner is kept)."""
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, mode)   # the umask may have taken bits away from the public file
        fh.write(text)


# -- the client end (node agents and users) --------------------------------------------------------

@dataclass(frozen=True)
class CurveClient:
    """What a node agent or a user needs to reach a master with keys: its own pair and the master's key."""

    pair: KeyPair
    server_key: bytes

    @classmethod
    def load(cls, secret_key_file: str | None, master_public_key_file: str | None,
             defaults: bool = False) -> "CurveClient | None":
        """The keys named (or, with ``defaults``, found at the default paths); None when there are none.

        One of the two without the other is a KeyFileError: it says which is missing.
        """
        if defaults:
            secret_key_file = secret_key_file or _if_exists(DEFAULT_USER_SECRET)
            master_public_key_file = master_public_key_file or _if_exists(DEFAULT_MASTER_PUBLIC)
        if secret_key_file is None and master_public_key_file is None:
            return None
        if master_public_key_file is None:
            where = f", or the file {DEFAULT_MASTER_PUBLIC}" if defaults else ""
            raise KeyFileError(f"{secret_key_file}: a secret key needs the master's public key too "
                               f"(master_public_key_file{where})")
        if secret_key_file is None:
            where = f", or the file {DEFAULT_USER_SECRET}" if defaults else ""
            raise KeyFileError(f"{master_public_key_file}: the master's public key needs a secret key of your "
                               f"own too (secret_key_file{where}; see zmgpu keygen)")
        return cls(load_key_pair(secret_key_file), load_public_key(master_public_key_file))

    def apply(self, sock) -> None:
        """Make ``sock`` a CURVE client of the master (before it connects)."""
        sock.curve_serverkey = self.server_key
        sock.curve_publickey = self.pair.public
        sock.curve_secretkey = self.pair.secret


def _if_exists(path: str) -> str | None:
    return path if os.path.exists(os.path.expanduser(path)) else None
