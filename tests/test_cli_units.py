"""Unit tests of the ``zmgpu`` command line's pure parts: arguments, settings precedence, queue tables.

The two tests that run the real CLI as a subprocess talk to no daemon: one checks
the start-up imports, the other a master that never answers.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from zmgpu.cli import queue as queue_cmd
from zmgpu.cli.common import UsageError, client_config, port_number, positive_int, seconds
from zmgpu.cli.main import get_parser
from zmgpu.cli.submit import command_line
from zmgpu.config import ClientConfig, ConfigError

REPO = Path(__file__).resolve().parent.parent


def _cli(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("ZMGPU_MASTER", "ZMGPU_CONFIG")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=timeout)


# -- command line of submit -------------------------------------------------------------------------

@pytest.mark.parametrize("words, expected", [
    (["echo $HOME | wc -c"], "echo $HOME | wc -c"),                      # one string: for /bin/sh
    (["--", "python", "train.py", "--lr", "3"], "python train.py --lr 3"),
    (["--", "my prog", "it's"], "'my prog' 'it'\"'\"'s'"),               # each word stays one argument
    (["--", "echo $HOME"], "'echo $HOME'"),                               # after --, no shell expansion
    (["python", "train.py"], "python train.py"),
])
def test_command_line(words, expected):
    assert command_line(words) == expected


@pytest.mark.parametrize("words", [[], ["--"]])
def test_command_line_missing(words):
    with pytest.raises(UsageError):
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


# -- queue tables -----------------------------------------------------------------------------------

NOW = 1_000_000.0

LISTING = {
    "jobs": [
        {"job_id": "0123abcd", "state": "RUNNING", "user": "alice", "reason": None,
         "command": "python train.py --epochs 100 " + "--flag " * 30,
         "allocation": [{"node_id": "node1", "gpu_indices": [0, 1]}, {"node_id": "node2", "gpu_indices": [0]}],
         "start_time": NOW - 3723, "end_time": None},
        {"job_id": "4567cdef", "state": "PENDING", "user": "bob", "reason": "Resources",
         "command": "sleep\n10", "allocation": [], "start_time": None, "end_time": None},
        {"job_id": "89abef01", "state": "COMPLETED", "user": "carol", "reason": None, "command": "true",
         "allocation": [{"node_id": "node3", "gpu_indices": []}], "start_time": NOW - 50, "end_time": NOW - 45},
    ],
    "nodes": [
        {"node_id": "node1", "state": "UP", "gpus": [
            {"index": i, "name": "NVIDIA H200", "simulated": False, "job_id": "0123abcd" if i < 2 else None}
            for i in range(8)]},
        {"node_id": "node2", "state": "DOWN", "gpus": [
            {"index": 0, "name": "Simulated GPU", "simulated": True, "job_id": "0123abcd"},
            {"index": 1, "name": "Simulated GPU", "simulated": True, "job_id": None}]},
        {"node_id": "node3", "state": "UP", "gpus": []},
    ],
}


def test_queue_table_rows():
    text = queue_cmd.format_queue(LISTING, NOW, width=80)
    lines = text.splitlines()
    assert lines[0].split() == list(queue_cmd.JOB_HEADERS)
    running, pending, done = lines[1:4]
    assert running.split()[:5] == ["0123abcd", "RUNNING", "alice", "node1:0,1", "node2:0"]
    assert "1:02:03" in running and running.endswith("...")
    assert pending.split()[:5] == ["4567cdef", "PENDING", "bob", "(Resources)", "0:00:00"]
    assert pending.endswith("sleep 10")
    assert done.split()[3:5] == ["node3", "0:00:05"]
    assert all(len(line) <= 80 for line in lines)


def test_nodes_table_counts_and_marks_simulated():
    lines = queue_cmd.format_queue(LISTING, NOW, width=80).splitlines()
    nodes = lines[lines.index("") + 1:]
    assert nodes[0].split() == list(queue_cmd.NODE_HEADERS)
    assert nodes[1].split() == ["node1", "UP", "6/2/8", "8", "x", "NVIDIA", "H200"]
    assert nodes[2].split() == ["node2", "DOWN", "0/1/2", "2", "x", "simulated"]   # a down node lends nothing
    assert nodes[3].split() == ["node3", "UP", "0/0/0", "-"]


def test_elapsed_format():
    assert queue_cmd.elapsed(None, None, NOW) == "0:00:00"
    assert queue_cmd.elapsed(NOW - 59, None, NOW) == "0:00:59"
    assert queue_cmd.elapsed(NOW - 100 * 3600, NOW - 1, NOW) == "99:59:59"


# -- the real CLI, no daemon ------------------------------------------------------------------------

def test_help_loads_neither_zmq_nor_yaml():
    proc = _cli("-X", "importtime", "-m", "zmgpu.cli.main", "--help")
    assert proc.returncode == 0 and "usage: zmgpu" in proc.stdout
    loaded = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "zmgpu.cli.submit" in loaded
    assert not {"zmq", "yaml"} & loaded


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
