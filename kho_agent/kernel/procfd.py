"""Which processes hold a file open, from `/proc/PID/fd/*`.

Used to name the holder of `/dev/liveupdate` when opening it fails with EBUSY (the device admits
one open file per host). `/proc` hangs off the host root like every other path, so a test or the
simulator can lay out `<root>/proc/<pid>/fd/<n>` symlinks of its own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Errors of a process that exits or is out of reach while we look at it: skip it, do not fail.
_GONE_OR_DENIED = (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError)


@dataclass(frozen=True)
class FdHolder:
    pid: int
    comm: str  # "?" when /proc/PID/comm cannot be read
    fds: tuple[int, ...]


def _candidates(target: Path) -> set[str]:
    """The link texts that mean `target`: the kernel writes the canonical path, a hand-made
    tree may write the path as given (e.g. through a symlinked /tmp)."""
    return {os.path.normpath(str(target)), os.path.realpath(target)}


def _link_text(link: str) -> str:
    text = os.readlink(link)
    if not os.path.isabs(text):  # only hand-made trees use relative links; /proc never does
        text = os.path.join(os.path.dirname(link), text)
    return os.path.normpath(text)


def _comm(proc: Path, pid: int) -> str:
    try:
        return (proc / str(pid) / "comm").read_text(errors="replace").strip() or "?"
    except _GONE_OR_DENIED:
        return "?"


def find_holders(target: Path, proc: Path = Path("/proc")) -> list[FdHolder]:
    """Processes with an fd whose /proc link names `target`, by pid. Processes that vanish or
    deny access during the scan are skipped."""
    wanted = _candidates(target)
    try:
        entries = [e.name for e in os.scandir(proc) if e.name.isdigit()]
    except _GONE_OR_DENIED:
        return []
    holders: list[FdHolder] = []
    for name in entries:
        fd_dir = os.path.join(proc, name, "fd")
        try:
            fds = [e.name for e in os.scandir(fd_dir) if e.name.isdigit()]
        except _GONE_OR_DENIED:
            continue
        matched: list[int] = []
        for fd in fds:
            try:
                if _link_text(os.path.join(fd_dir, fd)) in wanted:
                    matched.append(int(fd))
            except OSError:
                # the fd or process went away, access is denied, or (EINVAL) an entry of a
                # hand-made tree is not a symlink: none of these is a holder
                continue
        if matched:
            pid = int(name)
            holders.append(FdHolder(pid, _comm(proc, pid), tuple(sorted(matched))))
    return sorted(holders, key=lambda h: h.pid)


def holder_pids(target: Path, proc: Path = Path("/proc")) -> list[int]:
    return [h.pid for h in find_holders(target, proc)]


def describe_holders(holders: list[FdHolder], self_pid: int | None = None) -> str:
    """`pid 812 (kho-agentd), pid 900 (python3)`; "unknown holder" when the scan found none
    (another pid namespace, or /proc not readable)."""
    if not holders:
        return "unknown holder"
    me = os.getpid() if self_pid is None else self_pid
    parts = []
    for h in holders:
        mine = ", this process" if h.pid == me else ""
        parts.append(f"pid {h.pid} ({h.comm}{mine})")
    return ", ".join(parts)
