"""The session fd of the simulated kernel: LUO's session ioctls, carried over its socket.

A real session fd is an anon inode that takes PRESERVE_FD, RETRIEVE_FD, FINISH and GET_NAME
ioctls. The simulated kernel's session fd is one end of a socketpair (ioctls cannot be served
from userspace), so a VM manager rehearsing against it sends the same requests as messages
instead: `kho_agent.client` does that for it, and the real ioctl on a real kernel. The other end
is served by a thread of the process that holds the simulated kernel (the agent), which runs
the request on the session exactly as the ioctl would, errno included.

Wire format (native byte order, both directions one message each, fds as SCM_RIGHTS):
request `op u32, token u64` (+ the fd to preserve); reply `errno i32` (0: done),
`name 64 bytes` (GET_NAME) (+ the retrieved fd).
"""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
import threading
from typing import Protocol

from ..errors import AgentError, KernelRefused

OP_PRESERVE_FD = 1
OP_RETRIEVE_FD = 2
OP_FINISH = 3
OP_GET_NAME = 4
OP_NAMES = {OP_PRESERVE_FD: "PRESERVE_FD", OP_RETRIEVE_FD: "RETRIEVE_FD", OP_FINISH: "FINISH",
            OP_GET_NAME: "GET_NAME"}
REQUEST = struct.Struct("=IQ")
REPLY = struct.Struct("=i64s")
_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)


class ServedSession(Protocol):
    def preserve_fd(self, fd: int, token: int) -> None: ...

    def retrieve_fd(self, token: int) -> int: ...

    def finish(self) -> None: ...

    def get_name(self) -> str: ...


def _fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(data) - len(data) % array.array("i").itemsize
            fds.extend(array.array("i", data[:usable]))
    return fds


def _answer(session: ServedSession, op: int, token: int, fds: list[int]
            ) -> tuple[int, bytes, int | None]:
    """(errno, name, fd to send) for one request, as the kernel would answer the ioctl."""
    try:
        if op == OP_PRESERVE_FD:
            if len(fds) != 1:
                return errno.EBADF, b"", None
            session.preserve_fd(fds[0], token)
            return 0, b"", None
        if op == OP_RETRIEVE_FD:
            return 0, b"", session.retrieve_fd(token)
        if op == OP_FINISH:
            session.finish()
            return 0, b"", None
        if op == OP_GET_NAME:
            return 0, session.get_name().encode("utf-8", errors="surrogateescape"), None
        return errno.EINVAL, b"", None  # the real device: unknown ioctl -> EINVAL
    except KernelRefused as exc:
        return exc.errno, b"", None
    except AgentError:  # the simulated kernel kexec'd away from this process
        return errno.EIO, b"", None


def serve(session: ServedSession, peer: socket.socket, lock: threading.RLock) -> None:
    """Answer requests on `peer` until the session's socket is shut down (thread body)."""
    while True:
        try:
            data, ancdata, _flags, _addr = peer.recvmsg(REQUEST.size, _FD_SPACE)
        except OSError:
            return
        if not data:
            return
        fds = _fds(ancdata)
        try:
            if len(data) != REQUEST.size:
                err, name, out = errno.EINVAL, b"", None
            else:
                op, token = REQUEST.unpack(data)
                with lock:
                    err, name, out = _answer(session, op, token, fds)
        finally:
            for fd in fds:
                os.close(fd)
        ancillary = [] if out is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                            array.array("i", [out]).tobytes())]
        try:
            peer.sendmsg([REPLY.pack(err, name)], ancillary)
        except OSError:
            return
        finally:
            if out is not None:
                os.close(out)


def start_server(session: ServedSession, peer: socket.socket, lock: threading.RLock,
                 name: str) -> threading.Thread:
    thread = threading.Thread(target=serve, args=(session, peer, lock), daemon=True,
                              name=f"sim-session-{name}")
    thread.start()
    return thread


def request(fd: int, op: int, token: int = 0, send_fd: int | None = None
            ) -> tuple[bytes, int | None]:
    """Send one request on a simulated session fd: (name, received fd); raises KernelRefused
    with the errno the simulated kernel answered."""
    what = OP_NAMES.get(op, str(op))
    ancillary = [] if send_fd is None else [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                             array.array("i", [send_fd]).tobytes())]
    # a duplicate, so that closing the socket object leaves the caller's fd alone
    with socket.socket(fileno=os.dup(fd)) as sock:
        try:
            sock.sendmsg([REQUEST.pack(op, token)], ancillary)
            data, ancdata, _flags, _addr = sock.recvmsg(REPLY.size, _FD_SPACE)
        except OSError as exc:
            raise KernelRefused(what, exc.errno or errno.EIO, "the simulated session did not "
                                "answer (its agent closed it or exited)") from exc
    fds = _fds(ancdata)
    if len(data) != REPLY.size:
        for extra in fds:
            os.close(extra)
        raise KernelRefused(what, errno.EIO, "the simulated session closed while asked")
    err, name = REPLY.unpack(data)
    if err:
        for extra in fds:
            os.close(extra)
        raise KernelRefused(what, err, f"the simulated kernel refused {what}")
    return name.split(b"\0")[0], fds[0] if fds else None

