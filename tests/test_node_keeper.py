"""End to end: the node's job keeper keeps jobs and their exit status across node agent restarts.

The keeper, not the agent, is the parent of every job: a job that ends while no agent runs still has
its exit code recorded, and the restarted agent reports it with the job's full output.  The keeper
outlives a SIGKILLed agent and the restarted agent reuses it; a keeper that dies is replaced, and the
jobs it left keep being watched.  Its socket drops what is not a valid message.
"""

import json
import logging
import os
import signal
import socket
import time

from conftest import FINISHED, pid_alive, poll, written
from helpers import STDERR_MARKER, hold_sh, job_command, pattern_chunks, release, wait_for_file_sh
from zmgpu.node.keeper import SPAWNED_HOLD
from zmgpu.node.keeper_link import SPOOL_LAYOUT, KeeperLink, on_short_path, spool_file
from zmgpu.node.runner import RankKey, RankProcess
from zmgpu.node.sweep import boot_ticks, proc_stat

#: Long enough that the master still counts the jobs as running when the new agent registers.
NODE_TIMEOUT = 30
BEFORE = 200 * 1024 + 3     # written before the agent is killed; more than one output chunk
DOWN_LINE = "written while no node agent runs"
AFTER_LINE = "written after the node agent came back"


def parent_sh(name: str) -> str:
    """Shell snippet recording the job's own pid and its parent's (the keeper) in ``name``."""
    return f"echo $$ $PPID > {name}.tmp && mv {name}.tmp {name}"


def pids(path) -> tuple[int, int]:
    """(job shell pid, its parent's pid) as recorded by :func:`parent_sh`."""
    own, parent = written(path).split()
    return int(own), int(parent)


def start(cluster):
    cluster.start_master(0, 0, "--node-timeout", str(NODE_TIMEOUT))
    agent = cluster.start_node("n1")
    cluster.wait_nodes_up(1)
    return agent


def test_job_ending_while_no_agent_runs_keeps_exit_code_and_output(bare_cluster, workdir):
    cluster = bare_cluster
    agent = start(cluster)
    ends_away = cluster.submit("; ".join([
        parent_sh("away.pids"), job_command("spew", str(BEFORE), "0"),
        hold_sh("agent.killed"), f"echo '{DOWN_LINE}'", "exit 3",
    ]), "--gpus", "1", cwd=workdir)
    outlives = cluster.submit("; ".join([
        parent_sh("outlives.pids"), "echo first", hold_sh("agent.back"), f"echo '{AFTER_LINE}'",
    ]), "--gpus", "1", cwd=workdir)
    cluster.wait_job_state(ends_away, "RUNNING")
    cluster.wait_job_state(outlives, "RUNNING")
    away_pid, keeper = pids(workdir / "away.pids")
    assert pids(workdir / "outlives.pids")[1] == keeper
    assert keeper != agent.popen.pid
    # The master holds the first part: the new agent sends it again from offset 0, as duplicates.
    poll(lambda: cluster.output_size(ends_away) == BEFORE, 20, "the first part of the output to reach the master")

    cluster.stop(agent, signal.SIGKILL)
    assert pid_alive(keeper), "the keeper died with the agent"
    release(workdir, "agent.killed")
    poll(lambda: not pid_alive(away_pid), 20, "the job to end while no agent runs")
    assert pid_alive(keeper)

    agent = cluster.start_node("n1")
    job = cluster.wait_job_state(ends_away, FINISHED)
    # The adopted job still holds its GPU: the master does not hand it out again.
    assert [g["job_id"] for g in cluster.node("n1")["gpus"]].count(outlives) == 1
    assert (job["state"], job["exit_code"]) == ("FAILED", 3), job
    assert cluster.output(ends_away) == b"".join(pattern_chunks(BEFORE)) + f"{DOWN_LINE}\n".encode()
    assert cluster.output(ends_away, "stderr") == STDERR_MARKER

    # The restarted agent reuses the keeper: a new job is its child too.
    fresh = cluster.submit(parent_sh("fresh.pids"), "--gpus", "1", cwd=workdir)
    assert cluster.wait_job_state(fresh, FINISHED)["state"] == "COMPLETED"
    assert pids(workdir / "fresh.pids")[1] == keeper

    assert cluster.job(outlives)["state"] == "RUNNING"
    release(workdir, "agent.back")
    job = cluster.wait_job_state(outlives, FINISHED)
    assert (job["state"], job["exit_code"]) == ("COMPLETED", 0), job
    assert cluster.output(outlives) == f"first\n{AFTER_LINE}\n".encode()
    poll(lambda: all(g["job_id"] is None for g in cluster.node("n1")["gpus"]), 10, "the jobs' GPUs to be released")
    assert agent.alive() and pid_alive(keeper)


