"""CURVE keys and who holds them: key files, the master's lists of known keys, and its ZAP handler.

A key pair is two files that ``zmgpu keygen NAME`` writes: ``NAME.key`` (the
public key, to hand out) and ``NAME.key_secret`` (both keys, mode 0600), in
ZeroMQ's certificate format, so pyzmq's ``zmq.auth.load_certificate`` reads
them too.  They are parsed here rather than with ``zmq.auth``, which would
cost every ``zmgpu`` command a few milliseconds of imports.

The master knows nodes and users by their public keys, listed like ssh's
authorized_keys in two files: ``authorized_nodes`` (``NODE_ID KEY`` per line)
and ``authorized_users`` (``USER KEY``), with ``#`` comments.  Its ZAP handler (ZeroMQ RFC 27),
answered from the reactor's own poller, admits a CURVE handshake only for a
listed key and hands the key on as the connection's User-Id.  The reactor
looks that key up in the current :class:`KeyRing` for every message, so a key
taken off a list (SIGHUP re-reads them) stops working at once, even on a
connection that is already open, and a key listed under another name speaks
under that name from then on.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from datetime import datetime

from .config import ConfigError
from .model import NODE_ID_PATTERN, USER_NAME_PATTERN

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
#: Where ``zmgpu keygen`` writes by default and where a client looks for its keys.
CONFIG_DIR = os.path.join("~", ".config", "zmgpu")
DEFAULT_USER_SECRET = os.path.join(CONFIG_DIR, "user" + SECRET_SUFFIX)
DEFAULT_MASTER_PUBLIC = os.path.join(CONFIG_DIR, "master" + PUBLIC_SUFFIX)
AUTHORIZED_NODES = "authorized_nodes"
AUTHORIZED_USERS = "authorized_users"
#: The address libzmq sends its ZAP requests to, within the context of the socket being handshaked.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"zmgpu"
#: A refused key and address are logged once in this many seconds (a refused client reconnects every 0.1 s).
REFUSAL_LOG_INTERVAL = 60.0

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


def _z85_key(text: str, where: str) -> bytes:
    """``text`` as a Z85 public or secret key; KeyFileError naming ``where`` if it is none."""
    if not _Z85_KEY.fullmatch(text):
        raise KeyFileError(f"{where}: not a CURVE key (expected 40 Z85 characters, as zmgpu keygen writes)")
    from zmq.utils import z85

    try:
        z85.decode(text)   # a group of five characters may still overflow 32 bits
    except Exception:
        raise KeyFileError(f"{where}: not a CURVE key (it does not decode as Z85)") from None
    return text.encode()


def _read_key_file(path: str) -> dict[str, bytes]:
    """The keys a certificate file holds, by kind ("public", "secret")."""
    try:
        with open(path) as fh:
            lines = fh.read().splitlines()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise KeyFileError(f"{path}: not a key file (not text)") from None
    keys = {}
    for number, line in enumerate(lines, 1):
        match = _KEY_LINE.match(line)
        if match and not line.lstrip().startswith("#"):
            keys[match[1]] = _z85_key(match[2], f"{path}:{number}")
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
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
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


# -- who holds which key ---------------------------------------------------------------------------

class Role(str, enum.Enum):
    """What a key may act as."""

    USER = "user"
    NODE = "node"


_NAME_PATTERN = {Role.USER: re.compile(USER_NAME_PATTERN), Role.NODE: re.compile(NODE_ID_PATTERN)}


@dataclass(frozen=True)
class Principal:
    """The user or node a key belongs to."""

    role: Role
    name: str

    def __str__(self) -> str:
        return f"{self.role.value} {self.name}"


@dataclass
class KeyRing:
    """The keys the master admits (Z85 public key -> holder), read from its two lists."""

    holders: dict[bytes, Principal] = field(default_factory=dict)

    @classmethod
    def load(cls, nodes_path: str, users_path: str) -> "KeyRing":
        """Read both lists; KeyFileError names the file and line of the first bad entry."""
        ring = cls()
        for role, path in ((Role.NODE, nodes_path), (Role.USER, users_path)):
            ring._read(role, os.path.expanduser(path))
        return ring

    def _read(self, role: Role, path: str) -> None:
        try:
            with open(path) as fh:
                lines = fh.read().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or "not a text file"
            raise KeyFileError(f"{path}: cannot read the list of {role.value} keys: {why}") from None
        for number, line in enumerate(lines, 1):
            words = line.split()
            # Only whole-line comments and trailing ones after a space: '#' is also a Z85 digit.
            if not words or words[0].startswith("#"):
                continue
            where = f"{path}:{number}"
            if len(words) < 2 or (len(words) > 2 and not words[2].startswith("#")):
                raise KeyFileError(f"{where}: expected '{role.value.upper()}_NAME PUBLIC_KEY', got {line.strip()!r}")
            name, key = words[:2]
            if not _NAME_PATTERN[role].fullmatch(name):
                raise KeyFileError(f"{where}: '{name}' is not a valid {role.value} name")
            key = _z85_key(key, where)
            holder = self.holders.setdefault(key, Principal(role, name))
            if holder != Principal(role, name):
                raise KeyFileError(f"{where}: this key is already listed for {holder}")

    def __len__(self) -> int:
        return len(self.holders)

    def count(self, role: Role) -> int:
        return sum(1 for holder in self.holders.values() if holder.role is role)

    def holder(self, key: bytes | None) -> Principal | None:
        """Who holds ``key`` now; None for a key no longer listed."""
        return self.holders.get(key)


@dataclass
class ServerKeys:
    """The master's own key pair and the keys it admits (replaced as a whole on SIGHUP)."""

    pair: KeyPair
    ring: KeyRing
    nodes_path: str
    users_path: str

    @classmethod
    def load(cls, secret_key_file: str, nodes_path: str | None, users_path: str | None) -> "ServerKeys":
        """The master's keys; the lists default to files beside its secret key file."""
        directory = os.path.dirname(os.path.abspath(os.path.expanduser(secret_key_file)))
        nodes_path = nodes_path or os.path.join(directory, AUTHORIZED_NODES)
        users_path = users_path or os.path.join(directory, AUTHORIZED_USERS)
        return cls(load_key_pair(secret_key_file), KeyRing.load(nodes_path, users_path), nodes_path, users_path)

    def reload(self) -> None:
        """Read the lists again; on a bad entry the old ones stay (KeyFileError says why)."""
        self.ring = KeyRing.load(self.nodes_path, self.users_path)

    def serve(self, sock) -> None:
        """Make ``sock`` a CURVE server whose handshakes the ZAP handler decides."""
        sock.curve_server = True
        sock.curve_secretkey = self.pair.secret
        sock.curve_publickey = self.pair.public
        sock.zap_domain = ZAP_DOMAIN


