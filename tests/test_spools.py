"""The node's spools as a whole: old reported ones are removed, nothing unreported or held is."""

from __future__ import annotations

import os
import time

from zmgpu.node.keeper_link import STATUS_FILE, spool_file
from zmgpu.node.runner import PROCESS_FILE, RankKey, spool_keys
from zmgpu.node.spools import prune_spools

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
    assert prune_spools(str(tmp_path), time.time() - DAY, keep={held}) == 1
    assert spool_keys(str(tmp_path)) == [recent, running, unreported, held]
    assert old not in spool_keys(str(tmp_path))


def test_no_spool_directory_at_all(tmp_path):
    assert prune_spools(str(tmp_path / "missing"), time.time(), keep=set()) == 0
