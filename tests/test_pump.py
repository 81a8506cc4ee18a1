"""The node's output pump: a rank that ends within START_HOLD of its start sends one message, not two."""

import os
import time

from conftest import poll
from helpers import wait_for_file_sh
from zmgpu.node.pump import pump
from zmgpu.node.runner import START_HOLD, RankKey, RankProcess
from zmgpu.node.sweep import JobProcesses
from zmgpu.protocol import MsgType


def spawn(tmp_path, job_id: str, command: str, **kw) -> RankProcess:
    """A rank started by the agent itself (no keeper): a real process, reaped by poll()."""
    return RankProcess.spawn(state_dir=str(tmp_path), node_id="n1", key=RankKey(job_id, 0, 0), command=command,
                             cwd=str(tmp_path), env={"PATH": os.environ["PATH"]}, gpu_indices=[0],
                             kill_grace=1, keeper=None, master_port=29500, **kw)


def pumped(ranks: dict, now: float) -> list[tuple[MsgType, dict]]:
    sent = []
    pump(ranks, lambda msg_type, body, *payload: sent.append((msg_type, body)) or True, lambda *_: [], now)
    return sent


def test_a_rank_that_ends_within_the_hold_reports_its_start_with_its_end(tmp_path):
    rank = spawn(tmp_path, "0000000a", "true")
    ranks = {rank.key: rank}
    assert pumped(ranks, rank.announce_by - START_HOLD / 2) == []     # held: it may end any moment
    poll(rank.poll, 10, "the rank to end")
    [(msg_type, body)] = pumped(ranks, rank.announce_by - START_HOLD / 2)
    assert msg_type is MsgType.JOB_ENDED and (body["pid"], body["master_port"], body["exit_code"]) == (
        rank.pid, 29500, 0)
    assert ranks == {}


def test_a_rank_still_running_after_the_hold_reports_its_start_alone(tmp_path):
    rank = spawn(tmp_path, "0000000b", f"{wait_for_file_sh(str(tmp_path / 'go'))}")
    try:
        ranks = {rank.key: rank}
        [(msg_type, body)] = pumped(ranks, rank.announce_by)
        assert msg_type is MsgType.JOB_STARTED and body["pid"] == rank.pid
        (tmp_path / "go").touch()
        poll(rank.poll, 10, "the rank to end")
        [(msg_type, body)] = pumped(ranks, rank.announce_by)
        assert msg_type is MsgType.JOB_ENDED and "pid" not in body
    finally:
        JobProcesses("0000000b").kill()


def test_the_rendezvous_host_of_a_multi_node_job_announces_at_once(tmp_path):
    turn_began = time.monotonic()   # the agent's turn reads the clock first, then starts ranks
    rank = spawn(tmp_path, "0000000c", f"{wait_for_file_sh(str(tmp_path / 'go'))}", hosts_rendezvous=True)
    try:
        # At once, with the turn's clock from before the start, when any other rank would be held back.
        [(msg_type, body)] = pumped({rank.key: rank}, turn_began)
        assert msg_type is MsgType.JOB_STARTED and body["master_port"] == 29500
    finally:
        JobProcesses("0000000c").kill()