def test_lost_keeper_is_replaced_and_its_jobs_still_end(bare_cluster, workdir):
    cluster = bare_cluster
    agent = start(cluster)
    orphan = cluster.submit(parent_sh("orphan.pids") + "; " + hold_sh("release") + "; echo done",
                            "--gpus", "1", cwd=workdir)
    cluster.wait_job_state(orphan, "RUNNING")
    own, keeper = pids(workdir / "orphan.pids")
    # Killed before its answer reached the agent, the keeper would leave a rank the agent cannot know started:
    # that one is stopped and started again (Agent._keeper_lost).  This test is about a rank it did answer.
    poll(lambda: f"job {orphan} rank 0 started: pid {own}" in agent.log.read_text(), 10,
         "the keeper's answer to reach the agent")

    os.kill(keeper, signal.SIGKILL)
    poll(lambda: not pid_alive(keeper), 10, "the keeper to die")
    # The agent starts a new keeper for the next job; the job the old one left is still watched.
    fresh = cluster.submit(parent_sh("fresh.pids"), "--gpus", "1", cwd=workdir)
    assert cluster.wait_job_state(fresh, FINISHED)["state"] == "COMPLETED"
    new_keeper = pids(workdir / "fresh.pids")[1]
    assert new_keeper not in (keeper, agent.popen.pid)

    release(workdir, "release")
    job = cluster.wait_job_state(orphan, FINISHED)
    # Nobody was left to learn its exit status; its output still arrives whole.
    assert job["exit_code"] is None and "unknown" in job["reason"], job
    assert cluster.output(orphan) == b"done\n"
    assert agent.alive()


def test_keeper_drops_malformed_messages(bare_cluster, workdir):
    cluster = bare_cluster
    start(cluster)
    state_dir = cluster.root / "node-n1"
    garbage = [
        b"not json at all",
        b"[1, 2, 3]",
        b'{"op": "launch"}',
        b'{"op": "spawn", "spool": "x"}',                 # fields missing
        b'{"op": "exited", "spool": "x", "pid": 1, "exit_code": 0, "signal": null}',   # not a request
        b"\xff\xfe",
    ]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        on_short_path(str(state_dir / "keeper.sock"), sock.connect)
        # A spool name that would leave the jobs directory is refused with a reason.
        escape = {"op": "spawn", "spool": "../../escape", "command": "touch escaped", "cwd": str(workdir),
                  "env": {}, "deadline": 1e12}
        sock.sendall(b"\n".join(garbage + [json.dumps(escape).encode(), b'{"op": "hello"}']) + b"\n")
        reader = sock.makefile("rb")
        answers = [json.loads(reader.readline()) for _ in range(2)]
    assert answers[0]["op"] == "spawned" and answers[0]["pid"] is None and answers[0]["error"], answers
    assert answers[1]["op"] == "ranks" and answers[1]["ranks"] == {}, answers
    assert not (workdir / "escaped").exists()

    # The keeper still serves the agent.
    job_id = cluster.submit("exit 5", "--gpus", "1", cwd=workdir)
    assert cluster.wait_job_state(job_id, FINISHED)["exit_code"] == 5


def test_a_rank_started_without_a_keeper_runs_as_one_the_keeper_starts(tmp_path):
    """The agent's own spawn (no keeper could be reached) goes through the same start as the keeper's."""
    key = RankKey("0badcafe", 0, 0)
    rank = RankProcess.spawn(state_dir=str(tmp_path), node_id="n1", key=key, cwd=str(tmp_path),
                             command='echo "out $CUDA_VISIBLE_DEVICES $ZMGPU_JOB_ID"; echo err >&2; exit 3',
                             env={"PATH": os.environ["PATH"]}, gpu_indices=[1], kill_grace=1, keeper=None)
    poll(rank.poll, 10, "the rank to end")
    assert (rank.exit_code, rank.signal, rank.ended) == (3, None, True)
    spool = key.spool(str(tmp_path))
    assert (open(spool_file(spool, "stdout")).read(), open(spool_file(spool, "stderr")).read()) == (
        "out 1 0badcafe\n", "err\n")
    failed = RankProcess.spawn(state_dir=str(tmp_path), node_id="n1", key=RankKey("0badcafe", 1, 0),
                               cwd=str(tmp_path), command="true", env={"BAD=NAME": "x"}, gpu_indices=[],
                               kill_grace=1, keeper=None)
    assert failed.ended and failed.pid is None and "cannot start the job on node n1" in failed.reason


