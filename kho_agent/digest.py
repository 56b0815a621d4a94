"""Content digests of preserved files (BLAKE3), taken before a live update and after it.

A digest reads the whole file from offset 0 without moving the file position: the fd is shared
with the VM manager that owns it, and its position is part of what LUO carries (memfd `pos`).
The file is mapped read-only and hashed in place (no copy); BLAKE3 hashes large inputs on every
core. When the fd cannot be mapped (size 0, a debugfs/procfs file whose `stat` size is 0) it is
read with `pread` in chunks instead. Pipes and sockets have no offsets and are refused (ESPIPE).

Caution: hashing a mapping of a file that another process shrinks at the same time ends in
SIGBUS. Preserved memfds cannot change size (the kernel freezes them, EPERM), which is what the
agent digests; for anything else pass `use_mmap=False`.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import time
from dataclasses import dataclass

import blake3

from .errors import InvalidArgument, KernelRefused

DIGEST_ALG = "blake3"
DIGEST_HEX_LENGTH = 64  # BLAKE3's default 32-byte output, hex
# Below this the thread pool costs more than it saves (BLAKE3 splits work at 1 KiB chunks, and
# its own guidance puts the break-even for multi-threading in the hundreds of KiB).
MULTITHREAD_MIN_BYTES = 1 << 20
PREAD_CHUNK = 8 << 20


@dataclass(frozen=True)
class DigestResult:
    alg: str
    hexdigest: str
    size: int          # bytes hashed
    seconds: float     # wall clock spent reading and hashing


def _new_hasher(size_hint: int | None) -> blake3.blake3:
    if size_hint is None or size_hint >= MULTITHREAD_MIN_BYTES:
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    return blake3.blake3()


def _read_refused(fd: int, err: OSError) -> KernelRefused:
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
    return KernelRefused(f"read of fd {fd} for its {DIGEST_ALG} digest", code, advice)


def _hash_mmap(fd: int, length: int, hasher: blake3.blake3) -> None:
    with mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mapping, \
            memoryview(mapping) as view:
        hasher.update(view)


def _hash_pread(fd: int, size: int | None, hasher: blake3.blake3) -> int:
    """Hash `size` bytes from offset 0 (to EOF when None); returns the bytes hashed."""
    offset = 0
    while size is None or offset < size:
        want = PREAD_CHUNK if size is None else min(PREAD_CHUNK, size - offset)
        chunk = os.pread(fd, want, offset)
        if not chunk:
            break
        hasher.update(chunk)
        offset += len(chunk)
    return offset


def digest_fd(fd: int, size: int | None = None, *, use_mmap: bool = True) -> DigestResult:
    """BLAKE3 of the first `size` bytes of `fd` (all of it when None), from offset 0.

    The file position is not used or moved. `size` larger than the file is refused (a mapping
    past the end would fault). Raises KernelRefused with the errno when the fd cannot be read.
    """
    if size is not None and size < 0:
        raise InvalidArgument(f"digest size must be >= 0, not {size}")
    started = time.perf_counter()
    try:
        info = os.fstat(fd)
    except OSError as err:
        raise _read_refused(fd, err) from err
    if stat.S_ISDIR(info.st_mode):
        raise _read_refused(fd, OSError(errno.EISDIR, os.strerror(errno.EISDIR)))
    regular = stat.S_ISREG(info.st_mode)
    if size is not None and regular and size > info.st_size:
        raise InvalidArgument(
            f"fd {fd} holds {info.st_size} bytes, fewer than the {size} to digest: the file "
            "shrank or the recorded size is wrong")
    length = size if size is not None else info.st_size
    hasher = _new_hasher(length if regular else None)
    hashed: int
    try:
        if use_mmap and regular and length > 0:
            try:
                _hash_mmap(fd, length, hasher)
                hashed = length
            except OSError:
                # Some files cannot be mapped (ENODEV) but can be read; an fd that cannot be
                # read at all (O_WRONLY: EACCES here) gets its real errno from pread.
                hashed = _hash_pread(fd, length, hasher)
        else:
            # stat size 0 says nothing about debugfs/procfs files: read those to EOF.
            want = size if size is not None else (length if length > 0 else None)
            hashed = _hash_pread(fd, want, hasher)
    except OSError as err:
        raise _read_refused(fd, err) from err
    if size is not None and hashed < size:
        raise InvalidArgument(
            f"fd {fd} ended after {hashed} of the {size} bytes to digest: the file shrank "
            "while it was read")
    return DigestResult(DIGEST_ALG, hasher.hexdigest(), hashed, time.perf_counter() - started)
