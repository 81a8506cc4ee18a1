"""Wire protocol shared by the master, the node agents and the clients.

Every message is a ZeroMQ multipart message laid out as::

    [routing id]  b"ZMGPU1"  TYPE  JSON-body  *payload

The routing id frame exists only on the master's ROUTER side (ZeroMQ adds and
strips it).  TYPE is the ASCII name of a :class:`MsgType`.  The JSON body is
always an object.  Payload frames carry raw bytes (job output) and never go
through JSON.  On the PUB socket a topic frame comes first::

    b"job.<ID>.output" | b"job.<ID>.state" | b"ended.<ID>.state" | b"node.<ID>.state",  b"ZMGPU1", TYPE, ...

so a client subscribes to ``job.<ID>.`` and gets both the job's output and its
state changes.  A job's final state also goes out under ``ended.<ID>.state``: a
watcher of many jobs subscribes to ``ended.`` and hears each job once, at its
end, instead of each of its changes.

Each message type declares the body fields it requires and their types in
:data:`REQUIRED`; :func:`decode` checks them once so handlers can trust the
body.  Client requests carry ``user`` (who asks) and ``req`` (an integer the
reply echoes, so a client can drop a late reply to an earlier request).
Replies are ``REPLY`` messages whose body is ``{"ok": true, "req": N, ...}`` or
``{"ok": false, "req": N, "error": CODE, "message": "human sentence"}``.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

from .model import has_type

MAGIC = b"ZMGPU1"
PROTOCOL_VERSION = 1

#: Largest output chunk a node sends in one OUTPUT message and the master
#: returns in one FETCH reply; big enough for throughput, small enough that a
#: PUB queue of SNDHWM chunks stays bounded.
CHUNK_BYTES = 256 * 1024


class MsgType(enum.Enum):
    """Every message type on the wire; the value is the TYPE frame."""

    # client -> master (each answered by one REPLY)
    PING = b"PING"            # liveness / version check
    SUBMIT = b"SUBMIT"        # new job; reply carries job_id
    QUEUE = b"QUEUE"          # jobs and nodes as dicts
    JOB = b"JOB"              # one job as a dict
    CANCEL = b"CANCEL"        # cancel job ids; reply has one result per id
    FETCH = b"FETCH"          # output bytes of (job, rank, stream) from an offset
    NODES = b"NODES"          # nodes as dicts
    DRAIN = b"DRAIN"          # admin: no new jobs on a node; running ones finish
    RESUME = b"RESUME"        # admin: undo a drain
    REPLY = b"REPLY"          # master -> client answer to any request above

    # node -> master
    REGISTER = b"REGISTER"        # node id, host, address, GPUs, jobs it holds
    HEARTBEAT = b"HEARTBEAT"      # also sent master -> node
    JOB_STARTED = b"JOB_STARTED"  # process spawned (pid)
    OUTPUT = b"OUTPUT"            # output chunk at a byte offset (+1 payload frame)
    JOB_ENDED = b"JOB_ENDED"      # exit status and final output sizes (with the pid if it ended first)

    # master -> node
    REGISTERED = b"REGISTERED"    # registration accepted
    REREGISTER = b"REREGISTER"    # master does not know this node: register again
    DISPATCH = b"DISPATCH"        # run one rank of a job
    KILL = b"KILL"                # stop every rank of a job on this node
    RESEND = b"RESEND"            # master's spool has a gap: resend from offset
    REFUSED = b"REFUSED"          # registration refused (node id in use by another live agent)

    # master -> PUB subscribers (OUTPUT above is also published)
    JOB_STATE = b"JOB_STATE"      # a job's dict after a state change
    NODE_STATE = b"NODE_STATE"    # a node's dict after a state change


class ErrorCode(str, enum.Enum):
    """Error codes carried in failed replies (``"error"`` field)."""

    BAD_FRAME = "BAD_FRAME"          # wrong number of frames / wrong magic
    UNKNOWN_TYPE = "UNKNOWN_TYPE"    # TYPE is not a MsgType
    BAD_JSON = "BAD_JSON"            # body is not a JSON object
    BAD_REQUEST = "BAD_REQUEST"      # missing field or wrong field type
    UNKNOWN_JOB = "UNKNOWN_JOB"      # no job with that id
    UNKNOWN_NODE = "UNKNOWN_NODE"    # no node with that id
    PERMISSION_DENIED = "PERMISSION_DENIED"  # only admins (or the owner) may do that; or a key that lies
    TOO_LARGE = "TOO_LARGE"          # a command or environment over the master's size limit
    QUEUE_LIMIT = "QUEUE_LIMIT"      # the user already has the most pending jobs the master allows
    IMPOSSIBLE = "IMPOSSIBLE"        # the request can never be satisfied
    STORE_FAILED = "STORE_FAILED"    # the master could not write its state directory
    INTERNAL = "INTERNAL"            # a handler failed; the master goes on


class Stream(str, enum.Enum):
    """The two output streams of a job rank, kept apart end to end."""

    STDOUT = "stdout"
    STDERR = "stderr"


_NUM = (int, float)
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))

#: Required body fields per message type, with the accepted Python types.
#: Fields not listed are optional and read with ``body.get``.
REQUIRED: dict[MsgType, dict[str, type | tuple]] = {
    MsgType.PING: {"user": str, "req": int},
    MsgType.SUBMIT: {"user": str, "req": int, "job": dict},
    MsgType.QUEUE: {"user": str, "req": int},
    MsgType.JOB: {"user": str, "req": int, "job_id": str},
    MsgType.CANCEL: {"user": str, "req": int, "job_ids": list},
    MsgType.FETCH: {"user": str, "req": int, "job_id": str, "rank": int,
                    "stream": str, "offset": int},
    MsgType.NODES: {"user": str, "req": int},
    MsgType.DRAIN: {"user": str, "req": int, "node_id": str, "reason": str},
    MsgType.RESUME: {"user": str, "req": int, "node_id": str},
    MsgType.REPLY: {"ok": bool},
    MsgType.REGISTER: {"node_id": str, "hostname": str, "address": str,
                       "gpus": list, "jobs": list},
    MsgType.HEARTBEAT: {},
    MsgType.JOB_STARTED: {"job_id": str, "rank": int, "pid": int},
    MsgType.OUTPUT: {"job_id": str, "rank": int, "stream": str, "offset": int},
    MsgType.JOB_ENDED: {"job_id": str, "rank": int, "exit_code": _OPT_INT,
                        "signal": _OPT_INT, "reason": _OPT_STR, "sizes": dict},
    MsgType.REGISTERED: {"heartbeat_interval": _NUM},
    MsgType.REREGISTER: {},
    MsgType.DISPATCH: {"job_id": str, "rank": int, "command": str, "cwd": str,
                       "env": dict, "gpu_indices": list, "kill_grace": _NUM},
    MsgType.KILL: {"job_id": str, "reason": str},
    MsgType.RESEND: {"job_id": str, "rank": int, "stream": str, "offset": int},
    MsgType.REFUSED: {"reason": str},
    MsgType.JOB_STATE: {"job_id": str, "state": str},
    MsgType.NODE_STATE: {"node_id": str, "state": str},
}

#: A node's report on one GPU (REGISTER "telemetry", HEARTBEAT "gpus": GPU index -> the fields that changed).
GPU_REPORT: dict[str, type | tuple] = {
    "used_mb": int, "foreign_mb": int, "utilization": _OPT_INT, "temperature": _OPT_INT, "busy": bool,
    "healthy": bool, "health": _OPT_STR, "dirty": _OPT_STR, "processes": list,
}
#: One of its "processes": job_id is None for a process zmgpu did not start.
GPU_PROCESS: dict[str, type | tuple] = {"pid": int, "used_mb": int, "job_id": _OPT_STR}

#: What node agents send; every other type the master accepts is a client request (it carries ``user``).
FROM_NODES = frozenset({MsgType.REGISTER, MsgType.HEARTBEAT, MsgType.JOB_STARTED, MsgType.OUTPUT,
                        MsgType.JOB_ENDED})

#: Largest message a client or node agent accepts from the master (ZMQ_MAXMSGSIZE): far above any
#: honest reply, so only a broken or hostile peer is cut off.
PEER_MAX_MESSAGE = 256 << 20

#: Message types that carry exactly one payload frame.
WITH_PAYLOAD = frozenset({MsgType.OUTPUT})

_TYPES = {t.value: t for t in MsgType}


def valid_gpu_fields(fields: dict) -> dict:
    """The fields of a GPU report that are known and of their type (the others are dropped)."""
    good = {k: v for k, v in fields.items() if k in GPU_REPORT and has_type(v, GPU_REPORT[k])}
    processes = good.get("processes")
    if processes is not None and not all(isinstance(p, dict) and all(has_type(p.get(k), kind)
                                                                    for k, kind in GPU_PROCESS.items())
                                         for p in processes):
        del good["processes"]
    return good


class ProtocolError(Exception):
    """A message that cannot be accepted; ``code`` is an :class:`ErrorCode`."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Message:
    """A decoded message: its type, validated body and payload frames."""

    type: MsgType
    body: dict
    payload: list[bytes] = field(default_factory=list)