def test_a_job_starts_clean_whoever_starts_it(pair, workdir, tmp_path):
    """Default SIGPIPE (a pipeline's writer ends quietly), no inherited descriptors, the job's own directory,
    whether the keeper starts it or the agent does (no keeper)."""
    command = 'yes | head -c 4; ls /proc/self/fd > fds; pwd > where'
    job_id = pair.submit(f"({command}) > out 2> err", "--gpus", "1", cwd=workdir)
    assert pair.wait_job_state(job_id, FINISHED)["state"] == "COMPLETED"
    key = RankKey("0badcafe", 0, 0)
    rank = RankProcess.spawn(state_dir=str(tmp_path), node_id="n1", key=key, cwd=str(tmp_path),
                             command=f"({command}) > out 2> err", env={"PATH": os.environ["PATH"]},
                             gpu_indices=[], kill_grace=1, keeper=None)
    poll(rank.poll, 10, "the rank to end")
    for where in (workdir, tmp_path):
        assert ((where / "out").read_text(), (where / "err").read_text()) == ("y\ny\n", ""), where
        # 0, 1 and 2, and the directory ls itself is reading.
        assert {"0", "1", "2"} <= set((where / "fds").read_text().split()) <= {"0", "1", "2", "3"}, where
        assert (where / "where").read_text().strip() == str(where)


def test_a_keeper_reports_the_spool_layout_it_writes(tmp_path):
    """An agent upgraded while an older keeper runs on must know not to ask it for ranks (see SPOOL_LAYOUT)."""
    link = KeeperLink.open(str(tmp_path), logging.getLogger("test.keeper"))
    try:
        assert (link.layout, link.outdated) == (SPOOL_LAYOUT, False)
    finally:
        link.close()
        if link.process is not None:
            link.process.terminate()
            link.process.wait(10)


def test_the_keeper_answers_a_spawn_at_the_rank_end_or_after_the_hold(tmp_path):
    """A rank that ends at once gets its answer just before its end; one that runs on gets it after the hold."""
    state_dir = str(tmp_path / "node")
    os.makedirs(os.path.join(state_dir, "jobs"))
    link = KeeperLink.open(state_dir, logging.getLogger("test.keeper"))
    events = []
    try:
        env = {"PATH": os.environ["PATH"]}
        link.spawn("0000000a.0.0", "true", str(tmp_path), env)
        poll(lambda: events.extend(link.events()) or len(events) >= 2, 10, "the quick rank's answer and end")
        assert [type(e).__name__ for e in events] == ["Spawned", "Exited"] and events[0].pid == events[1].pid
        assert events[0].start_time and events[0].error is None
        events.clear()
        asked = time.monotonic()
        link.spawn("0000000b.0.0", wait_for_file_sh(str(tmp_path / "go")), str(tmp_path), env)
        # Looked for every millisecond, so that an answer that did not wait would be seen before the hold's end.
        [spawned] = poll(lambda: events.extend(link.events()) or events, 10, "the running rank's answer",
                         interval=0.001)
        # Not before the hold is over (the monotonic clock is the same in both processes), and there is one.
        assert SPAWNED_HOLD > 0 and time.monotonic() >= asked + SPAWNED_HOLD
        assert type(spawned).__name__ == "Spawned" and pid_alive(spawned.pid)
        # The start time is the one /proc gives: an agent restarted later tells the rank from a new pid by it.
        assert spawned.start_time == proc_stat(spawned.pid)[1]
        (tmp_path / "go").touch()
        poll(lambda: events.extend(link.events()) or len(events) >= 2, 10, "the running rank's end")
        assert type(events[1]).__name__ == "Exited" and events[1].exit_code == 0
    finally:
        (tmp_path / "go").touch()
        link.close()
        if link.process is not None:
            link.process.terminate()
            link.process.wait(10)


def test_clock_readings_around_a_spawn_that_agree_are_its_proc_start_time():
    """The keeper takes a rank's start time from the clock when no tick passed during the spawn."""
    agreed = 0
    for _ in range(30):
        before = boot_ticks()
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", "read x"], dict(os.environ))
        after = boot_ticks()
        try:
            start = proc_stat(pid)[1]
            assert before <= start <= after
            if before == after:
                agreed += 1
                assert start == before
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    assert agreed, "no spawn fell within one clock tick"


def test_a_rank_whose_output_file_cannot_be_made_says_which_file(tmp_path):
    (tmp_path / "jobs").write_text("")         # a file where the jobs directory should be
    key = RankKey("0badcafe", 0, 0)
    failed = RankProcess.spawn(state_dir=str(tmp_path), node_id="n1", key=key, cwd=str(tmp_path), command="true",
                               env={}, gpu_indices=[], kill_grace=1, keeper=None, fresh=True)
    assert failed.ended and failed.pid is None
    assert failed.reason == (f"cannot start the job on node n1: Not a directory: "
                             f"{spool_file(key.spool(str(tmp_path)), 'stdout')}"), failed.reason
