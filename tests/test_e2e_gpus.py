"""GPU truth end to end: foreign processes, --gpu-mem packing, the release check, GPU health.

The node simulates its GPUs from a YAML file it reads again at every heartbeat,
so a test steers what "NVML" reports while the real master and node run.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import Cluster, make_cluster, poll, written

GPU_MB = 16384


class SimGpus:
    """The simulated-GPU file of a node; every change is written whole (a rename), as a node must never
    read half of it."""

    def __init__(self, path: Path, count: int = 1):
        self.path = path
        self.gpus = [{"name": "Simulated A100", "memory_mb": GPU_MB} for _ in range(count)]
        self.write()

    def set(self, index: int = 0, **fields) -> None:
        self.gpus[index] = {"name": "Simulated A100", "memory_mb": GPU_MB, **fields}
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump({"gpus": self.gpus}))
        os.replace(tmp, self.path)


def listing(cluster: Cluster, *args: str) -> str:
    """What ``zmgpu ARGS`` prints on a terminal wide enough for whole reasons."""
    return cluster.cli(*args, env={"COLUMNS": "160"}).stdout


def gpu(cluster: Cluster, node_id: str = "n1", index: int = 0) -> dict:
    return cluster.node(node_id)["gpus"][index]


def wait_gpu(cluster: Cluster, check, what: str, node_id: str = "n1", index: int = 0, timeout: float = 20) -> dict:
    return poll(lambda: (lambda g: g if check(g) else None)(gpu(cluster, node_id, index)), timeout, what)


def wait_reason(cluster: Cluster, job_id: str, reason: str, timeout: float = 20) -> dict:
    return poll(lambda: (lambda j: j if j["state"] == "PENDING" and j["reason"] == reason else None)(
        cluster.job(job_id)), timeout, f"job {job_id} pending with reason {reason}")


@pytest.fixture
def sim_cluster(tmp_path):
    """A master and node n1 whose one GPU (16 GiB) is described by a file the test changes."""
    sim = SimGpus(tmp_path / "gpus.yaml")
    for cluster in make_cluster(tmp_path / "cluster", {"n1": str(sim.path)}):
        yield cluster, sim


@pytest.fixture
def colleague():
    """A process on "the GPU" that zmgpu did not start."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc.pid
    proc.kill()
    proc.wait()


def test_foreign_process_keeps_an_exclusive_job_off_until_it_goes(sim_cluster, colleague):
    cluster, sim = sim_cluster
    sim.set(0, foreign_pids=[colleague], used_mb=3000, utilization=80, temperature=70)
    seen = wait_gpu(cluster, lambda g: g.get("busy"), "the foreign process reported")
    assert seen["processes"] == [{"pid": colleague, "used_mb": 0, "job_id": None}]
    assert (seen["foreign_mb"], seen["utilization"], seen["temperature"]) == (3000, 80, 70)
    assert f"others: pid {colleague}" in listing(cluster, "nodes")
    job_id = cluster.submit("true", "--gpus", "1")
    wait_reason(cluster, job_id, "GPUsInUseByOthers")
    assert f"n1 GPU 0 in use by others: pid {colleague}" in listing(cluster, "queue")
    with cluster.client() as client:
        assert [n["node_id"] for n in client.queue(nodes="foreign")["nodes"]] == ["n1"]
    sim.set(0)   # the colleague's process ended
    assert cluster.wait_job_state(job_id, ["COMPLETED"])["allocation"] == [{"node_id": "n1", "gpu_indices": [0]}]
    with cluster.client() as client:
        assert client.queue(nodes="foreign")["nodes"] == []
    assert "in use by" not in listing(cluster, "queue")


