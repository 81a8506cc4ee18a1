"""Tests of zmgpu.config: defaults, YAML files, flag precedence and the errors a user sees."""

import argparse
import dataclasses
import json
import sys

import pytest

from zmgpu.config import (ClientConfig, ConfigError, MasterConfig, NodeConfig, load_config,
                          parse_master_address)
from zmgpu.daemon import load_or_exit
from zmgpu.protocol import MsgType


def _write(tmp_path, text, name="conf.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(cls, path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(cls, path, overrides)
    return str(info.value)


def test_defaults_need_no_file():
    master = load_config(MasterConfig, None)
    assert (master.host, master.port, master.pub_port) == ("127.0.0.1", 8080, None)
    assert (master.heartbeat_interval, master.node_timeout, master.kill_grace) == (1.0, 5.0, 10.0)
    node = load_config(NodeConfig, None)
    assert (node.master_host, node.master_port, node.node_id) == ("127.0.0.1", 8080, None)
    assert (node.simulate_gpus, node.master_timeout) == (None, 5.0)
    client = load_config(ClientConfig, None)
    assert (client.session_timeout, client.connection_timeout, client.max_wait_time,
            client.max_consecutive_timeouts) == (7200.0, 30.0, 300.0, 30)


def test_state_dirs_follow_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert load_config(MasterConfig, None).state_dir == str(tmp_path / "zmgpu" / "master")
    assert load_config(NodeConfig, None).state_dir == str(tmp_path / "zmgpu" / "node")


def test_file_values_replace_defaults(tmp_path):
    path = _write(tmp_path, "host: 0.0.0.0\nport: 9000\npub_port: 9100\nnode_timeout: 3\nverbose: true\n")
    cfg = load_config(MasterConfig, path)
    assert (cfg.host, cfg.port, cfg.pub_port, cfg.verbose) == ("0.0.0.0", 9000, 9100, True)
    assert cfg.node_timeout == 3.0 and isinstance(cfg.node_timeout, float)
    assert cfg.kill_grace == 10.0  # untouched keys keep their default


def test_optional_keys_accept_null(tmp_path):
    cfg = load_config(NodeConfig, _write(tmp_path, "simulate_gpus: null\nnode_id: gpu07\n"))
    assert (cfg.simulate_gpus, cfg.node_id) == (None, "gpu07")


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file_means_defaults(tmp_path, text):
    assert load_config(ClientConfig, _write(tmp_path, text)) == ClientConfig()


def test_flags_beat_the_file_and_untouched_flags_do_not(tmp_path):
    path = _write(tmp_path, "port: 9000\nheartbeat_interval: 0.5\nverbose: true\n")
    # None is what argparse leaves for a flag the user did not give; unrelated names are ignored.
    flags = {"port": 9999, "heartbeat_interval": None, "verbose": None, "config": str(path), "command": "x"}
    cfg = load_config(MasterConfig, path, flags)
    assert (cfg.port, cfg.heartbeat_interval, cfg.verbose) == (9999, 0.5, True)


def test_flags_alone_beat_defaults():
    cfg = load_config(NodeConfig, None, {"simulate_gpus": 4, "node_id": "n1", "master_port": 9001})
    assert (cfg.simulate_gpus, cfg.node_id, cfg.master_port) == (4, "n1", 9001)


def test_broken_yaml_names_file_and_line(tmp_path):
    path = _write(tmp_path, "port: 9000\nhost: [unclosed\n")
    msg = _error(MasterConfig, path)
    assert str(path) in msg and "YAML" in msg and "line" in msg
    assert "\n" not in msg


def test_unknown_key_names_file_and_key(tmp_path):
    path = _write(tmp_path, "port: 9000\nheartbeat_intervall: 2\n")
    msg = _error(MasterConfig, path)
    assert str(path) in msg and "'heartbeat_intervall'" in msg and "unknown key" in msg
    assert "heartbeat_interval" in msg  # the known keys are listed, so the typo is easy to spot


@pytest.mark.parametrize("cls, text, key, expected", [
    (MasterConfig, "port: eighty\n", "port", "an integer"),
    (MasterConfig, "port: true\n", "port", "an integer"),
    (MasterConfig, "port: 80.5\n", "port", "an integer"),
    (MasterConfig, "node_timeout: soon\n", "node_timeout", "a number"),
    (MasterConfig, "verbose: 1\n", "verbose", "true or false"),
    (MasterConfig, "host: 127\n", "host", "a string"),
    (NodeConfig, "simulate_gpus: [4]\n", "simulate_gpus", "an integer or a string or null"),
    (NodeConfig, "master_port: [1]\n", "master_port", "an integer"),
    (ClientConfig, "max_consecutive_timeouts: 2.5\n", "max_consecutive_timeouts", "an integer"),
])
def test_wrong_type_names_file_key_and_expected_type(tmp_path, cls, text, key, expected):
    path = _write(tmp_path, text)
    msg = _error(cls, path)
    assert str(path) in msg and f"'{key}'" in msg and f"must be {expected}," in msg


def test_top_level_must_be_a_mapping(tmp_path):
    path = _write(tmp_path, "- port\n- 9000\n")
    msg = _error(MasterConfig, path)
    assert str(path) in msg and "mapping" in msg


def test_missing_file_is_a_config_error(tmp_path):
    path = tmp_path / "absent.yaml"
    assert str(path) in _error(MasterConfig, path)


def test_load_or_exit_prints_one_line_and_exits_2(tmp_path, capsys):
    path = _write(tmp_path, "port: eighty\n")
    args = argparse.Namespace(config=str(path), port=None, verbose=None)
    with pytest.raises(SystemExit) as info:
        load_or_exit(MasterConfig, args, "zmgpu-master")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("zmgpu-master: ") and err.count("\n") == 1
    assert str(path) in err and "'port'" in err


def test_load_or_exit_merges_flags(tmp_path):
    path = _write(tmp_path, "port: 9000\nkill_grace: 4\n")
    args = argparse.Namespace(config=str(path), port=None, kill_grace=1.5, verbose=None)
    cfg = load_or_exit(MasterConfig, args, "zmgpu-master")
    assert (cfg.port, cfg.kill_grace, cfg.verbose) == (9000, 1.5, False)


@pytest.mark.parametrize("text, expected", [
    ("gpu-master:8080", ("gpu-master", 8080)),
    ("10.0.0.5:9000", ("10.0.0.5", 9000)),
    ("[::1]:8080", ("::1", 8080)),
])
def test_parse_master_address(text, expected):
    assert parse_master_address(text) == expected


@pytest.mark.parametrize("text", ["gpu-master", ":8080", "host:", "host:eighty"])
def test_parse_master_address_rejects(text):
    with pytest.raises(ConfigError) as info:
        parse_master_address(text)
    assert text in str(info.value) and "host:port" in str(info.value)


@pytest.mark.parametrize("cls", [MasterConfig, NodeConfig, ClientConfig])
def test_every_key_round_trips_through_yaml(tmp_path, cls):
    """Dumping a config's own values as YAML and loading them back changes nothing."""
    import yaml

    cfg = cls()
    path = _write(tmp_path, yaml.safe_dump(dataclasses.asdict(cfg)))
    assert load_config(cls, path) == cfg


# -- the programs themselves: a bad file is exit 2 and one line, never a traceback ----------------

MASTER = [sys.executable, "-m", "zmgpu.master"]
CLIENT = [sys.executable, "-m", "zmgpu.cli.main"]
PROGRAMS = {
    "master": [*MASTER, "--port", "0", "--pub-port", "0"],
    "node": [sys.executable, "-m", "zmgpu.node", "--node-id", "cfgtest", "--simulate-gpus", "1"],
    "client": CLIENT,
}
PROGRAM_TAIL = {"master": [], "node": [], "client": ["queue"]}
BAD_FILES = {
    "syntax": ("port: [unclosed\n", ["YAML", "line"]),
    "unknown key": ("no_such_key: 1\n", ["'no_such_key'"]),
}
#: A key of each program's config with the wrong type, and the expected type named in the message.
WRONG_TYPE = {
    "master": ("node_timeout: soon\n", ["'node_timeout'", "a number"]),
    "node": ("master_port: eighty\n", ["'master_port'", "an integer"]),
    "client": ("connection_timeout: soon\n", ["'connection_timeout'", "a number"]),
}


@pytest.mark.parametrize("program", list(PROGRAMS))
@pytest.mark.parametrize("problem", [*BAD_FILES, "wrong type"])
def test_program_rejects_bad_config_file(tmp_path, run_program, program, problem):
    text, needles = WRONG_TYPE[program] if problem == "wrong type" else BAD_FILES[problem]
    path = _write(tmp_path, text, f"{program}.yaml")
    proc = run_program([*PROGRAMS[program], "--config", str(path), *PROGRAM_TAIL[program]])
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    assert str(path) in err
    for needle in needles:
        assert needle in err


# -- the programs themselves: the file is honoured and flags win over it --------------------------


def _queue_ok(proc):
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_client_reads_the_master_from_its_file(pair, run_program, tmp_path):
    path = _write(tmp_path, f"host: 127.0.0.1\nport: {pair.port}\npub_port: {pair.pub_port}\n"
                            f"connection_timeout: 5\n")
    proc = run_program([*CLIENT, "--config", str(path), "queue", "--json"])
    assert {n["node_id"] for n in _queue_ok(proc)["nodes"]} == {"n1", "n2"}
    # $ZMGPU_CONFIG names the file when --config does not.
    proc = run_program([*CLIENT, "queue", "--json"], env_extra={"ZMGPU_CONFIG": str(path)})
    assert {n["node_id"] for n in _queue_ok(proc)["nodes"]} == {"n1", "n2"}


def test_client_precedence_flags_then_environment_then_file(pair, run_program, tmp_path):
    dead = _write(tmp_path, "host: 127.0.0.1\nport: 9\nconnection_timeout: 1\n")
    base = [*CLIENT, "--config", str(dead)]
    via_env = {"ZMGPU_MASTER": f"127.0.0.1:{pair.port}"}
    # ZMGPU_MASTER beats the file.
    _queue_ok(run_program([*base, "--pub-port", str(pair.pub_port), "queue", "--json"], env_extra=via_env))
    # Flags beat ZMGPU_MASTER.
    proc = run_program([*base, "--port", str(pair.port), "queue", "--json"],
                       env_extra={"ZMGPU_MASTER": "127.0.0.1:9"})
    _queue_ok(proc)
    # And the file's value is really used when nothing overrides it.
    proc = run_program([*base, "queue", "--json"])
    assert proc.returncode == 1 and "127.0.0.1:9" in proc.stderr


def test_client_rejects_a_malformed_zmgpu_master(run_program):
    proc = run_program([*CLIENT, "queue"], env_extra={"ZMGPU_MASTER": "gpu-master"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ZMGPU_MASTER" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_master_flags_beat_its_file(bare_cluster, tmp_path):
    # 192.0.2.1 (TEST-NET-1) is never a local address: listening there would fail.
    path = _write(tmp_path, "host: 192.0.2.1\nport: 9\npub_port: 9\n")
    bare_cluster.start_master(0, 0, "--config", str(path), "--host", "127.0.0.1")
    assert bare_cluster.port not in (0, 9)
    assert bare_cluster.request(MsgType.PING)["version"] == 1


def test_master_uses_its_file(run_program, tmp_path):
    # insecure: without keys a master refuses any address beyond loopback before it tries to listen.
    path = _write(tmp_path, "host: 192.0.2.1\nport: 0\npub_port: 0\ninsecure: true\n")
    proc = run_program([*MASTER, "--config", str(path), "--state-dir", str(tmp_path / "s")])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "192.0.2.1" in proc.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("cls, source, key, value", [
    (MasterConfig, "flag", "port", 99999),
    (MasterConfig, "flag", "heartbeat_interval", 0),
    (ClientConfig, "file", "connection_timeout", -5),
    (NodeConfig, "file", "master_port", 0),
])
def test_out_of_range_values_are_refused_naming_where_they_came_from(tmp_path, cls, source, key, value):
    if source == "file":
        path = _write(tmp_path, f"{key}: {value}\n")
        msg = _error(cls, path)
        assert str(path) in msg and f"'{key}'" in msg
    else:
        with pytest.raises(ConfigError) as info:
            load_config(cls, None, {key: value})
        msg = str(info.value)
        assert "--" + key.replace("_", "-") in msg
    assert "must be" in msg and str(value) in msg


@pytest.mark.parametrize("text, env, needle", [
    ("port: 0\n", {}, "key 'port' must be a port number from 1 to 65535, got 0"),
    ("connection_timeout: -5\n", {}, "key 'connection_timeout' must be greater than 0, got -5"),
    ("", {"ZMGPU_MASTER": "gpu-master:0"}, "ZMGPU_MASTER='gpu-master:0': expected host:port (port 1 to 65535)"),
])
def test_command_line_checks_ranges_of_its_file_and_environment(tmp_path, run_program, text, env, needle):
    path = _write(tmp_path, text, "client.yaml")
    proc = run_program([*CLIENT, "--config", str(path), "queue"], env_extra=env)
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.splitlines()) == 1, proc.stderr