class ZapHandler:
    """Answers the ZAP requests of the master's CURVE handshakes, from the reactor's poller (no thread).

    Bound before any CURVE socket, in the same context, as libzmq requires.
    """

    def __init__(self, ctx, keys: ServerKeys, log: logging.Logger):
        import zmq

        self.keys = keys
        self.log = log
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.refusals: dict[tuple[bytes, bytes], float] = {}   # (address, key) -> last logged (monotonic)

    def answer(self) -> None:
        """Answer every waiting request: 200 with the key as User-Id for a listed key, 400 otherwise."""
        import zmq

        while True:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            # [peer, b"", version, request id, domain, address, identity, mechanism, *credentials]
            if len(frames) < 8 or frames[1] != b"":
                continue    # not a ZAP request: nothing to answer
            peer, version, request_id, address, mechanism = frames[0], frames[2], frames[3], frames[5], frames[7]
            key, why = self._key(version, mechanism, frames[8:])
            if why is None:
                reply = [b"200", b"OK", key]
            else:
                self._log_refusal(address, key, why)
                reply = [b"400", why.encode(), b""]
            self.sock.send_multipart([peer, b"", b"1.0", request_id, *reply, b""])

    def _key(self, version: bytes, mechanism: bytes, credentials: list[bytes]) -> tuple[bytes, str | None]:
        """The client's Z85 public key, and why it is refused (None: admitted)."""
        if version != b"1.0" or mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            return b"", f"not a CURVE handshake ({mechanism.decode(errors='replace')})"
        from zmq.utils import z85

        key = z85.encode(credentials[0])
        if self.keys.ring.holder(key) is None:
            return key, "unknown key"
        return key, None

    def _log_refusal(self, address: bytes, key: bytes, why: str) -> None:
        now = time.monotonic()
        if now - self.refusals.get((address, key), -REFUSAL_LOG_INTERVAL) < REFUSAL_LOG_INTERVAL:
            return
        if len(self.refusals) > 1000:
            self.refusals.clear()   # a scan from many addresses must not grow this without end
        self.refusals[(address, key)] = now
        self.log.warning("refused a connection from %s: %s %s (not in %s or %s)", address.decode(errors="replace"),
                         why, key.decode(errors="replace"), self.keys.nodes_path, self.keys.users_path)

    def close(self) -> None:
        self.sock.close(0)


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
