"""Content digests of preserved files (BLAKE3, else SHA-256), taken before a live update and after.

The algorithm: BLAKE3 when the `blake3` module is installed (pip, Debian sid's python3-blake3),
SHA-256 (hashlib) when it is not (Debian bookworm has no python3-blake3; the package only
recommends it). SHA-256 rather than BLAKE2b: through digest_fd on a 256 MiB memfd it ran
1.2 GB/s against BLAKE2b's 0.7 GB/s, BLAKE3 2.4 GB/s (2 shared cores, x86-64 with SHA
extensions; benchmarks/bench_digest_algorithms.py). The manifest records the algorithm of
every digest, and verification takes the digest after the kexec with that same algorithm; one it
cannot compute (a manifest written with BLAKE3, read where blake3 is missing) is refused with
DigestUnavailable, never replaced by another algorithm. Verification asks require_available
before it retrieves any session (engine/verify.py), as the kernel hands each out once.

A digest reads the whole file from offset 0 without moving the file position: the fd is shared
with the VM manager that owns it, and its position is part of what LUO carries (memfd `pos`).
It reads with `pread` into a few buffers, reused chunk after chunk, and hashes each chunk in
place; a large file is read on a thread of its own while the caller's thread hashes, so reading
and hashing overlap. BLAKE3 hashes large inputs on every core. Pipes and sockets have no
offsets and are refused (ESPIPE); a debugfs/procfs file whose `stat` size is 0 is read to EOF.

The file is never mapped. A mapping of a file that another process shrinks faults with SIGBUS
on the first page past the new end, and SIGBUS kills the process, the daemon, whatever Python
does; a client truncating its memfd while the agent digests it is not the agent's to prevent
(a preserved memfd cannot change size on a real kernel, but the simulator cannot freeze every
memfd, and a file may be digested before it is preserved). Reading costs one copy into a buffer
that stays in the cache, done while the previous buffer is hashed; hashing a mapping costs a
page fault per page instead, and measured slower (benchmarks/bench_digest.py). Holes read as
zeros without allocating pages (a mapping allocates them).

A file that changes while it is read gives no digest: its size and change time are compared
before and after, and a change (or a short read) raises FileChanged, which names the sizes.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

from .errors import Busy, InvalidArgument, KernelRefused, NotFound


def _import_blake3() -> ModuleType | None:
    try:
        return importlib.import_module("blake3")
    except ImportError:
        return None


_BLAKE3 = _import_blake3()

BLAKE3 = "blake3"
SHA256 = "sha256"
# Every algorithm a manifest may name, with its hex length (the manifest codec checks digests
# against it): BLAKE3's default 32-byte output, SHA-256's 32 bytes.
HEX_LENGTHS: dict[str, int] = {BLAKE3: 64, SHA256: 64}


def default_algorithm() -> str:
    """What new digests are taken with: BLAKE3 when the module is installed, else SHA-256."""
    return BLAKE3 if _BLAKE3 is not None else SHA256


# The same, as found when this module was imported.
DIGEST_ALG = default_algorithm()
DIGEST_HEX_LENGTH = HEX_LENGTHS[DIGEST_ALG]
# Below this the thread pool costs more than it saves (BLAKE3 splits work at 1 KiB chunks, and
# its own guidance puts the break-even for multi-threading in the hundreds of KiB).
MULTITHREAD_MIN_BYTES = 1 << 20
# One read per chunk, hashed while it is still in the cache: 1 MiB was fastest on 2 cores
# (8 MiB lost ~10%), and a chunk must be large enough that every core gets a share of it:
# 512 KiB per core, up to 16 MiB.
PREAD_CHUNK = max(1 << 20, min(16 << 20, (os.cpu_count() or 1) * (512 << 10)))
# Files above this many chunks are read on a thread of their own (_hash_pipelined); below, a
# thread costs more than the overlap gains.
PIPELINE_MIN_CHUNKS = 4
PIPELINE_BUFFERS = 4


class FileChanged(Busy):
    """The file changed while its digest was taken (its size; or its content, when its change
    time moved): the bytes read are not the file's at any one moment, so there is no digest.
    Its stable name is `Busy` (exit 3): the file's owner said it was ready while its memory
    still changed; it says ready again once nothing writes it."""


class DigestUnavailable(NotFound):
    """A digest in an algorithm this installation cannot compute (a manifest written where
    the `blake3` module was installed, verified where it is not). Its stable name is `NotFound`
    (exit 2): what is missing is a module, and no other algorithm may stand in for the one the
    manifest names."""


def available(alg: str) -> bool:
    """Whether digest_fd can compute `alg` here."""
    return alg == SHA256 or (alg == BLAKE3 and _BLAKE3 is not None)


class Hasher(Protocol):
    def update(self, data: memoryview, /) -> object: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True)
class DigestResult:
    alg: str
    hexdigest: str
    size: int          # bytes hashed
    seconds: float     # wall clock spent reading and hashing


def new_hasher(alg: str, size_hint: int | None = None) -> Hasher:
    """A hasher of `alg` for about `size_hint` bytes (None: unknown, maybe large). Raises
    DigestUnavailable for an algorithm this installation cannot compute."""
    if alg == BLAKE3 and _BLAKE3 is not None:
        hasher_class = _BLAKE3.blake3
        if size_hint is None or size_hint >= MULTITHREAD_MIN_BYTES:
            return hasher_class(max_threads=hasher_class.AUTO)  # type: ignore[no-any-return]
        return hasher_class()  # type: ignore[no-any-return]
    if alg == SHA256:
        # hashlib releases the GIL while it hashes a chunk, so the pipeline overlaps as well
        return hashlib.sha256()
    raise unavailable(alg)


def unavailable(alg: str) -> DigestUnavailable:
    """Why `alg` cannot be computed here, and what to install."""
    if alg == BLAKE3:
        return DigestUnavailable(
            "the digest was taken with blake3, and the Python module blake3 is not installed "
            "here, and no other algorithm can check a blake3 digest: install it (Debian: apt "
            "install python3-blake3; pip: pip install blake3) on every host that verifies "
            "updates prepared with blake3")
    return DigestUnavailable(f"unknown digest algorithm {alg!r:.40} (known: "
                             f"{', '.join(sorted(HEX_LENGTHS))})")


def require_available(algs: Iterable[str]) -> None:
    """Raise DigestUnavailable for the first of `algs` (by name) this installation cannot
    compute; nothing is read. Verification asks this before it retrieves any session: the
    kernel hands each session out once, so a check that fails after the retrieval cannot be
    repeated."""
    for alg in sorted(set(algs)):
        if not available(alg):
            raise unavailable(alg)


def _read_refused(fd: int, err: OSError, alg: str) -> KernelRefused:
    code = err.errno if err.errno is not None else errno.EIO
    if code == errno.EBADF:
        advice = ("the fd is closed or not open for reading; digests need a readable fd "
                  "(memfds are O_RDWR)")
    elif code == errno.ESPIPE:
        advice = "pipes and sockets have no offsets; digests are taken of files and memfds"
    elif code == errno.EISDIR:
        advice = "the fd is a directory; only regular files and memfds have a content digest"
    else:
        advice = "the file content could not be read, so no digest was taken"
    return KernelRefused(f"read of fd {fd} for its {alg} digest", code, advice)


OnBytes = Callable[[int], None]


def _hash_pread(fd: int, size: int | None, hasher: Hasher,
                on_bytes: OnBytes = lambda hashed: None) -> int:
    """Hash `size` bytes from offset 0 (to EOF when None); returns the bytes hashed, fewer
    when the file ended first. `on_bytes` hears the bytes hashed so far after each chunk."""
    if size is not None and size > PIPELINE_MIN_CHUNKS * PREAD_CHUNK:
        return _hash_pipelined(fd, size, hasher, on_bytes)
    offset = 0
    chunk = PREAD_CHUNK if size is None else max(1, min(PREAD_CHUNK, size))
    buffer = memoryview(bytearray(chunk))
    while size is None or offset < size:
        want = chunk if size is None else min(chunk, size - offset)
        got = os.preadv(fd, [buffer[:want]], offset)
        if not got:
            break
        hasher.update(buffer[:got])
        offset += got
        on_bytes(offset)
    return offset


def _hash_pipelined(fd: int, size: int, hasher: Hasher, on_bytes: OnBytes) -> int:
    """The same for a large file, with the reads on a thread of their own: a reader fills a few
    buffers ahead while this thread hashes the ones filled. pread and BLAKE3 both release the
    GIL, so reading and hashing overlap (measured on 2 cores, best of 7, interleaved: 1.2-1.4x
    the throughput of hashing a mapping, 1.6-2.0x that of reading and hashing in turn)."""
    free: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
    full: queue.SimpleQueue[tuple[memoryview, int] | OSError | None] = queue.SimpleQueue()
    for _ in range(PIPELINE_BUFFERS):
        free.put(memoryview(bytearray(PREAD_CHUNK)))

    def read() -> None:
        offset = 0
        try:
            while offset < size:
                buffer = free.get()
                if buffer is None:        # the hashing side stopped
                    return
                got = os.preadv(fd, [buffer[:min(PREAD_CHUNK, size - offset)]], offset)
                if not got:               # the file ended early: it shrank
                    break
                full.put((buffer, got))
                offset += got
        except OSError as err:
            full.put(err)
            return
        full.put(None)

    reader = threading.Thread(target=read, name="digest-reader", daemon=True)
    reader.start()
    hashed = 0
    try:
        while True:
            item = full.get()
            if item is None:
                return hashed
            if isinstance(item, OSError):
                raise item
            buffer, got = item
            hasher.update(buffer[:got])
            hashed += got
            free.put(buffer)
            on_bytes(hashed)
    finally:
        free.put(None)                    # a reader waiting for a buffer ends
        reader.join()


def _changed(fd: int, before: os.stat_result, after: os.stat_result, hashed: int,
             wanted: int, alg: str) -> FileChanged | None:
    if after.st_size != before.st_size or hashed < wanted:
        end = after.st_size if after.st_size != before.st_size else hashed
        return FileChanged(
            f"fd {fd} changed size from {before.st_size} to {end} bytes while its "
            f"{alg} digest was taken: no digest of it was recorded; its owner says "
            "ready again once its memory no longer changes")
    if after.st_ctime_ns != before.st_ctime_ns:
        return FileChanged(
            f"fd {fd} was written while its {alg} digest was taken (its size, "
            f"{before.st_size} bytes, stayed; its change time moved): no digest of it was "
            "recorded; its owner says ready again once its memory no longer changes")
    return None


def digest_fd(fd: int, size: int | None = None, alg: str | None = None, *,
              on_bytes: OnBytes = lambda hashed: None) -> DigestResult:
    """The `alg` digest (default: default_algorithm()) of the first `size` bytes of `fd` (all
    of it when None), from offset 0. A verification passes the algorithm its manifest names.
    `on_bytes(hashed)` after each chunk read (PREAD_CHUNK), for progress.

    The file position is not used or moved. `size` larger than the file is refused. Raises
    KernelRefused with the errno when the fd cannot be read, FileChanged when a regular file
    changed while it was read, DigestUnavailable when `alg` cannot be computed here (before
    anything is read). The file is never mapped (see the module's docstring).
    """
    if size is not None and size < 0:
        raise InvalidArgument(f"digest size must be >= 0, not {size}")
    if alg is None:
        alg = default_algorithm()
    new_hasher(alg)  # refuses an algorithm it cannot compute before anything is read
    started = time.perf_counter()
    try:
        info = os.fstat(fd)
    except OSError as err:
        raise _read_refused(fd, err, alg) from err
    if stat.S_ISDIR(info.st_mode):
        raise _read_refused(fd, OSError(errno.EISDIR, os.strerror(errno.EISDIR)), alg)
    regular = stat.S_ISREG(info.st_mode)
    if size is not None and regular and size > info.st_size:
        raise InvalidArgument(
            f"fd {fd} holds {info.st_size} bytes, fewer than the {size} to digest: the file "
            "shrank or the recorded size is wrong")
    length = size if size is not None else info.st_size
    hasher = new_hasher(alg, length if regular else None)
    # stat size 0 says nothing about debugfs/procfs files: read those to EOF.
    want = size if size is not None else (length if length > 0 else None)
    try:
        hashed = _hash_pread(fd, want, hasher, on_bytes)
        after = os.fstat(fd) if regular else info
    except OSError as err:
        raise _read_refused(fd, err, alg) from err
    if regular:
        changed = _changed(fd, info, after, hashed, hashed if want is None else want, alg)
        if changed is not None:
            raise changed
    if size is not None and hashed < size:
        raise InvalidArgument(
            f"fd {fd} ended after {hashed} of the {size} bytes to digest: the file shrank "
            "while it was read")
    return DigestResult(alg, hasher.hexdigest(), hashed, time.perf_counter() - started)
