"""Digest time of a memfd as a ratio to a floor measured in the same run, beside the usual
command-line hashers.

Run from the repository root:  .venv/bin/python benchmarks/bench_digest.py [--size-mib N]

A memfd of --size-mib MiB (default 1024) is filled with random (non-zero) data, then hashed by:

    kho digest_fd           what the agent does: BLAKE3 over preadv chunks read on a second
                            thread while the first hashes, all cores (no mapping: a client that
                            shrinks its memfd cannot kill the agent with SIGBUS)
    floor                   the same library over a mapping of the memfd, all cores
                            (max_threads=AUTO): the same hash without the copy, the size and
                            change-time checks or the pipeline
    blake3 1 thread (mmap)  the mapping hashed on one thread, to show what threads buy
    sha256sum, b3sum, xxhsum -H3 (XXH3-64)
                            run on /proc/self/fd/N of the same memfd (pass_fds), when installed

Each figure is the best of --repeat runs, the runs of digest_fd and the floor alternating; MB/s
is 10^6 bytes per second; `ratio` is the row's time over the floor's. Only digest_fd has a target
ratio; the other rows are for comparison. b3sum's digest must equal digest_fd's (the script exits
2 otherwise): an independent check of the hashing itself. Exit status: 0 when digest_fd meets its
target, 1 when it misses it.
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
from pathlib import Path

import blake3

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ratios import EXIT_BROKEN, Ratio, exit_status, interleaved_best

from kho_agent.digest import digest_fd

MIB = 1 << 20
FILL_BLOCK = 4 * MIB
DIGEST_TARGET = 2.0  # digest_fd over the floor (benchmarks/README.md)


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


def mapped(fd: int, size: int, threads: int) -> str:
    with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mapping, memoryview(mapping) as view:
        return blake3.blake3(view, max_threads=threads).hexdigest()


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
    outputs: dict[str, str] = {}
    try:
        ours_s, floor_s = interleaved_best(
            args.repeat, lambda: outputs.__setitem__("kho digest_fd", digest_fd(fd).hexdigest),
            lambda: outputs.__setitem__("floor", mapped(fd, size, blake3.blake3.AUTO)))
        others: list[tuple[str, float]] = []
        t, outputs["blake3 1 thread (mmap)"] = best(args.repeat, lambda: mapped(fd, size, 1))
        others.append(("blake3 1 thread (mmap)", t))
        for name, cmd in (("sha256sum", ["sha256sum"]), ("b3sum", ["b3sum"]),
                          ("xxhsum -H3 (XXH3-64)", ["xxhsum", "-H3"])):
            if shutil.which(cmd[0]) is None:
                print(f"  ({cmd[0]} not installed: skipped)")
                continue
            t, outputs[name] = best(args.repeat, tool(cmd, fd))
            others.append((name, t))
    finally:
        os.close(fd)

    floor_name = "blake3 mmap, all threads"
    target = Ratio("kho digest_fd", ours_s, floor_name, floor_s, DIGEST_TARGET)
    print(f"\n{'hasher':<32} {'seconds':>9} {'MB/s':>9} {'ratio':>7} {'target':>8}  result")
    for name, seconds, goal in ((target.figure, ours_s, target), (f"floor: {floor_name}",
                                                                  floor_s, None),
                                *((n, t, None) for n, t in others)):
        rate = size / seconds / 1e6
        verdict = ("PASS" if goal.ok else "MISS") if goal is not None else ""
        goal_text = f"<= {goal.target:g}x" if goal is not None else "-"
        print(f"{name:<32} {seconds:>9.3f} {rate:>9.0f} {seconds / floor_s:>6.2f}x "
              f"{goal_text:>8}  {verdict}")
    ours = outputs["kho digest_fd"]
    for name in ("floor", "blake3 1 thread (mmap)", "b3sum"):
        if name in outputs and outputs[name] != ours:
            print(f"MISMATCH: {name} gives {outputs[name]}, digest_fd gives {ours}")
            return EXIT_BROKEN
    return exit_status([target])


if __name__ == "__main__":
    sys.exit(main())
