"""Jobs across nodes: the torchrun variables, a rendezvous at MASTER_ADDR:MASTER_PORT, --per-gpu, a failing
rank, and --label.

Each rank runs a small TCP rendezvous written for the test (no torch needed):
rank 0 listens on MASTER_ADDR:MASTER_PORT, the others connect and send their
environment, and rank 0 prints everyone's, so the test sees that the ranks
really met with the variables torch.distributed would use.
"""

from __future__ import annotations

import json
import sys

import pytest

from conftest import make_cluster

RENDEZVOUS = r'''
import json, os, socket, sys, time
NAMES = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "NODE_RANK", "NNODES", "LOCAL_RANK",
         "LOCAL_WORLD_SIZE", "CUDA_VISIBLE_DEVICES", "ZMGPU_NODE_ID")
me = {name: os.environ[name] for name in NAMES}
# One process per node, or one per GPU: who is expected at the rendezvous.
expected = int(me["NNODES"] if sys.argv[1] == "node" else me["WORLD_SIZE"])
address = (me["MASTER_ADDR"], int(me["MASTER_PORT"]))
if me["RANK"] == "0":
    server = socket.create_server(address)
    server.settimeout(60)
    seen = [me]
    while len(seen) < expected:
        conn, _ = server.accept()
        seen.append(json.loads(conn.makefile().readline()))
    print(json.dumps(sorted(seen, key=lambda e: int(e["RANK"]))))
else:
    deadline = time.monotonic() + 60
    while True:
        try:
            conn = socket.create_connection(address)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    conn.sendall((json.dumps(me) + "\n").encode())
'''


@pytest.fixture(scope="module")
def duo(tmp_path_factory):
    """A master and two nodes with two simulated GPUs each."""
    yield from make_cluster(tmp_path_factory.mktemp("duo"), {"n1": 2, "n2": 2})


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("rdv") / "rendezvous.py"
    path.write_text(RENDEZVOUS)
    return path


def met(cluster, job_id: str) -> list[dict]:
    """The environments rank 0 collected at the rendezvous."""
    job = cluster.wait_job_state(job_id, ["COMPLETED"], timeout=60)
    assert job["exit_code"] == 0
    return json.loads(cluster.output(job_id, rank=0))


def test_one_process_per_node_meets_at_the_first_node(duo, script):
    job_id = duo.submit(f"{sys.executable} {script} node", "--gpus", "4")
    ranks = met(duo, job_id)
    assert [(r["ZMGPU_NODE_ID"], r["NODE_RANK"], r["RANK"], r["LOCAL_RANK"]) for r in ranks] == [
        ("n1", "0", "0", "0"), ("n2", "1", "2", "0")]
    for r in ranks:
        # What torchrun --nnodes $NNODES --nproc_per_node $LOCAL_WORLD_SIZE needs on every node.
        assert (r["NNODES"], r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"], r["CUDA_VISIBLE_DEVICES"]) == ("2", "4", "2", "0,1")
    assert len({(r["MASTER_ADDR"], r["MASTER_PORT"]) for r in ranks}) == 1
    assert duo.job(job_id)["master_port"] == int(ranks[0]["MASTER_PORT"])


def test_per_gpu_gives_each_gpu_a_process_of_its_own(duo, script):
    job_id = duo.submit(f"{sys.executable} {script} gpu", "--gpus", "4", "--per-gpu")
    ranks = met(duo, job_id)
    assert [(r["ZMGPU_NODE_ID"], r["RANK"], r["LOCAL_RANK"], r["NODE_RANK"], r["CUDA_VISIBLE_DEVICES"])
            for r in ranks] == [("n1", "0", "0", "0", "0"), ("n1", "1", "1", "0", "1"),
                                ("n2", "2", "0", "1", "0"), ("n2", "3", "1", "1", "1")]
    assert {(r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"], r["NNODES"]) for r in ranks} == {("4", "2", "2")}
    assert len(duo.job(job_id)["allocation"]) == 4


def test_single_gpu_job_gets_a_world_of_one(duo):
    job_id = duo.submit('echo "$MASTER_ADDR $WORLD_SIZE $RANK $LOCAL_RANK $NNODES"; test -n "$MASTER_PORT"',
                        "--gpus", "1")
    duo.wait_job_state(job_id, ["COMPLETED"])
    assert duo.output(job_id) == b"127.0.0.1 1 0 0 1\n"


def test_a_failing_rank_stops_the_others_and_is_named(duo):
    job_id = duo.submit('if [ "$NODE_RANK" = 1 ]; then exit 3; fi; exec sleep 300', "--gpus", "4")
    job = duo.wait_job_state(job_id, ["FAILED"], timeout=30)
    assert job["reason"] == "rank 1 on n2: exited with code 3"
    assert job["exit_code"] == 3


def test_a_failing_rank_stops_each_node_once_not_once_per_rank(duo):
    """The ranks stopped because one failed end failed too; only the first failure sends KILLs."""
    job_id = duo.submit('if [ "$RANK" = 3 ]; then exit 5; fi; exec sleep 300', "--gpus", "4", "--per-gpu")
    job = duo.wait_job_state(job_id, ["FAILED"], timeout=30)
    assert job["reason"] == "rank 3 on n2: exited with code 5"
    for node in ("n1", "n2"):
        stops = [line for line in duo.nodes[node].log.read_text().splitlines()
                 if f"job {job_id}: stopping" in line]
        assert len(stops) == 1, stops


def test_the_first_nodes_rank_ending_at_once_settles_the_others(duo, tmp_path):
    """Rank 0 names the rendezvous port to the other nodes; ending before that port went out changes nothing."""
    job_id = duo.submit('if [ "$NODE_RANK" = 0 ]; then exit 4; fi; exec sleep 300', "--gpus", "4")
    job = duo.wait_job_state(job_id, ["FAILED"], timeout=30)
    assert job["reason"] == "rank 0 on n1: exited with code 4"
    job_id = duo.submit('echo "$MASTER_PORT" > "rank.$NODE_RANK"', "--gpus", "4", cwd=tmp_path)
    assert duo.wait_job_state(job_id, ["COMPLETED"], timeout=30)["state"] == "COMPLETED"
    ports = {(tmp_path / f"rank.{n}").read_text() for n in (0, 1)}
    assert len(ports) == 1 and ports.pop().strip().isdigit()


def test_label_prefixes_each_line_with_its_rank(duo):
    proc = duo.cli("submit", "-i", "--label", "--gpus", "4", "--per-gpu", 'echo "one $RANK"; echo "two $RANK"')
    lines = proc.stdout.splitlines()
    assert sorted(lines) == sorted(f"{rank}: {word} {rank}" for rank in range(4) for word in ("one", "two"))


def test_label_needs_interactive(duo):
    proc = duo.cli("submit", "--label", "true", check=False)
    assert proc.returncode == 2 and "--label" in proc.stderr
