"""Which filesystem a file lives on (fstatfs f_type): LUO's memfd handler takes only shmem files,
and refuses hugetlbfs ones."""

from __future__ import annotations

import ctypes
import os
import sys

TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
_STATFS_SIZE = 120  # struct statfs on 64-bit Linux; f_type is its first field, a long


def fs_magic(fd: int) -> int:
    """fstatfs(fd).f_type; OSError with the errno when the call fails (os has no fstatfs)."""
    buf = ctypes.create_string_buffer(_STATFS_SIZE)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int.from_bytes(buf.raw[:ctypes.sizeof(ctypes.c_long)], sys.byteorder) & 0xFFFFFFFF
