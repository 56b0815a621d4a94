"""Digest throughput on a memfd (printed, not asserted), beside the usual command-line hashers.

Run from the repository root:  .venv/bin/python benchmarks/bench_digest.py [--size-mib N]

A memfd of --size-mib MiB (default 1024) is filled with random (non-zero) data, then hashed by:

    kho digest_fd           what the agent does: BLAKE3 over preadv chunks read on a second
                            thread while the first hashes, all cores (no mapping: a client that
                            shrinks its memfd cannot kill the agent with SIGBUS)
    blake3 1 thread (mmap)  the same mapping hashed on one thread, to show what threads buy
    sha256sum, b3sum, xxhsum -H3 (XXH3-64)
                            run on /proc/self/fd/N of the same memfd (pass_fds), when installed

Each figure is the best of --repeat runs; MB/s is 10^6 bytes per second; `ratio` is the row's
throughput divided by digest_fd's. b3sum's digest must equal digest_fd's (the script
exits 1 otherwise): an independent check of the hashing itself.
"""

from __future__ import annotations

import argparse
import mmap
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kho_agent.digest import digest_fd

MIB = 1 << 20
FILL_BLOCK = 4 * MIB


@dataclass
class Row:
    name: str
    seconds: float
    output: str


def make_memfd(size: int) -> int:
    fd = os.memfd_create("bench-digest", os.MFD_CLOEXEC)
    block = os.urandom(FILL_BLOCK)
    offset = 0
    while offset < size:
        chunk = block[: min(FILL_BLOCK, size - offset)]
        offset += os.pwrite(fd, chunk, offset)
    return fd


def best(repeat: int, run: Callable[[], str]) -> tuple[float, str]:
    times: list[float] = []
    output = ""
    for _ in range(repeat):
        start = time.perf_counter()
        output = run()
        times.append(time.perf_counter() - start)
    return min(times), output


def single_thread(fd: int, size: int) -> str:
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapping, memoryview(mapping) as view:
        return blake3.blake3(view).hexdigest()


def tool(argv: list[str], fd: int) -> Callable[[], str]:
    def run() -> str:
        proc = subprocess.run([*argv, f"/proc/self/fd/{fd}"], pass_fds=(fd,), check=True,
                              capture_output=True, text=True)
        return proc.stdout.split()[0]
    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="memfd size (default 1024)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per figure, best kept")
    args = parser.parse_args(argv)
    size = args.size_mib * MIB
    print(f"python {platform.python_version()}, blake3 {blake3.__version__}, "
          f"{os.cpu_count()} CPUs, memfd {args.size_mib} MiB")
    fd = make_memfd(size)
    try:
        rows: list[Row] = []
        t, out = best(args.repeat, lambda: digest_fd(fd).hexdigest)
        rows.append(Row("kho digest_fd", t, out))
        t, out = best(args.repeat, lambda: single_thread(fd, size))
        rows.append(Row("blake3 1 thread (mmap)", t, out))
        for name, cmd in (("sha256sum", ["sha256sum"]), ("b3sum", ["b3sum"]),
                          ("xxhsum -H3 (XXH3-64)", ["xxhsum", "-H3"])):
            if shutil.which(cmd[0]) is None:
                print(f"  ({cmd[0]} not installed: skipped)")
                continue
            t, out = best(args.repeat, tool(cmd, fd))
            rows.append(Row(name, t, out))
    finally:
        os.close(fd)

    ours = rows[0]
    print(f"\n{'hasher':<24} {'seconds':>9} {'MB/s':>9} {'ratio':>7}")
    for row in rows:
        rate = size / row.seconds / 1e6
        ratio = ours.seconds / row.seconds
        print(f"{row.name:<24} {row.seconds:>9.3f} {rate:>9.0f} {ratio:>6.2f}x")
    failed = False
    for row in rows[1:]:
        if row.name.startswith(("kho", "blake3", "b3sum")) and row.output != ours.output:
            print(f"MISMATCH: {row.name} gives {row.output}, digest_fd gives {ours.output}")
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
