"""Unit tests of the ``zmgpu`` command line's pure parts: arguments, settings precedence, the tables.

No test here talks to a daemon: usage errors must fail before any request, the
formatting functions take job and node dicts, and the two tests that run the
real CLI as a subprocess check the start-up imports and a master that never answers.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from zmgpu.cli import nodes as nodes_cmd
from zmgpu.cli import queue as queue_cmd
from zmgpu.cli import show as show_cmd
from zmgpu.cli import wait as wait_cmd
from zmgpu.cli.common import (UsageError, client_config, ending, not_a_job_id, port_number,
                              positive_int, seconds)
from zmgpu.cli.main import get_parser, main
from zmgpu.cli.submit import command_line
from zmgpu.config import ClientConfig, ConfigError
from zmgpu.model import JobState, is_job_id

REPO = Path(__file__).resolve().parent.parent


def _cli(*argv: str, timeout: float = 30, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ZMGPU_MASTER", "ZMGPU_CONFIG")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(env_extra or {})
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout)


# -- command line of submit -------------------------------------------------------------------------

@pytest.mark.parametrize("words, expected", [
    (["echo $HOME | wc -c"], "echo $HOME | wc -c"),                      # one string: for /bin/sh
    (["--", "python", "train.py", "--lr", "3"], "python train.py --lr 3"),
    (["--", "my prog", "it's"], "'my prog' 'it'\"'\"'s'"),               # each word stays one argument
    (["--", "echo $HOME"], "'echo $HOME'"),                               # after --, no shell expansion
    (["--", "python", "--", "-x"], "python -- -x"),                      # after --, words stay as they are
    (["python", "train.py", "--lr", "3"], "python train.py --lr 3"),     # srun style: words go to the program
])
def test_command_line(words, expected):
    assert command_line(words) == expected


@pytest.mark.parametrize("words", [[], ["--"]])
def test_command_line_missing(words):
    with pytest.raises(UsageError):
        command_line(words)


@pytest.mark.parametrize("words", [["echo hi", "--gpus", "2"], ["python train.py", "--gpus", "2"]])
def test_words_after_a_one_string_command_are_a_usage_error(words):
    with pytest.raises(UsageError, match="put options before the command, or use -- program args"):
        command_line(words)


def test_submit_parses_words_after_double_dash():
    args = get_parser().parse_args(["submit", "--gpus", "2", "--", "python", "x.py", "--gpus", "9"])
    assert args.gpus == 2 and command_line(args.command) == "python x.py --gpus 9"


def test_untouched_flags_are_none_so_the_file_wins():
    args = get_parser().parse_args(["submit", "true"])
    assert (args.host, args.port, args.session_timeout, args.max_wait_time, args.connection_timeout,
            args.max_consecutive_timeouts, args.interactive) == (None,) * 7


@pytest.mark.parametrize("parse, text", [
    (seconds, "0"), (seconds, "-1"), (seconds, "nan"), (seconds, "inf"), (seconds, "soon"),
    (positive_int, "0"), (positive_int, "1.5"), (port_number, "0"), (port_number, "65536"),
])
def test_bad_numbers_are_refused(parse, text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse(text)


@pytest.mark.parametrize("argv", [
    ["submit", "--node-gpu-ids", "node1", "true"],
    ["submit", "--gpus", "-1", "true"],
    ["submit", "--session-timeout", "0", "true"],
    ["--port", "70000", "queue"],
    ["cancel"],
])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        get_parser().parse_args(argv)
    assert info.value.code == 2
    assert "zmgpu" in capsys.readouterr().err


# -- settings precedence ----------------------------------------------------------------------------

def _args(*argv: str) -> argparse.Namespace:
    return get_parser().parse_args([*argv, "queue"])


def test_defaults_without_file_or_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))     # no ~/.config/zmgpu/client.yaml there
    assert client_config(_args(), environ={}) == ClientConfig()


def test_default_file_is_read_when_it_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".config" / "zmgpu").mkdir(parents=True)
    (tmp_path / ".config" / "zmgpu" / "client.yaml").write_text("port: 9000\n")
    assert client_config(_args(), environ={}).port == 9000


def test_flag_beats_environment_beats_file(tmp_path):
    path = tmp_path / "client.yaml"
    path.write_text("host: file-host\nport: 7000\npub_port: 7005\nconnection_timeout: 4\n")
    env = {"ZMGPU_CONFIG": str(path), "ZMGPU_MASTER": "env-host:7100"}
    config = client_config(_args(), environ=env)
    assert (config.host, config.port, config.pub_port, config.connection_timeout) == (
        "env-host", 7100, 7005, 4.0)
    config = client_config(_args("--host", "flag-host"), environ=env)
    assert (config.host, config.port) == ("flag-host", 7100)
    config = client_config(_args("--config", str(path)), environ={})
    assert (config.host, config.port) == ("file-host", 7000)


def test_broken_environment_and_file_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="ZMGPU_MASTER"):
        client_config(_args(), environ={"ZMGPU_MASTER": "no-port"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("connection_timeout: soon\n")
    with pytest.raises(ConfigError, match="connection_timeout"):
        client_config(_args("--config", str(bad)), environ={})


# -- the new submit options -------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("90", 90 * 60), ("1:30", 90), ("2:00:00", 7200), ("1-2", 26 * 3600), ("1-2:30", 26 * 3600 + 1800),
    ("1-00:00:01", 86401),
])
def test_submit_time_limit_in_slurm_formats(text, expected):
    assert get_parser().parse_args(["submit", "--time", text, "true"]).time == expected


def test_submit_scheduling_options_parse():
    args = get_parser().parse_args(["submit", "--name", "train 1", "--requeue", "--after", "0123abcd:89abef01_7",
                                    "--after-any", "--array", "0-99%8", "--priority", "-5", "true"])
    assert (args.name, args.requeue, args.after, args.after_any, args.array, args.priority) == (
        "train 1", True, ["0123abcd", "89abef01_7"], True, "0-99%8", -5)
    assert args.command == ["true"]


def test_untouched_scheduling_options_are_none():
    args = get_parser().parse_args(["submit", "true"])
    assert (args.time, args.name, args.requeue, args.after, args.after_any, args.array, args.priority) == (
        None,) * 7


def _one_line_usage_error(argv, capsys) -> str:
    """Run ``zmgpu argv`` in this process; it must fail with status 2 and exactly one line on stderr."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    captured = capsys.readouterr()
    assert info.value.code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    return captured.err


