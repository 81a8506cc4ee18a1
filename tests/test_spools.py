"""The node's spools as a whole: old reported ones are removed, nothing unreported or held is."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time

import pytest

from zmgpu.node.keeper_link import STATUS_FILE, spool_file
from conftest import poll
from helpers import wait_for_file_sh
from zmgpu.node.runner import PROCESS_FILE, RankKey, RankProcess, load_status, spool_keys
from zmgpu.node.spools import SpoolIndex, adopt_leftovers
from zmgpu.protocol import Stream

DAY = 86400


def spool(state_dir, job_id: str, ended_ago: float | None, reported: bool = True) -> RankKey:
    """A rank's spool that ended ``ended_ago`` seconds ago (None: still running)."""
    key = RankKey(job_id, 0, 0)
    path = key.spool(str(state_dir))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    for stream in ("stdout", "stderr"):
        open(spool_file(path, stream), "wb").close()
    if not reported:
        open(spool_file(path, PROCESS_FILE), "w").write('{"pid": 2}')
    else:
        open(spool_file(path, PROCESS_FILE), "w").close()     # emptied when the master heard the end
    if ended_ago is not None:
        status = spool_file(path, STATUS_FILE)
        open(status, "w").write('{"exit_code": 0}')
        when = time.time() - ended_ago
        os.utime(status, (when, when))
    return key


def test_only_old_reported_spools_are_removed(tmp_path):
    old = spool(tmp_path, "00000001", 2 * DAY)
    recent = spool(tmp_path, "00000002", 60)
    running = spool(tmp_path, "00000003", None)
    unreported = spool(tmp_path, "00000004", 2 * DAY, reported=False)
    held = spool(tmp_path, "00000005", 2 * DAY)
    index = SpoolIndex.read(str(tmp_path))
    assert index.prune(time.time() - DAY, keep={held}) == [old]
    assert spool_keys(str(tmp_path)) == [recent, running, unreported, held]
    assert sorted(index.reported) == [recent, running, unreported, held]


def test_no_spool_directory_at_all(tmp_path):
    index = SpoolIndex.read(str(tmp_path / "missing"))
    assert index.reported == {} and index.prune(time.time(), keep=set()) == []
    assert index.recent_ends(0, skip=set()) == []


def test_the_index_follows_the_agent_without_listing_the_directory(tmp_path):
    # Read once; what the agent dispatches and reports after that is known from the index alone.
    old = spool(tmp_path, "00000001", 2 * DAY)
    index = SpoolIndex.read(str(tmp_path))
    assert index.reported[old] == pytest.approx(time.time() - 2 * DAY, abs=5)
    assert index.attempts("00000001", 0) == [0]    # found on disk
    assert not index.add(old)                  # dispatched again: its earlier spool is there
    new = spool(tmp_path, "00000002", 0)
    assert index.add(new) and index.add(RankKey("00000002", 0, 1))
    assert sorted(index.attempts("00000002", 0)) == [0, 1] and index.attempts("00000002", 1) == []
    assert index.recent_ends(time.time() - 3600, skip=set()) == []     # neither reported yet
    assert index.prune(time.time(), keep=set()) == []
    index.mark_reported(new, time.time())
    [entry] = index.recent_ends(time.time() - 3600, skip=set())
    assert entry == {"job_id": "00000002", "rank": 0, "attempt": 0, "ended": True, "exit_code": 0, "signal": None,
                     "reason": None, "sizes": {"stdout": 0, "stderr": 0}}
    assert index.recent_ends(time.time() - 3600, skip={new}) == []
    index.mark_reported(RankKey("00000003", 0, 0), time.time())    # refused: never dispatched here
    assert index.attempts("00000003", 0) == []
    index.mark_reported(old, time.time() - 2 * DAY)
    assert index.prune(time.time() - DAY, keep=set()) == [old]
    assert old not in spool_keys(str(tmp_path)) and old not in index.reported
    assert index.attempts("00000001", 0) == []     # a removed spool has no attempt left to resend