def encode(msg_type: MsgType, body: dict, *payload: bytes) -> list[bytes]:
    """Frames for one message (without routing id or topic)."""
    data = json.dumps(body, separators=(",", ":")).encode()
    return [MAGIC, msg_type.value, data, *payload]


def decode(frames: list[bytes]) -> Message:
    """Validate and decode frames (routing id / topic already removed)."""
    if len(frames) < 3 or frames[0] != MAGIC:
        raise ProtocolError(ErrorCode.BAD_FRAME,
                            "not a zmgpu message (expected ZMGPU1, TYPE, JSON frames)")
    msg_type = _TYPES.get(bytes(frames[1]))
    if msg_type is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE,
                            f"unknown message type {bytes(frames[1])[:40]!r}")
    try:
        body = json.loads(frames[2])
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(ErrorCode.BAD_JSON, "message body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.BAD_JSON, "message body must be a JSON object")
    for name, kind in REQUIRED[msg_type].items():
        value = body.get(name, _MISSING)
        if value is _MISSING:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{msg_type.name} message lacks field '{name}'")
        if not has_type(value, kind):
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"{msg_type.name} field '{name}' has the wrong type")
    payload = [bytes(f) for f in frames[3:]]
    if msg_type in WITH_PAYLOAD and len(payload) != 1:
        raise ProtocolError(ErrorCode.BAD_FRAME,
                            f"{msg_type.name} message needs exactly one payload frame")
    return Message(msg_type, body, payload)


