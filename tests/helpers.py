"""Small programs that test jobs run, and the functions tests use to check what they produced.

Run as a script by the jobs themselves (``python tests/helpers.py SUBCOMMAND ...``), so a job's
behaviour is deterministic and its expected output can be recomputed here without holding it all
in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time

HERE = os.path.abspath(__file__)
BLOCK = 1 << 20
STDERR_MARKER = b"zmgpu-test: some bytes on stderr\n"


def pattern_block(index: int) -> bytes:
    """Block ``index`` of the test pattern: differs per block, so a lost or repeated block shows."""
    head = f"<block {index:08d}>".encode()
    body = bytes((index * 7 + i) % 251 for i in range(256)) * (BLOCK // 256)
    return head + body[len(head):]


def pattern_chunks(size: int):
    """The first ``size`` bytes of the pattern, block by block."""
    for index in range((size + BLOCK - 1) // BLOCK):
        yield pattern_block(index)[: min(BLOCK, size - index * BLOCK)]


def pattern_sha256(size: int) -> str:
    digest = hashlib.sha256()
    for chunk in pattern_chunks(size):
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path) -> tuple[int, str]:
    """Length and sha256 of a file, read in blocks to keep memory small."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(BLOCK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def job_command(*args: str) -> str:
    """A shell command line that runs this file as a job with ``args``."""
    return " ".join(shlex.quote(a) for a in (sys.executable, HERE, *args))


def wait_for_file_sh(path: str, timeout: float = 90) -> str:
    """Shell snippet that blocks until ``path`` exists (giving up after ``timeout`` seconds).

    ``path`` goes in double quotes, so it may name shell variables such as ``$ZMGPU_JOB_ID``.
    """
    loops = int(timeout / 0.1)
    return f'i=0; while [ ! -e "{path}" ] && [ $i -lt {loops} ]; do sleep 0.1; i=$((i+1)); done'


def job_record(job_id: str, **fields):
    """A master's job record for a test of the master's parts in-process: user "u", command ``true`` in /, no
    environment, one GPU, unless ``fields`` say otherwise."""
    from zmgpu.master.state import JobRecord

    return JobRecord(**{"job_id": job_id, "seq": 0, "user": "u", "command": "true", "cwd": "/", "env": {},
                        "gpus": 1, **fields})


def sim_node(node_id: str, gpus: int, **fields):
    """A master's record of a node with ``gpus`` simulated GPUs (as ``zmgpu-node --simulate-gpus`` offers them),
    for the in-process tests of the master's parts."""
    from zmgpu.master.state import NodeRecord
    from zmgpu.node.gpus import SimulatedSource

    return NodeRecord(node_id, "host", "127.0.0.1", SimulatedSource(node_id, gpus).devices(), **fields)


def hold_sh(path: str, then: str | None = None) -> str:
    """Shell snippet for a held job: wait until ``path`` exists (:func:`release` makes it), then ``then``."""
    return wait_for_file_sh(path) + (f"; {then}" if then else "")


def release(directory, *names: str) -> None:
    """Create the files that held jobs working in ``directory`` wait for."""
    for name in names:
        open(os.path.join(directory, name), "a").close()


# -- subcommands run inside jobs ------------------------------------------------------------------

def _spew(size: str, exit_code: str) -> int:
    """Write ``size`` pattern bytes to stdout and a marker to stderr, then exit with ``exit_code``."""
    out = sys.stdout.buffer
    for chunk in pattern_chunks(int(size)):
        out.write(chunk)
    out.flush()
    sys.stderr.buffer.write(STDERR_MARKER)
    sys.stderr.flush()
    return int(exit_code)


def _envdump(path: str) -> int:
    """Record the job's environment and working directory as JSON at ``path``."""
    with open(path + ".tmp", "w") as fh:
        json.dump({"env": dict(os.environ), "cwd": os.getcwd(), "pid": os.getpid()}, fh)
    os.replace(path + ".tmp", path)
    return 0


def _wait(path: str, timeout: str = "90") -> int:
    """Block until ``path`` exists; exit 1 if it never does."""
    deadline = time.monotonic() + float(timeout)
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return 1
        time.sleep(0.05)
    return 0


SUBCOMMANDS = {"spew": _spew, "envdump": _envdump, "wait": _wait}

if __name__ == "__main__":
    sys.exit(SUBCOMMANDS[sys.argv[1]](*sys.argv[2:]))
