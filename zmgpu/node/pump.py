"""The node agent's output pump: each rank's start, new output and end go to the master, in that order.

A rank that ends within START_HOLD of its start (see runner.py), having written
nothing, sends no start of its own: its JOB_ENDED carries the pid and the
rendezvous port.  One that writes sooner sends its start before its output.

The spool files are the buffer: a send that would block stops the pump until
the agent's next turn, the per-stream offsets say what went out, and nothing is
lost while the master is slow or away.  A budget per turn keeps heartbeats and
the master's messages flowing while a job floods its output.  A RESEND from
the master (its copy has a gap) only moves a stream's offset back.
"""

from __future__ import annotations

import logging
from typing import Callable

from ..protocol import MsgType, Stream
from .runner import RankKey, RankProcess
from .spools import SpoolIndex

#: Output bytes sent per loop turn.
PUMP_BUDGET = 4 * 1024 * 1024

Send = Callable[..., bool]   # send(type, body, *payload) -> False when it would block


def pump(ranks: dict[RankKey, RankProcess], send: Send, dirty_for: Callable[[str, list[int]], list[int]],
         now: float) -> tuple[bool, list[RankProcess]]:
    """Send what each rank owes the master; (anything went out, ranks whose end was sent and are forgotten).

    Ranks whose end went out are removed from ``ranks``.  ``dirty_for(job id, GPU indices)`` says which of
    a rank's GPUs still hold its job's processes, as things are when its end goes out.  A rank's start
    waits until ``announce_by`` (``now`` being the monotonic time) for its end, which then carries it,
    unless output must go first.
    """
    budget = PUMP_BUDGET
    sent = False
    reported: list[RankProcess] = []
    for key, rank in list(ranks.items()):
        if rank.pending:
            continue    # JOB_STARTED waits for the keeper's answer
        if not rank.start_reported and not rank.ended:
            if now < rank.announce_by and not rank.has_unsent():
                continue
            if not send(MsgType.JOB_STARTED, {**key.wire(), "pid": rank.pid, "master_port": rank.master_port}):
                break
            rank.start_reported = sent = True
        for stream in Stream:
            while budget > 0:
                chunk = rank.read_chunk(stream, budget)
                if not chunk:
                    break
                header = {**key.wire(), "stream": stream.value, "offset": rank.sent[stream]}
                if not send(MsgType.OUTPUT, header, chunk):
                    return sent, reported
                rank.advance(stream, len(chunk))
                budget -= len(chunk)
                sent = True
        if budget <= 0:
            break
        if rank.ended and not rank.has_unsent():
            rank.dirty_gpus = dirty_for(key.job_id, rank.gpu_indices)
            if not send(MsgType.JOB_ENDED, rank.ended_body()):
                break
            sent = True
            rank.forget()
            del ranks[key]
            reported.append(rank)
    return sent, reported


def rewind(ranks: dict[RankKey, RankProcess], spools: SpoolIndex, job_id: str, rank: int, stream: Stream,
           offset: int, log: logging.Logger) -> None:
    """Send ``stream`` of a job's rank again from ``offset``, from the newest attempt spooled here (in the index).

    A rank already reported and forgotten is revived from its spool (the bytes and the exit status are
    still there), and its end is reported again after the output.
    """
    attempts = [key.attempt for key in ranks if (key.job_id, key.rank) == (job_id, rank)]
    attempts += spools.attempts(job_id, rank)
    if not attempts:
        log.warning("cannot resend %s of job %s rank %d: nothing spooled here", stream.value, job_id, rank)
        return
    key = RankKey(job_id, rank, max(attempts))
    rank_proc = ranks.get(key)
    if rank_proc is None:
        rank_proc = RankProcess.revive(spools.state_dir, key)
        if rank_proc is None:
            log.warning("cannot resend %s of %s: its spool is unreadable", stream.value, key)
            return
        ranks[key] = rank_proc
    if rank_proc.rewind(stream, offset):
        log.debug("resending %s of %s from byte %d", stream.value, key, offset)
