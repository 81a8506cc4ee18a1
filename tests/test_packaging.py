"""Tests of what ships beside the code: man pages, example config files, systemd units, entry points, examples."""

from __future__ import annotations

import configparser
import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from zmgpu import manpages
from zmgpu.config import ClientConfig, MasterConfig, NodeConfig, load_config

REPO = Path(__file__).resolve().parent.parent
CONFIGS = {"master.yaml": MasterConfig, "node.yaml": NodeConfig, "client.yaml": ClientConfig}
#: The systemd set-up keeps state under /var/lib (the units' StateDirectory), not in a home directory.
SYSTEMD_STATE_DIRS = {"master.yaml": "/var/lib/zmgpu/master", "node.yaml": "/var/lib/zmgpu/node"}
UNITS = {"zmgpu-master.service": "master", "zmgpu-node.service": "node"}


# -- man pages --------------------------------------------------------------------------------------

@pytest.mark.parametrize("page", manpages.PAGES, ids=lambda page: page.filename)
def test_committed_man_page_matches_its_parser(page):
    committed = (REPO / "man" / page.filename).read_text()
    assert manpages.render(page) == committed, (
        f"man/{page.filename} is out of date with {page.module}.get_parser(): run python -m zmgpu.manpages")


def test_man_page_rendering_ignores_terminal_width_and_program_name(monkeypatch):
    page = manpages.PAGES[0]
    expected = manpages.render(page)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setattr(sys, "argv", ["some-runner"])
    assert manpages.render(page) == expected
    assert sys.argv == ["some-runner"]


def test_man_page_check_reports_a_stale_page(tmp_path):
    man_dir = tmp_path / "man"
    write = subprocess.run([sys.executable, "-m", "zmgpu.manpages", "--man-dir", str(man_dir)],
                           cwd=REPO, capture_output=True, text=True)
    assert write.returncode == 0, write.stderr
    assert sorted(p.name for p in man_dir.iterdir()) == sorted(page.filename for page in manpages.PAGES)
    stale = man_dir / "zmgpu-node.8"
    stale.write_text(stale.read_text() + '.\\" edited by hand\n')
    check = subprocess.run([sys.executable, "-m", "zmgpu.manpages", "--check", "--man-dir", str(man_dir)],
                           cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 1
    assert check.stderr.strip().count("\n") == 0 and "zmgpu-node.8" in check.stderr, check.stderr


# -- example configuration files --------------------------------------------------------------------

@pytest.mark.parametrize("name", CONFIGS)
def test_config_file_loads_and_names_every_key_with_its_default(name):
    cls, path = CONFIGS[name], REPO / "conf" / name
    loaded = load_config(cls, path)  # raises on an unknown key or a wrong type
    keys = yaml.safe_load(path.read_text())
    assert list(keys) == [f.name for f in dataclasses.fields(cls)]
    for key, default in dataclasses.asdict(cls()).items():
        expected = SYSTEMD_STATE_DIRS[name] if key == "state_dir" else default
        assert getattr(loaded, key) == expected, f"conf/{name}: {key}"


@pytest.mark.parametrize("name", CONFIGS)
def test_config_file_explains_every_key_in_one_comment_line(name):
    lines = (REPO / "conf" / name).read_text().splitlines()
    for number, line in enumerate(lines):
        if re.match(r"\w+:", line):
            assert lines[number - 1].startswith("# "), f"conf/{name}:{number + 1}: no comment above '{line}'"
            assert not lines[number - 2].startswith("#"), f"conf/{name}:{number + 1}: more than one line"


# -- systemd units -----------------------------------------------------------------------------------

def _unit(name: str) -> dict[str, dict[str, str]]:
    parser = configparser.ConfigParser(interpolation=None, strict=True)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string((REPO / "conf" / name).read_text())
    return {section: dict(parser[section]) for section in parser.sections()}


@pytest.mark.parametrize("name", UNITS)
def test_unit_runs_from_its_yaml(name):
    role, service = UNITS[name], _unit(name)["Service"]
    assert service["ExecStart"].split()[1:] == ["--config", f"/etc/zmgpu/{role}.yaml"]
    assert service["StateDirectory"] == f"zmgpu/{role}"
    assert service["Restart"] == "on-failure"


def test_master_unit_runs_unprivileged_and_reloads_keys_on_sighup():
    service = _unit("zmgpu-master.service")["Service"]
    assert service.get("User", "root") not in ("root", "0"), "a unit without User= runs as root"
    assert service.get("Group", "root") not in ("root", "0")
    assert "-HUP" in service["ExecReload"]


def test_node_unit_runs_as_root_to_start_jobs_as_their_users():
    # A root agent is the only kind that can start each job as its submitter (see zmgpu.node.users).
    assert "User" not in _unit("zmgpu-node.service")["Service"]


def test_master_unit_binds_loopback_unless_its_yaml_says_otherwise():
    assert "--host" not in _unit("zmgpu-master.service")["Service"]["ExecStart"]
    assert load_config(MasterConfig, REPO / "conf" / "master.yaml").host == "127.0.0.1"


def test_node_unit_restart_leaves_jobs_running():
    assert _unit("zmgpu-node.service")["Service"]["KillMode"] == "process"


# -- packaging ---------------------------------------------------------------------------------------

def _setup_cfg() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "setup.cfg")
    return parser


def test_console_scripts_name_real_functions():
    scripts = dict(line.split(" = ") for line in
                   _setup_cfg()["options.entry_points"]["console_scripts"].strip().splitlines())
    assert set(scripts) == {"zmgpu", "zmgpu-master", "zmgpu-node"}
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_every_man_page_is_installed():
    data_files = _setup_cfg()["options.data_files"]
    installed = {(section, Path(path).name) for section in data_files for path in data_files[section].split()}
    assert installed == {(f"share/man/man{page.section}", page.filename) for page in manpages.PAGES}


# -- examples ----------------------------------------------------------------------------------------

def test_torch_load_example_runs_with_or_without_torch():
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "torch_load.py"), "--seconds", "0.2",
                           "--size", "64"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch" in proc.stdout and "Traceback" not in proc.stderr