@pytest.mark.parametrize("argv, needle", [
    (["submit", "--time", "1:2:3:4", "true"], "D-HH:MM:SS"),
    (["submit", "--time", "0", "true"], "longer than zero"),
    (["submit", "--array", "5-1", "true"], "0-99%8"),
    (["submit", "--array", "0-3%0", "true"], "--array"),
    (["submit", "--after", "0123abcd:nope", "true"], "'nope' is not a job id"),
    (["submit", "--name", "two\nlines", "true"], "job name"),
    (["submit", "--priority", "high", "true"], "--priority"),
    (["queue", "--state", "RUNNING,SLEEPING"], "SLEEPING"),
    (["show", "0123ABCD"], "not a job id"),
    (["wait", "0123abcd", "12345678_x"], "'12345678_x'"),
    (["drain", "n1"], "--reason"),
    (["logs", "--rank", "-1", "0123abcd"], "--rank"),
    (["attach", "nope"], "'nope' is not a job id"),
    ([], "COMMAND"),
])
def test_usage_errors_are_one_line(argv, needle, capsys):
    assert needle in _one_line_usage_error(argv, capsys)


def test_logs_and_attach_options_parse():
    args = get_parser().parse_args(["logs", "-f", "--stderr", "--rank", "1", "0123abcd_4"])
    assert (args.job_id, args.follow, args.stderr, args.rank) == ("0123abcd_4", True, True, 1)
    args = get_parser().parse_args(["attach", "--from-now", "--session-timeout", "5", "0123abcd"])
    assert (args.job_id, args.from_now, args.session_timeout, args.max_consecutive_timeouts) == (
        "0123abcd", True, 5.0, None)
    args = get_parser().parse_args(["logs", "0123abcd"])
    assert (args.follow, args.stderr, args.rank, args.max_consecutive_timeouts) == (None,) * 4


