"""Replacing a file so that a crash leaves the old content or the new, never a mix (the agent's
state, its manifest, its verification record, the image strings it keeps).

A failure is a StorageFailed (the agent's own files, not the kernel: exit 2, D-Bus
StorageFailed) carrying the errno and what the operator can do about it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from ..errors import StorageFailed


def _advice_for(err: OSError, directory: Path) -> str:
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"free space on the filesystem holding {directory} (or raise the quota) and "
                "retry")
    if code == errno.EROFS:
        return (f"{directory} is on a read-only filesystem; remount it read-write or use a "
                "state directory on a writable filesystem")
    if code in (errno.EACCES, errno.EPERM):
        return f"the agent may not write in {directory}; run it as root or fix the permissions"
    if code == errno.ENOENT:
        return f"the directory {directory} does not exist; create it and retry"
    if code == errno.EIO:
        return "the storage reported an I/O error; check the kernel log (dmesg) and the disk"
    return f"check the state directory {directory} and retry"


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a crash or an error leaves the old or the new content,
    never a mix: a temporary file in the same directory, written, fsynced, renamed over `path`,
    then the directory fsynced. On failure the old file is intact and the temporary file gone;
    the error is a StorageFailed carrying the errno and what to do."""
    directory = path.parent
    tmp: str | None = None
    renamed = False
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        renamed = True
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        if tmp is not None and not renamed:
            # Best effort: the error worth reporting is the one that stopped the write.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        code = err.errno if err.errno is not None else errno.EIO
        if renamed:
            advice = (f"the new {path.name} is in place but may not survive a crash; "
                      + _advice_for(err, directory))
        else:
            advice = f"{path} was left as it was; " + _advice_for(err, directory)
        raise StorageFailed(f"writing {path}", code, advice) from err
