"""`/dev/liveupdate` of the simulated kernel: the LiveUpdate / LiveUpdateDevice /
LiveUpdateSession seams with the 7.2/7.3 rules (docs/kernel-abi.md §3.1-§3.5).

Session fds are real: one end of a socketpair (O_CLOEXEC), so they can be passed to another
process (SCM_RIGHTS, D-Bus); the session's state itself stays in this process.

A preserved memfd cannot change size. The kernel freezes it (`shmem_freeze()` in
`memfd_luo_preserve()`) until it is unpreserved: ftruncate() to another size, a write past the
end and every fallocate() fail with EPERM. The simulator preserves the client's own memfd and
cannot hook its system calls; it freezes the size with the seals that give the same EPERM:
F_SEAL_SHRINK | F_SEAL_GROW, added at PRESERVE_FD (`freeze_size`). Where that differs:

- Seals need a memfd made with MFD_ALLOW_SEALING and without F_SEAL_SEAL. Any other file (a
  memfd without MFD_ALLOW_SEALING, whose seals are F_SEAL_SEAL from the start; one sealed with
  F_SEAL_SEAL; an unlinked tmpfs file) is preserved as the kernel would, but not frozen: a size
  change is found at reboot instead, which then fails with EINVAL and keeps the sessions
  (`Outgoing.check_freeze`), where the real kernel would have refused the resize itself.
- Seals stay: the kernel lifts the freeze when the file is unpreserved (its session closed
  before the reboot, or released), the simulator cannot remove a seal, so a file it froze keeps
  its size for good. A file whose PRESERVE_FD failed after the seals were added (the simulated
  memory ran out) keeps them too.
- Seals show: F_GET_SEALS on the client's file answers with the two bits added (the kernel's
  freeze is no seal). memfd-v2 records the seals the file had before, as the kernel does, and
  the handover notes the added bits beside it (handover.py, `sim-freeze.json`), so that the
  file restored after the simulated kexec has them again and what the agent recorded at ready
  compares equal; the real kernel restores a file that may change size.
- Seals are narrower: fallocate() inside the current size (hole punching, KEEP_SIZE
  allocation) still works on a sealed file; the kernel refuses every fallocate() of a frozen
  one. Neither changes the size.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

from ..abi.block import capacity
from ..abi.formats.records import LuoLimits
from ..abi.luo_common import SESSION_SER_SIZE
from ..abi.memfd import ALL_SEALS
from ..errors import KernelRefused
from ..kernel import sessionwire
from ..kernel.fsmagic import HUGETLBFS_MAGIC, TMPFS_MAGIC, fs_magic
from ..kernel.liveupdate import SESSION_NAME_LENGTH
from . import faults as faults_mod
from .boot_record import load, save
from .handover import IncomingSession, deserialize, restore_content
from .kernel import Runtime
from .outgoing import OutSession
from .store import lock_taken, locked, take_lock, write_atomic

F = TypeVar("F", bound=Callable[..., Any])


def _serialized(method: F) -> F:
    """Run under the simulated kernel's lock: session requests also arrive on the threads that
    serve handed-out session fds (kernel/sessionwire.py), as ioctls would from other processes."""
    @functools.wraps(method)
    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        with self._rt.lock:
            return method(self, *args, **kwargs)
    return cast(F, run)


LOCK_FILE = "liveupdate.lock"
HOLDER_FILE = "liveupdate.holder"
SESSION_BLOCK = capacity(SESSION_SER_SIZE)  # sessions per block of a block-chain LUO (51)
F_SEAL_FUTURE_WRITE = 0x10
F_SEAL_EXEC = 0x20
FREEZE_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW


def check_seals(seals: int) -> None:
    """memfd_luo_preserve() refuses seal bits outside MEMFD_LUO_ALL_SEALS."""
    if seals & ~ALL_SEALS:
        raise KernelRefused("PRESERVE_FD", errno.EOPNOTSUPP,
                            f"the memfd carries seals {seals:#x}; only {ALL_SEALS:#x} can be "
                            "preserved")


def freeze_size(fd: int, seals: int) -> int:
    """shmem_freeze() as far as userspace can (see the module's docstring): seal the file's size;
    return the seals added, 0 when it had them already or cannot be sealed."""
    missing = FREEZE_SEALS & ~seals
    if not missing or seals & fcntl.F_SEAL_SEAL:
        return 0
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, missing)
    except OSError as exc:
        # EPERM: sealing is not allowed on this file; EINVAL: the file takes no seals
        if exc.errno in (errno.EPERM, errno.EINVAL):
            return 0
        raise KernelRefused("PRESERVE_FD", exc.errno or errno.EIO, "the simulator could not "
                            "freeze the file's size") from exc
    return missing


def kernel_name(name: str, op: str) -> str:
    """The name as the kernel sees it in its 64-byte field: up to the first NUL; EINVAL when
    empty or with no NUL in 64 bytes."""
    raw = name.encode()
    if b"\0" in raw:
        raw = raw[:raw.index(b"\0")]
    if not raw or len(raw) >= SESSION_NAME_LENGTH:
        raise KernelRefused(op, errno.EINVAL, f"session name {name!r} must be 1 to "
                            f"{SESSION_NAME_LENGTH - 1} bytes")
    return raw.decode(errors="surrogateescape")


class SimLiveUpdate:
    def __init__(self, rt: Runtime) -> None:
        self._rt = rt

    def present(self) -> bool:
        self._rt.check()
        return self._rt.state.luo_enabled

    def holders(self) -> list[int]:
        """The process holding /dev/liveupdate open. The holder keeps a lock on LOCK_FILE, which
        the host kernel drops when the process dies (a SIGKILL too), as the real kernel
        releases the device with the process's files; the lock is looked at, not taken, so
        that looking never makes another process's open() fail."""
        directory = self._rt.directory
        if not lock_taken(directory / LOCK_FILE):
            return []
        try:
            pid = int((directory / HOLDER_FILE).read_text().strip() or 0)
        except (OSError, ValueError):
            pid = 0
        return [pid] if pid > 0 else []

    def open(self) -> SimLiveUpdateDevice:
        rt = self._rt
        rt.check()
        op = "open /dev/liveupdate"
        if not rt.state.luo_enabled:
            raise KernelRefused(op, errno.ENOENT, "the simulated kernel booted without KHO and "
                                f"LUO enabled (cmdline: {rt.state.cmdline!r}); boot it with "
                                "kho=on liveupdate=on")
        fd = take_lock(rt.directory / LOCK_FILE)
        if fd is None:
            pids = self.holders()
            who = f"process {pids[0]}" if pids else "another process"
            raise KernelRefused(op, errno.EBUSY, f"{who} holds /dev/liveupdate open (it opens "
                                "only once); close it there first")
        write_atomic(rt.directory / HOLDER_FILE, str(os.getpid()).encode())
        try:
            sessions = self._first_open()
        except KernelRefused:
            (rt.directory / HOLDER_FILE).unlink(missing_ok=True)
            os.close(fd)
            raise
        return SimLiveUpdateDevice(rt, fd, sessions)

    def adopt_session(self, fd: int, name: str) -> SimSession:
        """An incoming session handed back by systemd's fd store. A simulated kexec ends every
        process, so the fd the store kept is a stand-in: it must be open, and the session
        itself comes from the handed-over state, as RETRIEVE_SESSION would give it."""
        rt = self._rt
        op = "adopt session fd"
        try:
            os.fstat(fd)
        except OSError as exc:
            raise KernelRefused(op, exc.errno or errno.EBADF, f"the fd stored for session "
                                f"{name!r} is not open") from exc
        os.close(fd)
        rt.check()
        incoming = {s.name: s for s in self._first_open()}.get(name)
        log = rt.retrieval
        if incoming is None or log.finished(name):
            raise KernelRefused(op, errno.ENOENT, f"no incoming session named {name!r} "
                                "(never handed over, or already finished)")
        holder = log.holder(name)
        if holder is not None:
            raise KernelRefused(op, errno.EINVAL, f"session {name!r} is already retrieved and "
                                f"open (process {holder})")
        log.mark_retrieved(name)
        return SimSession(rt, name, incoming=incoming)

    def _first_open(self) -> list[IncomingSession]:
        """The first open after a live update deserializes the incoming sessions; a failure
        makes this and every later open of the boot fail with EIO."""
        rt = self._rt
        if not rt.state.incoming.present:
            return []
        sessions: list[IncomingSession] | str | None = None
        with locked(rt.directory):
            st = load(rt.directory)
            inc = st.incoming
            if inc.status == "pending":
                if faults_mod.pending(rt.directory).get("corrupt-handover") is not None:
                    sessions = "injected fault corrupt-handover"
                else:
                    sessions = deserialize(rt.directory, st.abi)
                inc.status, inc.error = (("error", sessions) if isinstance(sessions, str)
                                         else ("ok", ""))
                save(rt.directory, st)
        if inc.status == "error":
            faults_mod.take(rt.directory, "corrupt-handover")
            raise KernelRefused("open /dev/liveupdate", errno.EIO,
                                f"the incoming live-update state is unusable ({inc.error}); "
                                "the preserved sessions are lost: reboot cleanly")
        if sessions is None:  # deserialized by an earlier open of this boot: again, for us
            sessions = deserialize(rt.directory, st.abi)
        return sessions if isinstance(sessions, list) else []


class SimLiveUpdateDevice:
    def __init__(self, rt: Runtime, lock_fd: int, incoming: list[IncomingSession]) -> None:
        self._rt = rt
        self._fd = lock_fd
        self._incoming = {s.name: s for s in incoming}
        rt.closers.append(self.close)

    def _check(self) -> None:
        self._rt.check()
        if self._fd < 0:
            raise KernelRefused("ioctl /dev/liveupdate", errno.EBADF, "the device was closed")

    @_serialized
    def create_session(self, name: str) -> SimSession:
        self._check()
        op = "CREATE_SESSION"
        key = kernel_name(name, op)
        rt = self._rt
        rt.claim_outgoing()
        out = rt.outgoing
        count = len(out.sessions)
        blocks = rt.state.abi.luo_blocks
        limits = luo_limits(rt)
        if count >= limits.sessions:
            raise KernelRefused(op, getattr(errno, limits.sessions_errno),
                                f"{rt.state.abi.luo} holds at most {limits.sessions} sessions "
                                f"({limits.sessions_why}); close sessions first")
        if any(s.name == key for s in out.sessions):
            if blocks and count % SESSION_BLOCK == 0:
                out.empty_block = True  # the chain grew before the duplicate check (§1.5)
            raise KernelRefused(op, errno.EEXIST, f"an outgoing session named {key!r} exists; "
                                "use it or close it")
        out.empty_block = False
        session = OutSession(key)
        out.sessions.append(session)
        return SimSession(rt, key, outgoing=session)

    @_serialized
    def retrieve_session(self, name: str) -> SimSession:
        self._check()
        op = "RETRIEVE_SESSION"
        key = name.encode().split(b"\0")[0][:SESSION_NAME_LENGTH].decode(
            errors="surrogateescape")
        rt = self._rt
        incoming = self._incoming.get(key)
        log = rt.retrieval
        holder = log.holder(key)
        if incoming is None or log.finished(key):
            raise KernelRefused(op, errno.ENOENT, f"no incoming session named {key!r} "
                                "(never handed over, or already finished)")
        if holder is not None:
            raise KernelRefused(op, errno.EINVAL, f"session {key!r} is already retrieved "
                                f"and open (process {holder})")
        log.mark_retrieved(key)
        return SimSession(rt, key, incoming=incoming)

    def close(self) -> None:
        if self._fd >= 0:
            if self.close in self._rt.closers:
                self._rt.closers.remove(self.close)
            if not self._rt.gone:
                (self._rt.directory / HOLDER_FILE).unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = -1


class SimSession:
    def __init__(self, rt: Runtime, name: str, *, outgoing: OutSession | None = None,
                 incoming: IncomingSession | None = None) -> None:
        self._rt = rt
        self._name = name
        self._out = outgoing
        self._in = incoming
        self._sock, self._peer = socket.socketpair()  # both ends O_CLOEXEC
        self._server: threading.Thread | None = None
        self._closed = False
        self._finished = False
        self._retrieved: dict[int, int] = {}   # token -> restored memfd (the kernel's file)
        self._errors: dict[int, int] = {}      # token -> cached errno of a failed retrieve
        rt.closers.append(self._drop)

    @property
    def name(self) -> str:
        return self._name

    @property
    def incoming(self) -> bool:
        return self._in is not None

    def fileno(self) -> int:
        # Handed out (to a client, to the fd store): from now on someone may send it the
        # session requests a real session fd takes as ioctls (kernel/sessionwire.py)
        if self._server is None and not self._closed:
            self._server = sessionwire.start_server(self, self._peer, self._rt.lock,
                                                  self._name)
        return self._sock.fileno()

    def _check(self, op: str) -> None:
        self._rt.check()
        if self._closed:
            raise KernelRefused(op, errno.EBADF, f"session {self._name!r} was closed")

    def get_name(self) -> str:
        self._check("GET_NAME")
        return self._name

    @_serialized
    def preserve_fd(self, fd: int, token: int) -> None:
        op = "PRESERVE_FD"
        self._check(op)
        out = self._out
        if out is None:
            raise KernelRefused(op, errno.EINVAL, f"session {self._name!r} was retrieved from "
                                "the previous kernel; preserve files in a session created in "
                                "this boot")
        rt = self._rt
        if any(f.token == token for f in out.files):
            raise KernelRefused(op, errno.EEXIST, f"token {token:#x} is already used in "
                                f"session {self._name!r}")
        limits = luo_limits(rt)
        if len(out.files) >= limits.files_per_session:
            raise KernelRefused(op, getattr(errno, limits.files_errno), f"session "
                                f"{self._name!r} holds its maximum of "
                                f"{limits.files_per_session} files; use another session")
        try:
            st = os.fstat(fd)
            fstype = fs_magic(fd)
        except OSError as exc:
            raise KernelRefused(op, exc.errno or errno.EBADF, f"fd {fd} is not an open "
                                "file") from exc
        if fstype != TMPFS_MAGIC or st.st_nlink != 0:
            what = ("a hugetlb memfd" if fstype == HUGETLBFS_MAGIC else
                    "a linked tmpfs file" if fstype == TMPFS_MAGIC else "not a memfd")
            raise KernelRefused(op, errno.ENOENT, f"fd {fd} is {what}: only memfds and "
                                "unlinked shmem files can be preserved")
        inode = (st.st_dev, st.st_ino)
        for session in out_sessions(rt):
            if any(f.inode == inode for f in session.files):
                raise KernelRefused(op, errno.EBUSY, f"that file is already preserved in "
                                    f"session {session.name!r}")
        if inode in rt.retrieved_inodes:
            raise KernelRefused(op, errno.EBUSY, "that file was retrieved from incoming session "
                                f"{rt.retrieved_inodes[inode]!r}, which is not finished; "
                                "FINISH it first")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        except OSError:
            seals = 0
        check_seals(seals)
        # frozen before the content is read: from here on the size read is the size it keeps
        frozen = freeze_size(fd, seals)
        rt.outgoing.preserve(out, fd, token, inode, seals, frozen)

    @_serialized
    def retrieve_fd(self, token: int) -> int:
        op = "RETRIEVE_FD"
        self._check(op)
        if self._in is None:
            raise KernelRefused(op, errno.EINVAL, f"session {self._name!r} was created in this "
                                "boot; RETRIEVE_FD works on retrieved sessions")
        if self._finished:
            raise KernelRefused(op, errno.ENOENT, f"session {self._name!r} is finished")
        if token in self._errors:
            raise KernelRefused(op, self._errors[token], f"restoring token {token:#x} failed "
                                "before; the error stays")
        if token in self._retrieved:
            return fcntl.fcntl(self._retrieved[token], fcntl.F_DUPFD_CLOEXEC, 0)
        entry = next((f for f in self._in.files if f.token == token), None)
        if entry is None:
            raise KernelRefused(op, errno.ENOENT, f"session {self._name!r} has no token "
                                f"{token:#x}")
        content = (restore_content(self._rt.handover_memory(), entry.memfd) if entry.memfd
                   else "EIO")
        if isinstance(content, str):
            self._errors[token] = getattr(errno, content)
            raise KernelRefused(op, self._errors[token], f"token {token:#x} cannot be "
                                "restored")
        assert entry.memfd is not None
        fd = _restore_memfd(content, entry.memfd.pos, (entry.memfd.seals or 0) | entry.frozen)
        self._retrieved[token] = fd
        st = os.fstat(fd)
        self._rt.retrieved_inodes[(st.st_dev, st.st_ino)] = self._name
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)

    @_serialized
    def finish(self) -> None:
        op = "FINISH"
        self._check(op)
        if self._in is None:
            raise KernelRefused(op, errno.EINVAL, f"session {self._name!r} was created in this "
                                "boot; FINISH works on retrieved sessions")
        self._do_finish()

    def _do_finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        for fd in self._retrieved.values():
            info = os.fstat(fd)
            self._rt.retrieved_inodes.pop((info.st_dev, info.st_ino), None)
            os.close(fd)  # LUO drops its reference; the caller's fds stay valid
        self._retrieved.clear()
        self._rt.retrieval.mark_finished(self._name)

    def _close_sockets(self) -> None:
        if self._server is not None:
            # wakes the server thread's recvmsg (a close alone would not)
            with contextlib.suppress(OSError):
                self._peer.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._peer.close()

    def _drop(self) -> None:
        """The process is gone (kexec): every fd it held is closed."""
        self._closed = True
        self._close_sockets()
        for fd in self._retrieved.values():
            os.close(fd)
        self._retrieved.clear()

    @_serialized
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._close_sockets()
        rt = self._rt
        if self._drop in rt.closers:
            rt.closers.remove(self._drop)
        if rt.gone:
            return
        if self._out is not None:
            out = rt.outgoing
            out.unpreserve(self._out)
            out.sessions.remove(self._out)
            out.empty_block = False  # the chain shrinks
            if not out.sessions:
                rt.release_outgoing()
            return
        self._do_finish()  # closing a retrieved session finishes it


def luo_limits(rt: Runtime) -> LuoLimits:
    """The caps of the LUO version this kernel speaks (its record's)."""
    return rt.state.abi.luo_format.limits


def out_sessions(rt: Runtime) -> list[OutSession]:
    return rt.outgoing.sessions


def _restore_memfd(content: bytes, pos: int, seals: int) -> int:
    """memfd_luo_retrieve(): a new memfd with an empty name and MFD_ALLOW_SEALING, the saved
    content, size and position, then the saved seals (and those the simulator froze the size
    with before the kexec)."""
    fd = os.memfd_create("", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, len(content))
        view = memoryview(content)
        done = 0
        while done < len(content):
            done += os.pwrite(fd, view[done:done + (1 << 24)], done)
        os.lseek(fd, pos, os.SEEK_SET)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except OSError:
        os.close(fd)
        raise
    return fd