@pytest.mark.parametrize("argv, needle", [
    (["submit", "--interactive", "--array", "0-3", "true"], "--array"),
    (["submit", "-i", "echo hi", "--gpus", "2"], "put options before the command"),
    (["submit", "--after-any", "true"], "--after"),
    (["drain", "n1", "--reason", "  "], "--reason"),
])
def test_contradictions_fail_before_asking_the_master(argv, needle, capsys):
    # --port 1: were the master asked, the error would be "no answer", not a usage error.
    assert main(["--port", "1", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "no answer" not in err


def test_cancel_reports_a_malformed_id_without_crashing(capsys):
    assert main(["--port", "1", "cancel", "not-an-id", "0123abcd_x"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [f"zmgpu: {not_a_job_id('not-an-id')}",
                                         f"zmgpu: {not_a_job_id('0123abcd_x')}"]


@pytest.mark.parametrize("text, ok", [
    ("0123abcd", True), ("0123abcd_0", True), ("0123abcd_1234567", True), ("0123abcd_12345678", False),
    ("0123ABCD", False), ("0123abc", False), ("0123abcd_", False), ("0123abcd-1", False),
])
def test_job_id_pattern(text, ok):
    assert is_job_id(text) is ok


def test_queue_state_filter_takes_names_and_slurm_codes():
    args = get_parser().parse_args(["queue", "--state", "running,PD, cd ,node_fail"])
    assert args.state == [JobState.RUNNING, JobState.PENDING, JobState.COMPLETED, JobState.NODE_FAIL]


# -- queue table ------------------------------------------------------------------------------------

NOW = 1_000_000.0


def _job(job_id: str, state: str, **fields) -> dict:
    job = {"job_id": job_id, "name": None, "user": "alice", "state": state, "reason": None, "gpus": 0,
           "command": "true", "allocation": [], "start_time": None, "end_time": None}
    return {**job, **fields}


JOBS = [
    _job("0123abcd", "RUNNING", name="train-resnet50-on-imagenet-full-run", gpus=3,
         allocation=[{"node_id": "node1", "gpu_indices": [0, 1]}, {"node_id": "node2", "gpu_indices": [0]}],
         start_time=NOW - 3723),
    _job("4567cdef_12", "PENDING", user="bartholomew", command="sleep\n10", gpus=8, reason="Resources"),
    _job("89abef01", "COMPLETED", name="eval", gpus=1, start_time=NOW - 50, end_time=NOW - 45,
         allocation=[{"node_id": "node3", "gpu_indices": [2]}]),
    _job("89abef02", "CANCELLED", end_time=NOW, reason="cancelled while pending"),
    _job("89abef03", "PENDING"),
]


def test_queue_table_columns_and_cells():
    lines = queue_cmd.format_queue(JOBS, NOW, width=200).splitlines()
    assert lines[0].split() == ["ID", "NAME", "USER", "STATE", "TIME", "GPUS", "NODELIST(REASON)"]
    running, pending, done, cancelled, no_reason = (line.split("  ") for line in lines[1:])
    cells = [[cell.strip() for cell in line if cell.strip()] for line in
             (running, pending, done, cancelled, no_reason)]
    assert cells[0] == ["0123abcd", "train-resnet50-on-imagenet-full-run", "alice", "RUNNING", "1:02:03", "3",
                        "node1:0,1 node2:0"]
    # No name: the command stands in, on one line; a user name is cut to 8 characters, marked "+".
    assert cells[1] == ["4567cdef_12", "sleep 10", "barthol+", "PENDING", "0:00", "8", "(Resources)"]
    assert cells[2] == ["89abef01", "eval", "alice", "COMPLETED", "0:05", "1", "node3:2"]
    assert cells[3][-1] == "(cancelled while pending)"        # never ran: why it ended
    assert cells[4][-1] == "(None)"


def test_queue_table_fits_80_columns_and_cuts_with_a_mark():
    lines = queue_cmd.format_queue(JOBS, NOW, width=80).splitlines()
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert lines[0].endswith("NODELIST(REASON)")
    assert lines[1].startswith("0123abcd") and "train-res" in lines[1]
    assert "+" in lines[1].split()[1]                           # the long name is cut, and says so
    assert lines[2].split()[0] == "4567cdef_12"                  # ids are never cut


def test_queue_table_time_column_right_aligned_over_days():
    jobs = [_job("0123abcd", "RUNNING", start_time=NOW - 2 * 86400 - 5), _job("4567cdef", "RUNNING",
                                                                            start_time=NOW - 9)]
    lines = queue_cmd.format_queue(jobs, NOW).splitlines()
    ends = {line.index(text) + len(text) for line, text in zip(lines, ("TIME", "2-00:00:05", "0:09"))}
    assert len(ends) == 1


class ReadKeys(dict):
    """A job dict that records which keys are read from it."""

    read: set = set()

    def __getitem__(self, key):
        ReadKeys.read.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        ReadKeys.read.add(key)
        return super().get(key, default)


def test_queue_table_reads_only_the_fields_it_asks_the_master_for():
    # The master sends the table only TABLE_FIELDS: a key read beyond them would be missing there.
    ReadKeys.read = set()
    queue_cmd.format_queue([ReadKeys(job, extra="not sent") for job in JOBS], NOW, width=120)
    assert ReadKeys.read and ReadKeys.read <= set(queue_cmd.TABLE_FIELDS), ReadKeys.read - set(queue_cmd.TABLE_FIELDS)


def test_queue_table_cuts_a_long_id_of_collapsed_tasks():
    # An array's pending tasks with gaps make a long ARRAYID_[ranges] id: the reason must still show.
    tasks = _job("4567cdef_[1,4,9-11,15,20,22,30-33]", "PENDING", reason="Priority", tasks=12)
    line = queue_cmd.format_queue([tasks], NOW, width=80).splitlines()[1]
    assert line.startswith("4567cdef_[1,4,9-11,15,2+ ") and line.endswith("(Priority)") and len(line) <= 80


def test_queue_table_without_jobs_is_the_header():
    assert queue_cmd.format_queue([], NOW).split() == ["ID", "NAME", "USER", "STATE", "TIME", "GPUS",
                                                       "NODELIST(REASON)"]


# -- nodes listing ----------------------------------------------------------------------------------

def _gpu(index: int, job_id=None, simulated=False, memory_mb=143771, name="NVIDIA H200") -> dict:
    return {"index": index, "name": name, "uuid": f"GPU-{index}", "memory_mb": memory_mb,
            "simulated": simulated, "job_id": job_id, "free": job_id is None}


NODES = [
    {"node_id": "node1", "state": "UP", "status": "mixed", "drain_reason": None,
     "gpus": [_gpu(0, "0123abcd"), _gpu(1)]},
    {"node_id": "node2", "state": "UP", "status": "drained", "drain_reason": "fan replacement " * 10,
     "gpus": [_gpu(0, simulated=True, memory_mb=16384, name="Simulated GPU"),
              _gpu(1, "4567cdef_3", simulated=True, memory_mb=512, name="Simulated GPU")]},
    {"node_id": "node3", "state": "DOWN", "status": "down", "drain_reason": None, "gpus": [_gpu(0)]},
    {"node_id": "cpu1", "state": "UP", "status": "idle", "drain_reason": None, "gpus": []},
]


def test_nodes_listing():
    lines = nodes_cmd.format_nodes(NODES, width=80).splitlines()
    assert all(len(line) <= 80 for line in lines), "\n".join(lines)
    assert lines[0].split() == ["NODE", "STATUS", "FREE/TOTAL", "REASON"]
    assert lines[1].split() == ["node1", "mixed", "1/2"]
    assert lines[2].split() == ["GPU", "0", "NVIDIA", "H200", "140.4G", "0123abcd"]
    assert lines[3].split() == ["GPU", "1", "NVIDIA", "H200", "140.4G", "-"]
    # A drained node lends no GPU, its reason is cut to the width; simulated GPUs say so.
    assert lines[4].split()[:4] == ["node2", "drained", "0/2", "fan"] and lines[4].endswith("+")
    assert lines[5].split() == ["GPU", "0", "Simulated", "GPU", "16G", "simulated", "-"]
    assert lines[6].split() == ["GPU", "1", "Simulated", "GPU", "512M", "simulated", "4567cdef_3"]
    assert lines[7].split() == ["node3", "down", "0/1"]
    assert lines[9].split() == ["cpu1", "idle", "0/0"] and len(lines) == 10
    assert all(line.startswith("  GPU") for line in (lines[2], lines[3], lines[5], lines[6], lines[8]))


# -- show -------------------------------------------------------------------------------------------

SHOWN = {**JOBS[0], "cwd": "/home/alice", "node_gpu_ids": None, "interactive": False, "priority": -2,
         "time_limit": 7200, "requeue": True, "requeue_count": 1, "after": ["aaaaaaaa", "bbbbbbbb_1"],
         "after_any": False, "array_job_id": None, "array_task_id": None, "submit_time": NOW - 4000,
         "exit_code": None, "signal": None, "added_later": {"x": 1},
         "outputs": [{"rank": 0, "stream": "stdout", "size": 1536}, {"rank": 0, "stream": "stderr", "size": 0},
                     {"rank": 1, "stream": "stdout", "size": 5 * 2 ** 20}, {"rank": 1, "stream": "stderr",
                                                                             "size": 12}]}


def test_show_prints_every_field():
    lines = show_cmd.format_job(SHOWN, NOW).splitlines()
    fields = dict(line.split(": ", 1) for line in lines)
    assert len(fields) == len(lines) == len(SHOWN) + 1              # every field, plus RunTime
    assert fields["JobId"] == "0123abcd" and fields["State"] == "RUNNING"
    assert fields["Allocation"] == "node1:0,1 (rank 0), node2:0 (rank 1)"
    assert fields["SubmitTime"] == time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(NOW - 4000))
    assert fields["EndTime"] == "-" and fields["RunTime"] == "1:02:03" and fields["TimeLimit"] == "2:00:00"
    assert (fields["Requeue"], fields["RequeueCount"], fields["After"]) == ("yes", "1", "aaaaaaaa:bbbbbbbb_1")
    assert fields["Output"] == "rank 0: stdout 1.5 KiB, stderr 0 B; rank 1: stdout 5.0 MiB, stderr 12 B"
    assert fields["AddedLater"] == '{"x": 1}'                     # a field this CLI does not know yet
    assert lines.index("RunTime: 1:02:03") == lines.index("EndTime: -") + 1


def test_show_without_time_limit():
    assert "TimeLimit: UNLIMITED" in show_cmd.format_job({**SHOWN, "time_limit": None}, NOW).splitlines()


# -- wait's exit status -----------------------------------------------------------------------------

@pytest.mark.parametrize("state, exit_code, signal, status", [
    ("FAILED", 3, None, 3),
    ("CANCELLED", None, 15, 143),
    ("TIMEOUT", None, 9, 137),
    ("CANCELLED", None, None, 1),      # cancelled while pending: no exit code of its own
    ("NODE_FAIL", None, None, 1),
    ("CANCELLED", 0, None, 1),         # a job that caught SIGTERM and exited 0 did not complete
])
def test_wait_exit_status(state, exit_code, signal, status):
    assert wait_cmd.exit_status(_job("0123abcd", state, exit_code=exit_code, signal=signal)) == status


@pytest.mark.parametrize("fields, text", [
    ({"state": "FAILED", "exit_code": 3, "signal": None}, "job 0123abcd FAILED: exit code 3"),
    ({"state": "TIMEOUT", "exit_code": None, "signal": 9, "reason": "time limit 1:00 reached"},
     "job 0123abcd TIMEOUT: time limit 1:00 reached"),
    ({"state": "CANCELLED", "exit_code": None, "signal": 15}, "job 0123abcd CANCELLED: killed by signal 15"),
    ({"state": "NODE_FAIL", "exit_code": None, "signal": None}, "job 0123abcd NODE_FAIL"),
])
def test_ending_line(fields, text):
    assert ending(_job("0123abcd", "PENDING") | fields) == text


# -- the real CLI, no daemon ------------------------------------------------------------------------

def test_help_loads_neither_zmq_nor_yaml():
    proc = _cli("-X", "importtime", "-m", "zmgpu.cli.main", "--help")
    assert proc.returncode == 0 and "usage: zmgpu" in proc.stdout
    loaded = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "zmgpu.cli.submit" in loaded
    assert not {"zmq", "yaml"} & loaded


@pytest.mark.parametrize("argv, environ", [
    (["--host", "bad host", "queue"], {}),
    (["logs", "0123abcd"], {"ZMGPU_MASTER": "bad host:8080"}),
])
def test_malformed_master_address_is_one_line_and_exit_2(argv, environ):
    proc = _cli("-m", "zmgpu.cli.main", *argv, env_extra=environ)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.count("\n") == 1 and "tcp://bad host:8080" in proc.stderr, proc.stderr


def test_unreachable_master_is_one_line_and_exit_1():
    # A bound socket that never listens: connecting to it is refused, so nobody answers.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        proc = _cli("-m", "zmgpu.cli.main", "--port", str(port), "queue", "--connection-timeout", "0.5")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and f"tcp://127.0.0.1:{port}" in proc.stderr
    assert proc.stderr.startswith("zmgpu: no answer")


def test_a_queue_of_chosen_fields_refuses_a_string_before_asking():
    from zmgpu import Client

    with Client(host="127.0.0.1", port=9, default_keys=False) as client:   # nothing listens there: no request
        with pytest.raises(TypeError, match="not a string"):
            client.queue(fields="job_id")
        with pytest.raises(ValueError, match="'foriegn'"):
            client.queue(nodes="foriegn")
