"""For VM managers written in Python: use a session fd that kho-agentd handed out.

`CreateSession` and `RetrieveSession` return a LUO session fd over D-Bus. On a real kernel it
takes LUO's session ioctls (PRESERVE_FD, RETRIEVE_FD, FINISH, GET_NAME); on the simulated kernel
(`kho-agentd --simulate`, a rehearsal) it is a socket that takes the same requests as messages
(kho_agent/kernel/sessionwire.py). `session_from_fd` returns the right one, so a client rehearses
with the code it will run in production.
"""

from __future__ import annotations

import errno
import os
import stat

from .errors import KernelRefused
from .kernel import sessionwire
from .kernel.liveupdate import LiveUpdateSession, RealLiveUpdateSession, validate_token


class SimulatedSessionFd:
    """A session fd of the simulated kernel, driven through its socket."""

    def __init__(self, fd: int, name: str, incoming: bool) -> None:
        self._fd = fd
        self._name = name
        self._incoming = incoming

    @property
    def name(self) -> str:
        return self._name

    @property
    def incoming(self) -> bool:
        return self._incoming

    def fileno(self) -> int:
        if self._fd < 0:
            raise KernelRefused("fileno", errno.EBADF, f"session {self._name!r} was closed")
        return self._fd

    def preserve_fd(self, fd: int, token: int) -> None:
        validate_token(token)
        sessionwire.request(self.fileno(), sessionwire.OP_PRESERVE_FD, token, send_fd=fd)

    def retrieve_fd(self, token: int) -> int:
        validate_token(token)
        _name, fd = sessionwire.request(self.fileno(), sessionwire.OP_RETRIEVE_FD, token)
        if fd is None:
            raise KernelRefused("RETRIEVE_FD", errno.EIO, "the simulated kernel sent no fd")
        return fd

    def finish(self) -> None:
        sessionwire.request(self.fileno(), sessionwire.OP_FINISH)

    def get_name(self) -> str:
        name, _fd = sessionwire.request(self.fileno(), sessionwire.OP_GET_NAME)
        return name.decode("utf-8", errors="surrogateescape")

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def session_from_fd(fd: int, name: str, *, incoming: bool) -> LiveUpdateSession:
    """Wrap a session fd from kho-agentd (the wrapper owns it: close() closes it). `incoming`:
    it came from RetrieveSession (after the live update) rather than CreateSession."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise KernelRefused("fstat", exc.errno or errno.EBADF, f"fd {fd} is not open") from exc
    if stat.S_ISSOCK(mode):
        return SimulatedSessionFd(fd, name, incoming)
    return RealLiveUpdateSession(fd, name, incoming)
