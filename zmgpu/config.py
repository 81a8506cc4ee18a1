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

from .model import has_type


class ConfigError(Exception):
    """A configuration problem, phrased as one line for the user."""


def default_state_dir() -> str:
    """``$XDG_STATE_HOME/zmgpu`` or ``~/.local/state/zmgpu``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "zmgpu")


def _bounded(default, check, expected: str):
    """A field whose value must pass ``check``; ``expected`` completes "must be ..." in the error."""
    return dataclasses.field(default=default, metadata={"check": check, "expected": expected})


def _port(default, allow_zero: bool = True):
    low = 0 if allow_zero else 1
    return _bounded(default, lambda v: low <= v <= 65535, f"a port number from {low} to 65535")


def _positive(default):
    return _bounded(default, lambda v: v > 0, "greater than 0")


def _at_least(default, low):
    return _bounded(default, lambda v: v >= low, f"at least {low}")


#: How a node treats compute processes that zmgpu did not start (see conf/node.yaml).
FOREIGN_POLICIES = ("exclusive", "threshold")


@dataclass
class MasterConfig:
    """Settings of ``zmgpu-master``."""

    host: str = "127.0.0.1"
    port: int = _port(8080)
    pub_port: typing.Optional[int] = _port(None)      # None: port + 1
    state_dir: str = dataclasses.field(default_factory=lambda: os.path.join(default_state_dir(), "master"))
    heartbeat_interval: float = _positive(1.0)
    node_timeout: float = _positive(5.0)
    node_dead_timeout: float = _positive(60.0)
    kill_grace: float = _at_least(10.0, 0)
    admins: list[str] = dataclasses.field(default_factory=list)
    default_time_limit: typing.Optional[str] = None   # Slurm format; None: no limit
    max_time_limit: typing.Optional[str] = None       # Slurm format; None: no maximum
    max_requeue: int = _at_least(3, 0)
    user_gpu_limit: typing.Optional[int] = _at_least(None, 1)   # None: no per-user cap
    finished_retention: float = _at_least(86400.0, 0)
    secret_key_file: typing.Optional[str] = None      # None: no CURVE keys (loopback, or --insecure)
    authorized_nodes: typing.Optional[str] = None     # None: authorized_nodes beside secret_key_file
    authorized_users: typing.Optional[str] = None     # None: authorized_users beside secret_key_file
    insecure: bool = False
    allow_root_jobs: bool = False
    max_message_bytes: int = _at_least(8 << 20, 1 << 20)
    max_command_bytes: int = _at_least(128 << 10, 1)
    max_env_bytes: int = _at_least(1 << 20, 0)
    max_pending_per_user: int = _at_least(10000, 1)
    verbose: bool = False


@dataclass
class NodeConfig:
    """Settings of ``zmgpu-node``."""

    node_id: typing.Optional[str] = None        # None: the host name
    master_host: str = "127.0.0.1"
    master_port: int = _port(8080, allow_zero=False)
    state_dir: str = dataclasses.field(default_factory=lambda: os.path.join(default_state_dir(), "node"))
    # None: real GPUs through NVML; a count, or the path of a YAML file describing the GPUs.
    simulate_gpus: typing.Union[int, str, None] = _bounded(
        None, lambda v: v >= 0 if isinstance(v, int) else bool(v),
        "a GPU count (0 or more) or the path of a simulated-GPU YAML file")
    foreign_policy: str = _bounded("exclusive", lambda v: v in FOREIGN_POLICIES,
                                   "one of: exclusive, threshold")
    foreign_threshold_mb: int = _at_least(1024, 0)   # for foreign_policy: threshold
    gpu_mem_reserve_mb: int = _at_least(512, 0)      # kept free on a GPU shared by --gpu-mem jobs
    spool_retention: float = _at_least(86400.0, 3600)  # seconds a reported rank's output stays on the node
    heartbeat_interval: float = _positive(1.0)
    master_timeout: float = _positive(5.0)
    secret_key_file: typing.Optional[str] = None          # None: no CURVE keys (a master without keys)
    master_public_key_file: typing.Optional[str] = None
    single_user: bool = False
    verbose: bool = False


@dataclass
class ClientConfig:
    """Settings of the ``zmgpu`` command line and :class:`zmgpu.Client`."""

    host: str = "127.0.0.1"
    port: int = _port(8080, allow_zero=False)
    pub_port: typing.Optional[int] = _port(None, allow_zero=False)   # None: ask the master
    connection_timeout: float = _positive(30.0)
    session_timeout: float = _positive(7200.0)
    max_wait_time: float = _positive(300.0)
    max_consecutive_timeouts: int = _at_least(30, 1)
    secret_key_file: typing.Optional[str] = None          # None: ~/.config/zmgpu/user.key_secret if it exists
    master_public_key_file: typing.Optional[str] = None   # None: ~/.config/zmgpu/master.key if it exists


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _check(path: str, key: str, value, hint) -> object:
    """Return ``value`` converted to ``hint`` or raise ConfigError naming file, key and type."""
    if typing.get_origin(hint) is list:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise ConfigError(f"{path}: key '{key}' must be a list of {_TYPE_NAMES[item].split(' ', 1)[1]}s, "
                              f"got {type(value).__name__} {value!r}")
        return value
    union = typing.get_origin(hint) is typing.Union
    bases = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    optional = union and type(None) in typing.get_args(hint)
    if value is None and optional:
        return None
    if float in bases and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not any(has_type(value, base) for base in bases):
        expected = " or ".join(_TYPE_NAMES[base] for base in bases) + (" or null" if optional else "")
        raise ConfigError(f"{path}: key '{key}' must be {expected}, got {type(value).__name__} {value!r}")
    return value


def load_config(cls, path: str | os.PathLike | None, overrides: dict | None = None):
    """Build ``cls`` from defaults, then the YAML file at ``path``, then non-None ``overrides``."""
    values: dict = {}
    source: dict[str, str] = {}
    if path is not None:
        values.update(read_yaml(cls, str(path)))
        source.update(dict.fromkeys(values, f"{path}: key"))
    names = {f.name for f in fields(cls)}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None and k in names}
    values.update(flags)
    source.update({k: "option --" + k.replace("_", "-") for k in flags})
    for f in fields(cls):
        check = f.metadata.get("check")
        value = values.get(f.name)
        if check is not None and value is not None and not check(value):
            where = source.get(f.name, "setting")
            raise ConfigError(f"{where} '{f.name}' must be {f.metadata['expected']}, got {value!r}"
                              if where.endswith("key") else
                              f"{where} must be {f.metadata['expected']}, got {value!r}")
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
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"ZMGPU_MASTER='{text}': expected host:port (port 1 to 65535), for example "
                          f"gpu-master:8080")
    return host.strip("[]"), int(port)
