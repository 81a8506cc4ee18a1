"""The exceptions of the client API (:mod:`zmgpu.client` and :mod:`zmgpu.stream` raise them).

A failed request carries the master's error code (:class:`zmgpu.protocol.ErrorCode`);
a failure the client detects itself carries a :class:`LocalError`.  Either way
``str(exc)`` is one sentence for a person, which the command line prints as it is.
"""

from __future__ import annotations

import enum


class LocalError(str, enum.Enum):
    """Codes of failures the client detects itself (the master's own are :class:`protocol.ErrorCode`)."""

    UNREACHABLE = "UNREACHABLE"          # the master did not answer in time
    BAD_ADDRESS = "BAD_ADDRESS"          # the master's address cannot even be connected to
    SESSION_TIMEOUT = "SESSION_TIMEOUT"  # an interactive session reached its longest; the job runs on
    WAIT_TIMEOUT = "WAIT_TIMEOUT"        # an interactive job stayed pending too long; it was cancelled
    DETACHED = "DETACHED"                # the caller detached (Ctrl-\); the job runs on
    INTERRUPTED = "INTERRUPTED"          # the caller stopped watching (a second Ctrl-C)
    WAIT_DEADLINE = "WAIT_DEADLINE"      # Client.wait ran out of time; the jobs are left as they are
    NO_SUCH_RANK = "NO_SUCH_RANK"        # a rank the job does not have
    INCOMPLETE = "INCOMPLETE"            # a finished job's output never all reached the master


class ClientError(Exception):
    """A request that failed.

    ``code`` is the master's error code (a :class:`zmgpu.protocol.ErrorCode`
    value such as ``"UNKNOWN_JOB"`` or ``"IMPOSSIBLE"``) or a
    :class:`LocalError` value; ``message`` is one sentence for a person, and
    ``str(exc) == exc.message``.
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class MasterUnreachable(ClientError):
    """The master did not answer in time; the message names its address."""

    def __init__(self, message: str):
        super().__init__(LocalError.UNREACHABLE, message)


class BadAddress(ClientError):
    """The master's address is malformed (a host name with a space, say); the message names it."""

    def __init__(self, message: str):
        super().__init__(LocalError.BAD_ADDRESS, message)


class Detached(ClientError):
    """:meth:`zmgpu.Client.stream` stopped watching a job that is left as it is (``code`` says why)."""
