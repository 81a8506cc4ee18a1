"""The node agent's output pump: each rank's start, new output and end go to the master, in that order.

The spool files are the buffer: a send that would block stops the pump until
the agent's next turn, the per-stream offsets say what went out, and nothing is
lost while the master is slow or away.  A budget per turn keeps heartbeats and
the master's messages flowing while a job floods its output.
"""

from __future__ import annotations

from typing import Callable

from ..protocol import MsgType, Stream
from .runner import RankKey, RankProcess

#: Output bytes sent per loop turn.
PUMP_BUDGET = 4 * 1024 * 1024

Send = Callable[..., bool]   # send(type, body, *payload) -> False when it would block


def pump(ranks: dict[RankKey, RankProcess], send: Send) -> tuple[bool, list[RankKey]]:
    """Send what each rank owes the master; (anything went out, ranks whose end was sent and are forgotten).

    Ranks whose end went out are removed from ``ranks``.
    """
    budget = PUMP_BUDGET
    sent = False
    reported: list[RankKey] = []
    for key, rank in list(ranks.items()):
        if rank.pending:
            continue    # JOB_STARTED waits for the keeper's answer
        if not rank.start_reported:
            if not send(MsgType.JOB_STARTED, {**key.wire(), "pid": rank.pid, "master_port": rank.master_port}):
                break
            rank.start_reported = sent = True
        blocked = False
        for stream in Stream:
            while budget > 0 and not blocked:
                chunk = rank.read_chunk(stream, budget)
                if not chunk:
                    break
                header = {**key.wire(), "stream": stream.value, "offset": rank.sent[stream]}
                if not send(MsgType.OUTPUT, header, chunk):
                    blocked = True
                    break
                rank.advance(stream, len(chunk))
                budget -= len(chunk)
                sent = True
        if blocked or budget <= 0:
            break
        if rank.ended and not rank.has_unsent():
            if not send(MsgType.JOB_ENDED, rank.ended_body()):
                break
            sent = True
            rank.forget()
            del ranks[key]
            reported.append(key)
    return sent, reported
