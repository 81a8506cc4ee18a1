"""Configuration: YAML files into typed dataclasses, with errors that name file, key and type.

Every daemon and the client works with no file at all: the defaults live in the
dataclasses below (``conf/*.yaml`` documents each key).  Precedence is
command-line flag > file > default; the CLI also honours ``ZMGPU_MASTER``.
PyYAML is imported only when a file is actually read, so the CLI starts fast.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, fields
from pathlib import Path


class ConfigError(Exception):
    """A configuration problem, phrased as one line for the user."""


def default_state_dir() -> str:
    """``$XDG_STATE_HOME/zmgpu`` or ``~/.local/state/zmgpu``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "zmgpu")


@dataclass
class MasterConfig:
    """Settings of ``zmgpu-master``."""

    host: str = "127.0.0.1"
    port: int = 8080
    pub_port: typing.Optional[int] = None      # None: port + 1
    state_dir: str = dataclasses.field(default_factory=lambda: os.path.join(default_state_dir(), "master"))
    heartbeat_interval: float = 1.0
    node_timeout: float = 5.0
    kill_grace: float = 10.0
    admins: list[str] = dataclasses.field(default_factory=list)
    default_time_limit: typing.Optional[str] = None   # Slurm format; None: no limit
    max_time_limit: typing.Optional[str] = None       # Slurm format; None: no maximum
    max_requeue: int = 3
    user_gpu_limit: typing.Optional[int] = None      # None: no per-user cap
    finished_retention: float = 86400.0
    verbose: bool = False


@dataclass
class NodeConfig:
    """Settings of ``zmgpu-node``."""

    node_id: typing.Optional[str] = None        # None: the host name
    master_host: str = "127.0.0.1"
    master_port: int = 8080
    state_dir: str = dataclasses.field(default_factory=lambda: os.path.join(default_state_dir(), "node"))
    simulate_gpus: typing.Optional[int] = None  # None: real GPUs through NVML
    heartbeat_interval: float = 1.0
    master_timeout: float = 5.0
    verbose: bool = False


@dataclass
class ClientConfig:
    """Settings of the ``zmgpu`` command line and :class:`zmgpu.Client`."""

    host: str = "127.0.0.1"
    port: int = 8080
    pub_port: typing.Optional[int] = None       # None: port + 1
    connection_timeout: float = 30.0
    session_timeout: float = 7200.0
    max_wait_time: float = 300.0
    max_consecutive_timeouts: int = 30


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check(path: str, key: str, value, hint) -> object:
    """Return ``value`` converted to ``hint`` or raise ConfigError naming file, key and type."""
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise ConfigError(f"{path}: key '{key}' must be a list of {_TYPE_NAMES[item].split(' ', 1)[1]}s, "
                              f"got {type(value).__name__} {value!r}")
        return value
    optional = typing.get_origin(hint) is typing.Union
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None and optional:
        return None
    ok = isinstance(value, base) and not (isinstance(value, bool) and base is not bool)
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        expected = _TYPE_NAMES[base] + (" or null" if optional else "")
        raise ConfigError(f"{path}: key '{key}' must be {expected}, got {type(value).__name__} {value!r}")
    return value


def load_config(cls, path: str | os.PathLike | None, overrides: dict | None = None):
    """Build ``cls`` from defaults, then the YAML file at ``path``, then non-None ``overrides``."""
    values: dict = {}
    if path is not None:
        values.update(read_yaml(cls, str(path)))
    names = {f.name for f in fields(cls)}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None and k in names})
    return cls(**values)


def read_yaml(cls, path: str) -> dict:
    """Read and type-check one YAML mapping for ``cls``."""
    import yaml  # lazily: a CLI call without a config file never pays for it

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    out = {}
    for key, value in data.items():
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{path}: unknown key '{key}' (known keys: {known})")
        out[key] = _check(path, key, value, hints[key])
    return out


def parse_master_address(text: str) -> tuple[str, int]:
    """Parse ``host:port`` (as in ``ZMGPU_MASTER``)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(f"ZMGPU_MASTER='{text}': expected host:port, for example gpu-master:8080")
    return host.strip("[]"), int(port)
