"""Files of the simulator directory: atomic writes, the locks that serialise read-modify-write of
shared state between processes, process identities that survive pid reuse, and the crash points
of boot transitions.

Crash points (tests only). A boot transition (boots.py) passes a crash point before each of its
steps (a file written or renamed, a directory made or removed, the switch to the new boot) and
one when it is done. A process started with the environment variable `KHO_SIM_CRASH_AT=N`
(N >= 1) sends itself SIGKILL at the N-th crash point it passes, counted over its transitions;
`KHO_SIM_CRASH_AT=NAME` at the first point of that name (`switch`: just before the rename that
switches to the new boot, `switched`: just after it). Outside a transition crash points do
nothing, and without the variable each costs one comparison. tests/test_sim_atomic.py kills a
process at every N until the transition completes, and checks that the next process finds the
old boot or the new one, whole.
"""

from __future__ import annotations

import fcntl
import os
import re
import signal
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import AgentError

STATE_LOCK = "state.lock"
CRASH_ENV = "KHO_SIM_CRASH_AT"
KEXECD = ("the simulated kernel has kexec'd into a new boot: objects of the old boot (device, "
          "sessions, seams) are gone, as a real process would be; attach a new "
          "SimKernel(directory)")


def _crash_at() -> tuple[int, str]:
    raw = os.environ.get(CRASH_ENV, "").strip()
    if raw.isdigit():
        return int(raw), ""
    return (-1, raw) if raw else (0, "")


_CRASH_AT, _CRASH_NAME = _crash_at()   # read once: the hook must cost nothing when unset
_crash_steps = 0
_crash_armed = 0          # > 0 while a transition runs in this process


@contextmanager
def crash_points() -> Iterator[None]:
    """Count the crash points passed inside this block (a boot transition)."""
    global _crash_armed
    _crash_armed += 1
    try:
        yield
    finally:
        _crash_armed -= 1


def crash_point(name: str = "") -> None:
    """One step of a boot transition: with KHO_SIM_CRASH_AT=N the N-th, with
    KHO_SIM_CRASH_AT=NAME the one of that name, ends the process."""
    global _crash_steps
    if not _CRASH_AT or not _crash_armed:
        return
    _crash_steps += 1
    if _crash_steps == _CRASH_AT or (name and name == _CRASH_NAME):
        os.kill(os.getpid(), signal.SIGKILL)


def crash_steps() -> int:
    """Crash points passed so far in this process (counted only with KHO_SIM_CRASH_AT set)."""
    return _crash_steps


TMP_NAME = re.compile(r"^\..+\.(\d+)\.tmp$")


# Directories whose readers list them (KHO debugfs `sub_fdts/`: every file is a subtree): a
# temporary file there would be read as one more subtree by a reader in another thread or
# process, which the kernel's debugfs never shows. Their files are written beside the directory
# and renamed into it (the same filesystem).
LISTED_DIRS = frozenset({"sub_fdts"})


def tmp_path(path: Path) -> Path:
    # the pid in the name lets recovery tell a dead writer's leftover from a live one's file
    parent = path.parent.parent if path.parent.name in LISTED_DIRS else path.parent
    return parent / f".{path.name}.{os.getpid()}.tmp"


def write_atomic(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Replace `path` so that a reader in another process sees the old or the new file, never a
    half-written one. The directory must exist: a process whose boot was switched away (and
    removed) must not bring the old boot's directories back by writing into them. `durable`
    syncs the data before the rename (the file survives a host crash as old or new)."""
    tmp = tmp_path(path)
    crash_point()
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        crash_point()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_new(path: Path, data: bytes) -> None:
    """Write a file of a boot being built (invisible until the switch: no rename needed)."""
    crash_point()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


def remove_tree(path: Path) -> None:
    """Remove a file or a directory tree, bottom-up, a crash point at each directory: a process
    killed half-way leaves a partly removed tree, which recovery removes."""
    crash_point()
    try:
        if not path.is_dir() or path.is_symlink():
            path.unlink(missing_ok=True)
            return
        entries = list(os.scandir(path))
    except FileNotFoundError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            remove_tree(Path(entry.path))
        else:
            with suppress(FileNotFoundError):
                os.unlink(entry.path)
    with suppress(FileNotFoundError):
        path.rmdir()


def fsync_tree(path: Path) -> None:
    """Flush every file and directory under `path` to disk (before a switch makes it current:
    after a host crash the switch must not be on disk without what it points to)."""
    for top, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(top, name), os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(top))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Held:
    def __init__(self) -> None:
        self.thread_lock = threading.RLock()
        self.fd = -1
        self.depth = 0


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold the directory's state lock (blocking). Reentrant within a process: a boot transition
    holds it while it calls code that takes it again (a second flock() on another open file
    would wait for this process itself). Threads of the process wait for each other. A process
    that dies holding it releases it with its open files; what it wrote is either replaced
    whole (write_atomic) or part of a boot that was never switched to. A boot's directory that
    is gone was switched away from: that is said as such (KEXECD)."""
    key = os.path.abspath(directory / STATE_LOCK)
    with _held_guard:
        held = _held.setdefault(key, _Held())
    with held.thread_lock:
        if held.depth == 0:
            try:
                fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                raise AgentError(KEXECD) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            held.fd = fd
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0:
                os.close(held.fd)
                held.fd = -1


# struct flock as fcntl(2) takes it: l_type, l_whence, l_start, l_len, l_pid (+ padding)
_FLOCK = struct.Struct("hhqqi4x")


def _whole_file(kind: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0)


def take_lock(path: Path) -> int | None:
    """Take the write lock of `path` (created if missing) without waiting; return the fd that
    holds it, or None when another open file holds it. An open-file-description lock: the host
    kernel drops it when that fd is closed, which happens when its process exits, however (a
    SIGKILL too). Another description conflicts with it, in this process or another."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _whole_file(fcntl.F_WRLCK))
    except (BlockingIOError, PermissionError):
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_taken(path: Path) -> bool:
    """Whether some open file holds the lock of `path`: asked (F_OFD_GETLK) without taking it,
    so that a look never makes a concurrent take_lock() fail."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        raw = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _whole_file(fcntl.F_WRLCK))
    finally:
        os.close(fd)
    return bool(_FLOCK.unpack(raw)[0] != fcntl.F_UNLCK)


def process_start(pid: int) -> int | None:
    """The start time of process `pid` (clock ticks after boot, /proc/PID/stat field 22), or
    None when there is no such process. With the pid it names one process for good: pids are
    reused (pid_max is often 32768), start times of one pid are not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # the command name (field 2) is in parentheses and may hold spaces or ')'
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


_own: tuple[int, int] | None = None


def own_identity() -> tuple[int, int]:
    """(pid, start time) of this process, read once per process (a forked child re-reads)."""
    global _own
    pid = os.getpid()
    if _own is None or _own[0] != pid:
        _own = (pid, process_start(pid) or 0)
    return _own


def pid_alive(pid: int, start: int | None = None) -> bool:
    """Whether process `pid` runs; with `start`, whether it is still the process that started
    then (not a later process that got the same pid)."""
    if pid <= 0:
        return False
    if start is not None:
        now = process_start(pid)
        return now is not None and now == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
