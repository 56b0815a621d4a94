"""Throughput of digest_fd with each algorithm it can take: BLAKE3 (when the blake3 module is
installed), SHA-256 (the fallback where it is not, e.g. Debian bookworm), and BLAKE2b, the other
hashlib candidate, for the record of why SHA-256 was chosen.

Run from the repository root:  .venv/bin/python benchmarks/bench_digest_algorithms.py [--size-mib N]

A memfd of --size-mib MiB (default 256) filled with random data is digested the way the agent
does it (preadv chunks, read on a second thread while the first hashes). Each figure is the best
of --repeat runs, the algorithms alternating; MB/s is 10^6 bytes per second. BLAKE2b is not an
algorithm of the agent: its row runs the same read loop with hashlib.blake2b. Figures, not a
verdict: exit 0 unless a digest differs from hashlib's (2).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kho_agent import digest

MIB = 1 << 20


def make_memfd(size: int) -> int:
    fd = os.memfd_create("bench-digest-algorithms", os.MFD_CLOEXEC)
    block = os.urandom(4 * MIB)
    offset = 0
    while offset < size:
        offset += os.pwrite(fd, block[: min(len(block), size - offset)], offset)
    return fd


def blake2b_fd(fd: int, size: int) -> str:
    hasher = hashlib.blake2b(digest_size=32)
    digest._hash_pread(fd, size, hasher)
    return hasher.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    size = args.size_mib * MIB
    fd = make_memfd(size)
    runs: dict[str, Callable[[], str]] = {}
    if digest.available(digest.BLAKE3):
        runs["blake3 (digest_fd)"] = lambda: digest.digest_fd(fd, size, digest.BLAKE3).hexdigest
    runs["sha256 (digest_fd)"] = lambda: digest.digest_fd(fd, size, digest.SHA256).hexdigest
    runs["blake2b-256 (same loop)"] = lambda: blake2b_fd(fd, size)
    best = {name: float("inf") for name in runs}
    outputs: dict[str, str] = {}
    for _ in range(args.repeat):
        for name, run in runs.items():
            started = time.perf_counter()
            outputs[name] = run()
            best[name] = min(best[name], time.perf_counter() - started)
    print(f"digest algorithms: {args.size_mib} MiB memfd, best of {args.repeat}, "
          f"{os.cpu_count()} CPU(s), {platform.machine()}, Python {platform.python_version()}")
    for name, seconds in best.items():
        print(f"  {name:26} {seconds:7.3f} s  {size / seconds / 1e6:8.0f} MB/s")
    data = os.pread(fd, size, 0)
    if outputs["sha256 (digest_fd)"] != hashlib.sha256(data).hexdigest():
        print("MISMATCH: digest_fd's sha256 differs from hashlib's")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
