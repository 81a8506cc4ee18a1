"""Real-GPU checks: a node agent reading this machine's GPUs through NVML, and real CUDA jobs on them.

The whole module is skipped where the ``pynvml`` module (package nvidia-ml-py) is missing or NVML finds no
GPU, which is every machine without an NVIDIA GPU and driver.  On a GPU machine, run
``python -m pytest -q tests/gpu`` (or ``tests/gpu/run_on_device.sh``).  The checks that run a PyTorch job
are skipped when PyTorch with CUDA is not importable by this Python.

The master and the node agent are the real ones, started by tests/conftest.py's Cluster, the node reading
real GPUs instead of simulating them.  This folder has no ``conftest.py`` of its own: tests/*.py import their
helpers with ``from conftest import ...``, and a second one would take that module name over.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import warnings

import pytest

from conftest import FINISHED, KILL_GRACE, REPO, Cluster, one_line_error, pid_alive, poll, written


def _nvml_gpu_count() -> tuple[int, str]:
    """How many GPUs NVML finds, and why none when it is 0."""
    try:
        import pynvml
    except ImportError:
        return 0, "the pynvml module (package nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        return 0, f"NVML cannot be initialised ({exc or type(exc).__name__}): no NVIDIA driver here"
    try:
        count = pynvml.nvmlDeviceGetCount()
    except pynvml.NVMLError as exc:
        return 0, f"NVML cannot count GPUs ({exc})"
    finally:
        pynvml.nvmlShutdown()
    return count, "NVML finds no GPU"


GPU_COUNT, NO_GPU_REASON = _nvml_gpu_count()
if not GPU_COUNT:
    pytest.skip(f"real-GPU checks need an NVIDIA GPU: {NO_GPU_REASON}", allow_module_level=True)

import pynvml  # noqa: E402  (present: checked just above)

NODE_ID = "gpu-node"
MIB = 1 << 20
ALLOC_MIB = 2048               # what the memory-release job holds on its GPU
JOB_TIMEOUT = 300              # a PyTorch job: interpreter, CUDA context, NCCL start-up
RELEASE_TIMEOUT = 60           # from the cancel to a clean GPU
DDP_SCRIPT = REPO / "examples" / "ddp_train.py"

SEES_ONE_GPU = """\
import json, os, subprocess, torch
count = torch.cuda.device_count()
uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", "") or "") if count else ""
via = "torch"
if count and not uuid:
    via = "nvidia-smi"
    uuid = subprocess.run(["nvidia-smi", "--query-gpu=uuid", "--format=csv,noheader",
                           "-i", os.environ["CUDA_VISIBLE_DEVICES"]],
                          capture_output=True, text=True).stdout.strip()