def test_spools_of_an_older_layout_are_taken_over(tmp_path):
    """A directory per rank (before the flat layout): moved to today's names, then adopted or left as reported."""
    jobs = tmp_path / "jobs"
    gone = subprocess.Popen(["true"])
    gone.wait()
    record = {"pid": gone.pid, "pgid": gone.pid, "start_time": 1, "kill_grace": 1.0, "spawned_at": time.time(),
              "master_port": None}
    files = {"0000000a.0.0": {"stdout": "done\n", "stderr": "", "status": '{"exit_code": 0}'},
             "0000000b.0.1": {"stdout": "ran\n", "stderr": "", "process": json.dumps(record),
                              "status": '{"exit_code": 3, "signal": null, "reason": null}', "status.tmp77": "x"}}
    for name, parts in files.items():
        (jobs / name).mkdir(parents=True)
        for part, text in parts.items():
            (jobs / name / part).write_text(text)
    log = logging.getLogger("test.spools")
    adopted, index = adopt_leftovers(str(tmp_path), {}, log)
    assert sorted(os.listdir(jobs)) == sorted(f"{name}.{part}" for name, parts in files.items()
                                              for part in parts if not part.startswith("status."))
    assert spool_keys(str(tmp_path)) == [RankKey("0000000a", 0, 0), RankKey("0000000b", 0, 1)]
    # Every spool on disk, reported or not: each may have an end there.
    assert {key.name for key in index.reported} == set(files)
    # The reported one stays reported; the one whose end was never reported is, with the exit status it had.
    [(key, rank)] = adopted.items()
    assert key == RankKey("0000000b", 0, 1) and rank.poll() and rank.exit_code == 3
    assert rank.read_chunk(Stream.STDOUT, 100) == b"ran\n"
    rank.close()


def test_a_link_named_like_an_older_spool_is_left_alone(tmp_path):
    """Only a real directory is an older zmgpu's spool: a link's target belongs to someone else."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "stdout").write_text("not ours\n")
    jobs = tmp_path / "state" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "0000000e.0.0").symlink_to(elsewhere)
    adopt_leftovers(str(tmp_path / "state"), {}, logging.getLogger("test.spools"))
    assert (elsewhere / "stdout").read_text() == "not ours\n"
    assert os.listdir(jobs) == ["0000000e.0.0"]


def test_the_agent_records_an_end_the_keeper_did_not(tmp_path):
    """A keeper from an older zmgpu writes a moved spool's status where it no longer is: the agent writes it."""
    key = RankKey("0000000c", 0, 0)
    spool = key.spool(str(tmp_path))
    os.makedirs(os.path.dirname(spool))
    for stream in ("stdout", "stderr"):
        open(spool_file(spool, stream), "wb").close()
    gone = subprocess.Popen(["true"])
    gone.wait()
    open(spool_file(spool, PROCESS_FILE), "w").write(json.dumps(
        {"pid": gone.pid, "pgid": gone.pid, "start_time": 1, "kill_grace": 1.0, "spawned_at": time.time()}))
    adopted, _ = adopt_leftovers(str(tmp_path), {key.name: gone.pid}, logging.getLogger("test.spools"))
    [rank] = adopted.values()
    rank.exited(5, None)
    assert rank.poll() and load_status(spool)["exit_code"] == 5
    rank.close()


def test_an_older_keepers_running_rank_keeps_its_directory_for_the_status(tmp_path):
    """The older keeper still running a rank writes its end into the old directory; the next start moves it."""
    name = "0000000d.0.0"
    older = tmp_path / "jobs" / name
    older.mkdir(parents=True)
    (older / "stdout").write_text("running\n")
    log = logging.getLogger("test.spools")
    adopt_leftovers(str(tmp_path), {name: 4242}, log)
    assert older.is_dir() and os.listdir(older) == []
    assert (tmp_path / "jobs" / f"{name}.stdout").read_text() == "running\n"
    (older / "status").write_text('{"exit_code": 9, "signal": null}')    # as that keeper writes it at the end
    adopt_leftovers(str(tmp_path), {}, log)
    assert not older.exists() and load_status(str(older))["exit_code"] == 9


def test_a_rank_started_where_an_earlier_end_lies_does_not_take_it(tmp_path):
    """A rank not started ``fresh`` (its name was on disk, or dispatched before) loses the old end first: an
    agent restarted while the new rank runs must not read that end as the new rank's."""
    key = spool(tmp_path, "0000000f", 60, reported=False)   # an earlier dispatch's end and record
    with open(spool_file(key.spool(str(tmp_path)), STATUS_FILE), "w") as fh:
        fh.write('{"exit_code": 9}')
    go = tmp_path / "go"
    rank = RankProcess.spawn(state_dir=str(tmp_path), node_id="n0", key=key, command=wait_for_file_sh(str(go)),
                             cwd=str(tmp_path), env={"PATH": os.environ["PATH"]}, gpu_indices=[], kill_grace=1.0,
                             keeper=None)
    try:
        assert rank.running and not os.path.exists(spool_file(key.spool(str(tmp_path)), STATUS_FILE))
        go.touch()
        poll(rank.poll, 10, "the rank's end")
        assert load_status(key.spool(str(tmp_path)))["exit_code"] == 0
    finally:
        go.touch()   # a failed check leaves no rank waiting
        rank.close()
