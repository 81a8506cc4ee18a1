"""The node's view of its GPUs: attribution of processes to jobs, what goes to the master, start and release checks.

GPUs are simulated from a YAML file (the one thing faked); the processes are real,
so attribution reads real ``/proc/<pid>/environ`` marks.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import yaml

from zmgpu.node.gpus import SimulatedSource, SimulationError
from zmgpu.node import telemetry as telemetry_module
from zmgpu.node.telemetry import Policy, Telemetry

LOG = logging.getLogger("test.telemetry")


@pytest.fixture
def gpus_file(tmp_path):
    path = tmp_path / "gpus.yaml"

    def write(*gpus: dict):
        path.write_text(yaml.safe_dump({"gpus": [{"memory_mb": 16384, **g} for g in gpus]}))
        return path

    write({})
    return write


@pytest.fixture
def processes():
    """Start real processes, with or without a zmgpu job mark; all killed afterwards."""
    started = []

    def start(job_id: str | None = None) -> int:
        env = {**os.environ}
        env.pop("ZMGPU_JOB_ID", None)
        if job_id:
            env.update(ZMGPU_JOB_ID=job_id, ZMGPU_RESTART_COUNT="0")
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], env=env)
        started.append(proc)
        return proc.pid

    yield start
    for proc in started:
        proc.kill()
        proc.wait()


def telemetry(path, policy: Policy = Policy()) -> Telemetry:
    return Telemetry(SimulatedSource("n1", path=str(path)), policy, LOG)


def test_processes_are_attributed_to_their_job_or_called_foreign(gpus_file, processes):
    ours, theirs = processes("0badcafe"), processes()
    t = telemetry(gpus_file({"processes": [{"pid": ours, "used_mb": 2000}], "foreign_pids": [theirs],
                             "used_mb": 1000}))
    [state] = t.current.values()
    assert state["processes"] == [{"pid": theirs, "used_mb": 0, "job_id": None},
                                  {"pid": ours, "used_mb": 2000, "job_id": "0badcafe"}]
    assert (state["used_mb"], state["foreign_mb"], state["busy"]) == (3000, 1000, True)
    assert t.job_memory("0badcafe", [0]) == 2000


def test_threshold_policy_counts_foreign_memory(gpus_file, processes):
    path = gpus_file({"foreign_pids": [processes()], "used_mb": 900})
    assert not telemetry(path, Policy("threshold", threshold_mb=1024)).current[0]["busy"]
    assert telemetry(path, Policy("exclusive")).current[0]["busy"]


def test_only_changes_beyond_the_dead_band_are_sent(gpus_file):
    path = gpus_file({"used_mb": 100, "temperature": 50})
    t = telemetry(path)
    assert t.snapshot()["0"]["used_mb"] == 100
    assert t.changes() == {}
    gpus_file({"used_mb": 130, "temperature": 51})     # within the band: nothing worth a message
    t.sample()
    assert t.changes() == {}
    gpus_file({"used_mb": 500, "temperature": 51, "healthy": False})
    t.sample()
    owed = {"0": {"used_mb": 500, "foreign_mb": 500, "healthy": False, "health": "simulated as unhealthy"}}
    assert t.changes() == owed
    assert t.changes() == owed      # not delivered (the heartbeat could not go): still owed
    t.delivered(owed)
    assert t.changes() == {}


def test_start_is_refused_on_a_busy_gpu_and_when_declared_memory_does_not_fit(gpus_file, processes):
    path = gpus_file({})
    t = telemetry(path, Policy(reserve_mb=512))
    assert t.refuse_start([0], None, {}) is None
    assert t.refuse_start([0], 8000, {0: 7872}) is None        # 16384 - 512 reserve = 15872 = 7872 + 8000
    assert "7871 MiB left for --gpu-mem jobs" in t.refuse_start([0], 8000, {0: 8001})
    gpus_file({"foreign_pids": [processes()], "used_mb": 2000})
    assert "in use by others" in t.refuse_start([0], None, {})
    assert t.refuse_start([0], 4000, {}) is None                # sharing goes by memory, not by pids


def test_another_rank_of_the_job_ending_on_a_dirty_gpu_keeps_its_wait_for_a_warning(gpus_file, processes):
    pid = processes("0badcafe")
    t = telemetry(gpus_file({"processes": [{"pid": pid, "used_mb": 500}]}))
    t.snapshot()
    assert t.release_check("0badcafe", [0]) == [0]
    warn_at = t.dirty[0].warn_at
    assert t.release_check("0badcafe", [0]) == [0]     # a second rank of the job (--per-gpu) ends there too
    assert t.dirty[0].warn_at == warn_at


def test_a_gpu_dirty_for_long_is_warned_of_once_over_later_looks(gpus_file, processes, monkeypatch, caplog):
    monkeypatch.setattr(telemetry_module, "DIRTY_WARN_AFTER", 0.0)
    pid = processes("0badcafe")
    t = telemetry(gpus_file({"processes": [{"pid": pid, "used_mb": 500}]}))
    t.snapshot()
    assert t.release_check("0badcafe", [0]) == [0]
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            assert t.recheck_dirty() == []
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "still lists" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]


def test_release_check_marks_dirty_until_the_process_is_gone(gpus_file, processes):
    pid = processes("0badcafe")
    t = telemetry(gpus_file({"processes": [{"pid": pid, "used_mb": 500}]}))
    t.snapshot()
    assert t.release_check("0badcafe", [0]) == [0]
    assert t.current[0]["dirty"] == "0badcafe" and list(t.dirty) == [0] and t.dirty_job(0) == "0badcafe"
    assert t.dirty_for("0badcafe", [0, 1]) == [0]
    t.delivered({"0": {"dirty": "0badcafe"}})     # as the agent does once the rank's JOB_ENDED went out
    # The leftover was killed again; the file (NVML) still lists it, so the GPU stays dirty.
    assert t.recheck_dirty() == []
    gpus_file({})
    assert t.recheck_dirty() == [0]
    delta = t.changes()["0"]
    assert t.current[0]["dirty"] is None and "dirty" in delta and delta["dirty"] is None


def test_release_check_ignores_other_jobs_and_foreign_processes(gpus_file, processes):
    t = telemetry(gpus_file({"processes": [{"pid": processes("11111111"), "used_mb": 500}],
                             "foreign_pids": [processes()]}))
    assert t.release_check("0badcafe", [0]) == []


@pytest.mark.parametrize("text, problem", [
    ("gpus: 3\n", "key 'gpus' must be a list"),
    ("gpus:\n  - memory: 1\n", "unknown key 'memory'"),
    ("gpus:\n  - healthy: 1\n", "gpus[0].healthy must be bool"),
    ("gpus:\n  - foreign_pids: [x]\n", "foreign_pids must be a list of process ids"),
    ("gpus: [\n", "not valid YAML"),
])
def test_bad_simulation_file_names_file_and_problem(tmp_path, text, problem):
    path = tmp_path / "gpus.yaml"
    path.write_text(text)
    with pytest.raises(SimulationError, match=None) as caught:
        SimulatedSource("n1", path=str(path))
    assert str(path) in str(caught.value) and problem in str(caught.value)


def test_a_file_broken_while_running_keeps_the_last_good_sample(gpus_file, tmp_path):
    path = gpus_file({"used_mb": 700})
    source = SimulatedSource("n1", path=str(path))
    path.write_text("gpus: [\n")
    assert source.sample()[0].used_mb == 700