_MISSING = object()


def ok_reply(req: int, **fields) -> dict:
    """Body of a successful reply."""
    return {"ok": True, "req": req, **fields}


def error_reply(req: int | None, code: ErrorCode, message: str) -> dict:
    """Body of a failed reply; ``message`` is a sentence the CLI prints as is."""
    return {"ok": False, "req": req, "error": code.value, "message": message}


def job_topic(job_id: str, kind: str) -> bytes:
    """PUB topic for a job's ``output`` or ``state``."""
    return f"job.{job_id}.{kind}".encode()


def end_topic(job_id: str) -> bytes:
    """PUB topic of a job's final state (also published under its ``state`` topic)."""
    return f"ended.{job_id}.state".encode()


def array_end_prefix(array_id: str) -> bytes:
    """Subscription prefix that matches the end topics of every task of an array (``ended.<ID>_``)."""
    return f"ended.{array_id}_".encode()


#: Subscription prefix that matches every job's end.
ENDED_PREFIX = b"ended."


def job_prefix(job_id: str) -> bytes:
    """Subscription prefix that matches every topic of one job."""
    return f"job.{job_id}.".encode()


def node_topic(node_id: str) -> bytes:
    """PUB topic for a node's state changes."""
    return f"node.{node_id}.state".encode()
