"""Who holds which CURVE key, on the master: its lists of known keys, and its ZAP handler.

(Key files themselves, which node agents and clients load too, are zmgpu.keys.)

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
import time
from dataclasses import dataclass, field

from .keys import KeyFileError, KeyPair, load_key_pair, read_lines, z85_key
from .model import NODE_ID_PATTERN, USER_NAME_PATTERN

AUTHORIZED_NODES = "authorized_nodes"
AUTHORIZED_USERS = "authorized_users"
#: The address libzmq sends its ZAP requests to, within the context of the socket being handshaked.
ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"zmgpu"
#: A refused key and address are logged once in this many seconds (a refused client reconnects every 0.1 s).
REFUSAL_LOG_INTERVAL = 60.0


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
        for number, line in enumerate(read_lines(path, f"the list of {role.value} keys"), 1):
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
            key = z85_key(key, where)
            holder = self.holders.setdefault(key, Principal(role, name))
            if holder != Principal(role, name):
                raise KeyFileError(f"{where}: this key is already listed for {holder}")

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
