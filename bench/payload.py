"""The output benchmark's job: SIZE bytes to stdout, then its own run time (s) to TIMEFILE.

Run by the job as ``python bench/payload.py SIZE TIMEFILE [KIND]``, KIND being

- ``blocks`` (the default): 1 MiB writes of the same pseudo-random bytes with the
  block number in their first 8 bytes.  The job does nothing but write.
- ``lines``: a training script's log lines (step, loss, learning rate,
  tokens/s), each formatted and written to stdout with Python's default
  buffering for it, whatever PYTHONUNBUFFERED says (with it, each line is a
  write(2), which costs a plain file several times what it costs /dev/null);
  the last line is cut to make SIZE bytes.

Either way a lost, repeated or reordered chunk changes the digest that
:func:`sha256_of` recomputes on the reader's side.
"""

from __future__ import annotations

import functools
import hashlib
import random
import sys
import time

BLOCK = 1 << 20


def blocks(size: int):
    """The pattern's first ``size`` bytes, one block at a time (the same buffer, rewritten)."""
    buf = bytearray(random.Random(0).randbytes(BLOCK))
    view = memoryview(buf)
    for index in range(-(-size // BLOCK)):
        buf[:8] = index.to_bytes(8, "big")
        yield view[:min(BLOCK, size - index * BLOCK)]


def lines(size: int):
    """A training log's first ``size`` bytes (ASCII), one line at a time."""
    left, step = size, 0
    while left > 0:
        line = f"step {step:9d} loss {1.0 / (step + 1):.6f} lr {3e-4:.2e} tokens/s {123456.7 + step % 1000:.1f}\n"
        yield line[:left]
        left -= len(line)
        step += 1


#: Kind -> (the pieces the job writes, whether they are text for sys.stdout or bytes for its buffer).
KINDS = {"blocks": (blocks, False), "lines": (lines, True)}


# The output benchmark checks each kind against it more than once; it always gives the kind, since the cache
# keys on the arguments as passed.
@functools.lru_cache(maxsize=None)
def sha256_of(size: int, kind: str = "blocks") -> str:
    pieces, text = KINDS[kind]
    digest = hashlib.sha256()
    for piece in pieces(size):
        digest.update(piece.encode() if text else piece)
    return digest.hexdigest()


def main(argv: list[str]) -> int:
    size, time_file = int(argv[1]), argv[2]
    pieces, text = KINDS[argv[3] if len(argv) > 3 else "blocks"]
    start = time.perf_counter()
    out = open(sys.stdout.fileno(), "w", encoding="ascii", closefd=False) if text else sys.stdout.buffer
    for piece in pieces(size):
        out.write(piece)
    out.flush()
    with open(time_file, "w") as fh:
        fh.write(f"{time.perf_counter() - start:.6f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