def test_threshold_policy_lets_small_foreign_use_pass(bare_cluster, tmp_path, colleague):
    sim = SimGpus(tmp_path / "gpus.yaml")
    sim.set(0, foreign_pids=[colleague], used_mb=800)
    config = tmp_path / "node.yaml"
    config.write_text("foreign_policy: threshold\nforeign_threshold_mb: 1024\n")
    bare_cluster.start_master()
    bare_cluster.start_node("n1", str(sim.path), "--config", str(config))
    bare_cluster.wait_nodes_up(1)
    assert bare_cluster.wait_job_state(bare_cluster.submit("true", "--gpus", "1"), ["COMPLETED"])
    sim.set(0, foreign_pids=[colleague], used_mb=2000)
    wait_gpu(bare_cluster, lambda g: g.get("busy"), "foreign use over the threshold")
    wait_reason(bare_cluster, bare_cluster.submit("true", "--gpus", "1"), "GPUsInUseByOthers")


def test_agent_checks_again_before_start_and_requeues(bare_cluster, tmp_path, colleague):
    """The master has not heard of the foreign process yet (heartbeats are slow here): the node refuses
    the start and the job goes back to the queue, not FAILED."""
    sim = SimGpus(tmp_path / "gpus.yaml")
    bare_cluster.start_master(0, 0, "--heartbeat-interval", "60", "--node-timeout", "300",
                              "--node-dead-timeout", "300")
    bare_cluster.start_node("n1", str(sim.path))
    bare_cluster.wait_nodes_up(1)
    sim.set(0, foreign_pids=[colleague])
    job_id = bare_cluster.submit("true", "--gpus", "1")
    job = wait_reason(bare_cluster, job_id, "GPUsInUseByOthers")
    assert job["attempt"] >= 1   # it was dispatched once, and refused
    assert "not started: GPU 0 is in use by others" in bare_cluster.nodes["n1"].log.read_text()


def test_gpu_mem_jobs_share_a_gpu_and_one_that_does_not_fit_waits(sim_cluster):
    cluster, _ = sim_cluster
    a, b, c = (cluster.submit("sleep 300", "--gpus", "1", "--gpu-mem", "6G") for _ in range(3))
    for job_id in (a, b):
        assert cluster.wait_job_state(job_id, ["RUNNING"])["allocation"][0]["gpu_indices"] == [0]
    # 16 GiB less the 512 MiB reserve holds two 6 GiB jobs, not three.
    wait_reason(cluster, c, "Resources")
    shared = gpu(cluster)
    assert sorted(shared["shared_by"]) == sorted([a, b]) and shared["room_mb"] == GPU_MB - 512 - 2 * 6144
    assert f"shared: {a},{b}" in listing(cluster, "nodes") or f"shared: {b},{a}" in listing(cluster, "nodes")
    exclusive = cluster.submit("true", "--gpus", "1")
    cluster.cli("cancel", a)
    assert cluster.wait_job_state(c, ["RUNNING"])["gpu_mem_mb"] == 6144
    assert cluster.job(exclusive)["state"] == "PENDING"   # a shared GPU is no one's own
    cluster.cli("cancel", b, c)
    cluster.wait_job_state(exclusive, ["COMPLETED"])