print("RESULT " + json.dumps({"count": count, "uuid": uuid, "via": via,
                              "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}))
"""

HOLDS_MEMORY = """\
import json, os, sys, time, torch
held = torch.empty({alloc_mib} << 20, dtype=torch.uint8, device="cuda").fill_(1)
torch.cuda.synchronize()
ready = sys.argv[1]
with open(ready + ".tmp", "w") as fh:
    json.dump({{"pid": os.getpid()}}, fh)
os.replace(ready + ".tmp", ready)
print("holding", {alloc_mib}, "MiB on CUDA_VISIBLE_DEVICES=" + os.environ["CUDA_VISIBLE_DEVICES"], flush=True)
time.sleep(3600)
"""


# -- the cluster -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A master and one node agent offering this machine's real GPUs."""
    cluster = Cluster(tmp_path_factory.mktemp("gpu-cluster"))
    try:
        cluster.start_master()
        cluster.start_node(NODE_ID, None)   # no --simulate-gpus: the real ones
        cluster.wait_nodes_up(1, timeout=60)
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(autouse=True)
def no_leftover_jobs(cluster):
    """A test that failed half way must not leave a job holding a GPU for the next one."""
    yield
    cluster.cancel_leftovers()


@pytest.fixture(scope="module")
def nvml():
    """The initialised pynvml module."""
    pynvml.nvmlInit()
    yield pynvml
    pynvml.nvmlShutdown()


@pytest.fixture(scope="module")
def torch_cuda():
    """Skip unless this Python's PyTorch imports and sees a GPU (asked in a child: importing it here is slow)."""
    probe = "import torch; print(torch.__version__, torch.cuda.is_available())"
    try:
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("importing torch took over 180 s")
    if proc.returncode != 0:
        last_line = (proc.stderr.strip().splitlines() or ["no error message"])[-1]
        pytest.skip(f"PyTorch is not importable by {sys.executable}: {last_line}")
    version, available = proc.stdout.split()
    if available != "True":
        pytest.skip(f"PyTorch {version} does not see CUDA")
    return version


# -- helpers --------------------------------------------------------------------------------------


def nodes_json(cluster: Cluster) -> list[dict]:
    """``zmgpu nodes --json``: the master's node dicts."""
    return json.loads(cluster.cli("nodes", "--json").stdout)["nodes"]


def node_gpus(cluster: Cluster) -> dict[int, dict]:
    """This node's GPU dicts from ``zmgpu nodes --json``, by NVML index."""
    node = next((n for n in nodes_json(cluster) if n["node_id"] == NODE_ID), None)
    assert node is not None, f"node {NODE_ID} missing from zmgpu nodes --json"
    return {gpu["index"]: gpu for gpu in node["gpus"]}


def show_json(cluster: Cluster, job_id: str) -> dict:
    return json.loads(cluster.cli("show", job_id, "--json").stdout)


def allocated_indices(cluster: Cluster, job_id: str) -> list[int]:
    """The GPU indices the master gave the job on this node, from ``zmgpu show --json``."""
    allocation = show_json(cluster, job_id)["allocation"]
    assert [part["node_id"] for part in allocation] == [NODE_ID], allocation
    return list(allocation[0]["gpu_indices"])


def python_job(script, *args) -> str:
    """A shell command line running ``script`` with this Python."""
    return shlex.join([sys.executable, str(script), *map(str, args)])


def finished_ok(cluster: Cluster, job_id: str, timeout: float = JOB_TIMEOUT) -> str:
    """Wait for the job to end; assert it COMPLETED with exit 0; its rank 0 stdout."""
    job = cluster.wait_job_state(job_id, FINISHED, timeout)
    stdout = cluster.output(job_id).decode(errors="replace")
    assert job["state"] == "COMPLETED" and job["exit_code"] == 0, (
        f"job {job_id} ended {job['state']} (exit {job.get('exit_code')}, {job.get('reason')})\n"
        f"stdout:\n{stdout}\nstderr:\n{cluster.output(job_id, 'stderr').decode(errors='replace')}")
    return stdout


def bare_uuid(uuid: str) -> str:
    """A GPU UUID without NVML's ``GPU-`` prefix, lower case, as PyTorch prints it."""
    uuid = uuid.strip().lower()
    return uuid[4:] if uuid.startswith("gpu-") else uuid


def nvml_pids(nvml, index: int) -> set[int] | None:
    """Pids of the compute processes NVML lists on GPU ``index``; None if NVML cannot list them."""
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    try:
        return {int(p.pid) for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    except nvml.NVMLError:
        return None


def nvml_used_mib(nvml, index: int) -> int:
    return int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(index)).used) // MIB


def nvidia_smi_gpus() -> list[dict]:
    """``nvidia-smi --query-gpu=index,uuid,name,memory.total,memory.used,memory.reserved``, a dict per GPU.

    Drivers older than memory.reserved answer the query without it, as 0.
    """
    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi is not on PATH")
    fields = ["index", "uuid", "name", "memory.total", "memory.used", "memory.reserved"]
    proc = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        fields.pop()
        proc = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
                              capture_output=True, text=True, timeout=60, check=True)
    gpus = []
    for line in filter(str.strip, proc.stdout.splitlines()):
        cells = [cell.strip() for cell in line.split(",")]
        index, uuid, *name = cells[:len(cells) - len(fields) + 3]
        numbers = [int(cell) for cell in cells[len(cells) - len(fields) + 3:]] + [0]
        gpus.append({"index": int(index), "uuid": uuid, "name": ",".join(name).strip(),
                     "total_mb": numbers[0], "used_mb": numbers[1], "reserved_mb": numbers[2]})
    return gpus


# -- the checks -------------------------------------------------------------------------------------


def test_detected_gpus_match_nvidia_smi(cluster):
    """The node offers exactly the GPUs nvidia-smi lists, by index, UUID and name, none simulated, with
    their memory less the driver's reserve, and the memory used that nvidia-smi shows."""
    expected = nvidia_smi_gpus()
    gpus = node_gpus(cluster)
    assert sorted(gpus) == [gpu["index"] for gpu in expected], (sorted(gpus), expected)
    for want in expected:
        got = gpus[want["index"]]
        assert (got["uuid"], got["name"]) == (want["uuid"], want["name"]), (got, want)
        assert abs(got["memory_mb"] - (want["total_mb"] - want["reserved_mb"])) <= 2, (got, want)
        # The telemetry's dead band (64 MiB), and whatever else started on the GPU meanwhile.
        assert got["used_mb"] is not None and abs(got["used_mb"] - want["used_mb"]) <= 128, (got, want)
        assert got["simulated"] is False, got
        assert got["healthy"] is True, got
        assert not got["dirty"] and not got["job_id"], got
    listing = cluster.cli("nodes").stdout
    assert "simulated" not in listing, listing


def test_torch_job_sees_only_its_gpu(cluster, torch_cuda, workdir):
    """A --gpus 1 job sees one CUDA device, and it is the GPU the master allocated."""
    script = workdir / "sees_one_gpu.py"
    script.write_text(SEES_ONE_GPU)
    job_id = cluster.submit(python_job(script), "--gpus", "1", cwd=workdir)
    stdout = finished_ok(cluster, job_id)
    result = json.loads(next(line[len("RESULT "):] for line in stdout.splitlines() if line.startswith("RESULT ")))
    [index] = allocated_indices(cluster, job_id)
    assert result["count"] == 1, result
    assert result["cuda_visible_devices"] == str(index), result
    assert bare_uuid(result["uuid"]) == bare_uuid(node_gpus(cluster)[index]["uuid"]), (result, index)


def test_cpu_job_sees_no_gpu(cluster, torch_cuda, workdir):
    """A --gpus 0 job sees no CUDA device, even submitted from a shell that had one visible."""
    script = workdir / "sees_one_gpu.py"
    script.write_text(SEES_ONE_GPU)
    job_id = cluster.submit(python_job(script), "--gpus", "0", cwd=workdir,
                            env={"CUDA_VISIBLE_DEVICES": "0"})
    stdout = finished_ok(cluster, job_id)
    result = json.loads(next(line[len("RESULT "):] for line in stdout.splitlines() if line.startswith("RESULT ")))
    assert result["count"] == 0 and result["cuda_visible_devices"] == "", result


def test_memory_released_after_cancel(cluster, torch_cuda, nvml, workdir):
    """A cancelled job's GPU memory goes back, the GPU is clean, and the next job gets that GPU."""
    baseline = {index: nvml_used_mib(nvml, index) for index in range(GPU_COUNT)}
    script, ready = workdir / "holds_memory.py", workdir / "ready.json"
    script.write_text(HOLDS_MEMORY.format(alloc_mib=ALLOC_MIB))
    job_id = cluster.submit(python_job(script, ready), "--gpus", "1", cwd=workdir)
    job_pid = json.loads(written(ready, timeout=JOB_TIMEOUT))["pid"]
    [index] = allocated_indices(cluster, job_id)
    gpu_label = f"GPU {index} of job {job_id} (pid {job_pid})"

    listed = nvml_pids(nvml, index)
    # A sandboxed runtime may hide processes from NVML or show them under other pids: then only the
    # memory figures can tell that the job's memory went back.
    per_process = listed is not None and job_pid in listed
    if not per_process:
        warnings.warn(f"NVML lists {sorted(listed) if listed is not None else 'no process list'} on GPU {index}, "
                      f"not the job's pid {job_pid}: checking memory totals only")

    def node_shows_job():
        gpu = node_gpus(cluster)[index]
        if per_process:
            return [p for p in gpu["processes"] if p["job_id"] == job_id and (p["used_mb"] or 0) >= ALLOC_MIB]
        return (gpu["used_mb"] or 0) >= baseline[index] + ALLOC_MIB and gpu

    held = poll(node_shows_job, 60, f"zmgpu nodes to show {ALLOC_MIB} MiB of {gpu_label}", interval=0.2)
    job_pids = {job_pid} | ({p["pid"] for p in held} if per_process else set())

    cluster.cli("cancel", job_id)
    job = cluster.wait_job_state(job_id, ("CANCELLED",), timeout=KILL_GRACE + 30)
    last = {}

    def released():
        pids, used = nvml_pids(nvml, index), nvml_used_mib(nvml, index)
        gpu = node_gpus(cluster)[index]
        last.update(nvml_pids=pids, nvml_used_mib=used, gpu=gpu)
        return (not ((pids or set()) & job_pids) and used < baseline[index] + ALLOC_MIB // 2
                and not gpu["dirty"] and not gpu["job_id"]
                and not any(p["job_id"] == job_id for p in gpu["processes"]))

    try:
        poll(released, RELEASE_TIMEOUT, f"{gpu_label} to be released after the cancel", interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; baseline {baseline[index]} MiB; last seen: {last}; job: {job}") from None
    assert not pid_alive(job_pid)
    if per_process:
        assert (show_json(cluster, job_id)["peak_gpu_mem_mb"] or 0) >= ALLOC_MIB, show_json(cluster, job_id)

    again = cluster.submit("true", "--node-gpu-ids", f"{NODE_ID}:{index}", cwd=workdir)
    finished_ok(cluster, again, timeout=60)
    assert allocated_indices(cluster, again) == [index]


def test_jobs_declaring_gpu_memory_share_a_gpu(cluster, torch_cuda, nvml, workdir):
    """Two --gpu-mem jobs hold memory on one GPU at once, each process's memory counted against its job, while a
    job that wants that GPU whole waits for them; a --gpu-mem that no GPU has is refused at submit."""
    pin = f"{NODE_ID}:0"
    baseline = nvml_used_mib(nvml, 0)
    script = workdir / "holds_memory.py"
    script.write_text(HOLDS_MEMORY.format(alloc_mib=ALLOC_MIB))
    declared = f"{2 * ALLOC_MIB}M"
    sharers = {}
    for n in (1, 2):
        ready = workdir / f"sharer{n}.json"
        job_id = cluster.submit(python_job(script, ready), "--gpus", "1", "--gpu-mem", declared,
                                "--node-gpu-ids", pin, cwd=workdir)
        sharers[job_id] = ready
    # Each holds its memory until cancelled: both written means both ran on GPU 0 at once.
    pids = {job_id: json.loads(written(ready, timeout=JOB_TIMEOUT))["pid"] for job_id, ready in sharers.items()}
    assert {job_id: allocated_indices(cluster, job_id) for job_id in sharers} == {job_id: [0] for job_id in sharers}

    whole = cluster.submit("true", "--node-gpu-ids", pin, cwd=workdir)
    listed = nvml_pids(nvml, 0) or set()
    per_process = set(pids.values()) <= listed
    if not per_process:
        warnings.warn(f"NVML lists {sorted(listed)} on GPU 0, not the jobs' pids {sorted(pids.values())}: "
                      f"checking the memory total only")

    def node_shows_both():
        gpu = node_gpus(cluster)[0]
        if per_process:
            shown = {p["job_id"] for p in gpu["processes"] if (p["used_mb"] or 0) >= ALLOC_MIB}
            return shown >= set(sharers) and gpu
        return (gpu["used_mb"] or 0) >= baseline + 2 * ALLOC_MIB and gpu

    poll(node_shows_both, 60, f"zmgpu nodes to show both sharing jobs' {ALLOC_MIB} MiB on GPU 0", interval=0.2)
    waiting = cluster.job(whole)
    assert waiting["state"] == "PENDING" and waiting["reason"] == "PinnedGPUsBusy", waiting

    largest_mib = max(gpu["memory_mb"] for gpu in node_gpus(cluster).values())
    refused = cluster.cli("submit", "--gpus", "1", "--gpu-mem", f"{largest_mib + 1}M", "true", check=False,
                          cwd=workdir)
    assert "can never be satisfied" in one_line_error(refused)

    cluster.cli("cancel", *sharers)
    for job_id in sharers:
        assert cluster.wait_job_state(job_id, ("CANCELLED",), timeout=KILL_GRACE + 30)["state"] == "CANCELLED"
        if per_process:
            assert (show_json(cluster, job_id)["peak_gpu_mem_mb"] or 0) >= ALLOC_MIB, show_json(cluster, job_id)
    finished_ok(cluster, whole, timeout=RELEASE_TIMEOUT)
    assert allocated_indices(cluster, whole) == [0]


def ddp_result(stdout: str, world_size: int) -> str:
    """The final line rank 0 of examples/ddp_train.py prints, checked for the world size."""
    final = [line for line in stdout.splitlines() if line.startswith("done:")]
    assert final, stdout
    assert re.search(rf"world size {world_size}\b", final[-1]) and "identical" in final[-1], final[-1]
    return final[-1]


@pytest.mark.parametrize("gpus", [1, pytest.param(2, marks=pytest.mark.skipif(
    GPU_COUNT < 2, reason="needs two GPUs"))])
def test_ddp_example_per_gpu(cluster, torch_cuda, gpus):
    """examples/ddp_train.py as one zmgpu process per GPU trains and exits 0."""
    job_id = cluster.submit(python_job(DDP_SCRIPT, "--steps", 200), "--per-gpu", "--gpus", str(gpus), cwd=REPO)
    ddp_result(finished_ok(cluster, job_id), gpus)


def test_ddp_example_under_torchrun(cluster, torch_cuda):
    """examples/ddp_train.py under torchrun, launched from the variables zmgpu sets, trains and exits 0."""
    launch = (f"{shlex.quote(sys.executable)} -m torch.distributed.run --nnodes $NNODES --node_rank $NODE_RANK "
              f"--nproc_per_node $LOCAL_WORLD_SIZE --master_addr $MASTER_ADDR --master_port $MASTER_PORT "
              f"{shlex.quote(str(DDP_SCRIPT))} --steps 200")
    job_id = cluster.submit(launch, "--gpus", "1", cwd=REPO)
    ddp_result(finished_ok(cluster, job_id), 1)
