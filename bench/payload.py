"""The output benchmark's job: SIZE bytes of a fixed pattern to stdout, then its own run time (s) to TIMEFILE.

Run by the job as ``python bench/payload.py SIZE TIMEFILE``.  Each 1 MiB block
is the same pseudo-random bytes with the block number in its first 8 bytes, so
a lost, repeated or reordered chunk changes the digest that
:func:`sha256_of` recomputes on the reader's side.
"""

from __future__ import annotations

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


def sha256_of(size: int) -> str:
    digest = hashlib.sha256()
    for block in blocks(size):
        digest.update(block)
    return digest.hexdigest()


def main(argv: list[str]) -> int:
    size, time_file = int(argv[1]), argv[2]
    start = time.perf_counter()
    out = sys.stdout.buffer
    for block in blocks(size):
        out.write(block)
    out.flush()
    with open(time_file, "w") as fh:
        fh.write(f"{time.perf_counter() - start:.6f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