def test_release_check_marks_a_gpu_dirty_until_the_jobs_processes_are_gone(sim_cluster, tmp_path):
    cluster, sim = sim_cluster
    pid_file = tmp_path / "job.pid"
    job_id = cluster.submit(f"echo $$ > {pid_file}; exec sleep 300", "--gpus", "1")
    pid = int(written(pid_file))
    sim.set(0, processes=[{"pid": pid, "used_mb": 3000}])
    wait_gpu(cluster, lambda g: g.get("processes") == [{"pid": pid, "used_mb": 3000, "job_id": job_id}],
             "the job's process attributed to it")
    cluster.cli("cancel", job_id)
    cluster.wait_job_state(job_id, ["CANCELLED"])
    # NVML (the file) still lists the process: the GPU must not go to anyone.
    dirty = wait_gpu(cluster, lambda g: g.get("dirty") == job_id, "the GPU marked dirty")
    assert dirty["unavailable"].startswith("dirty:") and dirty["job_id"] is None
    assert f"dirty: job {job_id}" in listing(cluster, "nodes")
    assert cluster.job(job_id)["peak_gpu_mem_mb"] == 3000
    assert "PeakGpuMem:" in cluster.cli("show", job_id).stdout
    waiting = cluster.submit("true", "--gpus", "1")
    wait_reason(cluster, waiting, "GPUsInUseByOthers")
    # A moment of it is routine (the driver takes a cancelled CUDA process's memory back): said as INFO.
    node_log = cluster.nodes["n1"].log
    marked = [line for line in node_log.read_text().splitlines() if f"job {job_id} ended but GPU(s) 0" in line]
    assert len(marked) == 1 and " INFO " in marked[0], marked
    # Held on, it is a warning (that it comes once however many looks follow: test_telemetry).
    lingering = f"GPU 0 still lists process(es) {pid} of job {job_id} over"
    poll(lambda: lingering in node_log.read_text(), 30, "the warning of a GPU dirty for long")
    # Still held at later looks (the master hears of one through a heartbeat: rechecks come every 0.1 s).
    sim.set(0, processes=[{"pid": pid, "used_mb": 3500}])
    wait_gpu(cluster, lambda g: [p["used_mb"] for p in g.get("processes") or ()] == [3500], "a later look")
    sim.set(0)   # the driver let go of it
    cluster.wait_job_state(waiting, ["COMPLETED"])
    assert gpu(cluster)["dirty"] is None
    assert node_log.read_text().count(lingering) == 1


def test_unhealthy_gpu_is_drained_with_the_reason(sim_cluster):
    cluster, sim = sim_cluster
    sim.set(0, healthy=False)
    wait_gpu(cluster, lambda g: g.get("unavailable") == "drained: simulated as unhealthy", "the GPU drained")
    assert "drained: simulated as unhealthy" in listing(cluster, "nodes")
    job_id = cluster.submit("true", "--gpus", "1")
    wait_reason(cluster, job_id, "GPUsInUseByOthers")
    sim.set(0)
    cluster.wait_job_state(job_id, ["COMPLETED"])


def test_broken_simulation_file_stops_the_node_with_one_line(bare_cluster, tmp_path):
    bad = tmp_path / "gpus.yaml"
    bad.write_text("gpus:\n  - memory_mb: lots\n")
    bare_cluster.start_master()
    node = bare_cluster.start_node("n1", str(bad))
    assert node.wait(20) == 2
    assert f"{bad}: gpus[0].memory_mb must be int, got 'lots'" in node.log.read_text()
    assert "Traceback" not in node.log.read_text()


def test_nodes_json_carries_telemetry_of_idle_simulated_gpus(sim_cluster):
    cluster, _ = sim_cluster
    seen = gpu(cluster)
    assert (seen["used_mb"], seen["busy"], seen["healthy"], seen["dirty"], seen["processes"]) == (0, False, True,
                                                                                                  None, [])
    listing = json.loads(cluster.cli("nodes", "--json").stdout)
    assert listing["nodes"][0]["gpus"][0]["simulated"] is True


def test_refused_gpu_mem_start_is_not_tried_again_on_a_stale_view(bare_cluster, tmp_path, colleague):
    """Foreign use that grew less than the report's dead band: the node refuses the start once, tells the
    master the whole state of the GPU, and the job waits instead of being placed there again and again."""
    sim = SimGpus(tmp_path / "gpus.yaml")
    bare_cluster.start_master()
    bare_cluster.start_node("n1", str(sim.path))
    bare_cluster.wait_nodes_up(1)
    sim.set(0, foreign_pids=[colleague], used_mb=40)     # 40 MiB: under the 64 MiB dead band
    wait_gpu(bare_cluster, lambda g: g.get("busy"), "the foreign process reported")
    # 16384 - 512 reserve = 15872 MiB of room as the master knows it; 15832 as the node sees it.
    job_id = bare_cluster.submit("true", "--gpus", "1", "--gpu-mem", "15850M")
    job = wait_reason(bare_cluster, job_id, "Resources")
    assert job["attempt"] <= 1, job
    assert gpu(bare_cluster)["foreign_mb"] == 40
