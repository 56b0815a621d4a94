"""For VM managers written in Python: kho-agentd's session calls, and the session fds it hands out.

`AgentClient` makes the calls of docs/vmm-integration.md over D-Bus (Gio: they pass unix fds),
raises the agent's errors as the same `AgentError` classes the daemon raised (name, message and
exit code kept), and waits for a session after the kexec as the agent asks (it answers `Busy`
until it has retrieved the session, or until its digests are checked).

`CreateSession` and `RetrieveSession` return a LUO session fd. On a real kernel it takes LUO's
session ioctls (PRESERVE_FD, RETRIEVE_FD, FINISH, GET_NAME); on the simulated kernel
(`kho-agentd --simulate`, a rehearsal) it is a socket that takes the same requests as messages
(kho_agent/kernel/sessionwire.py). `session_from_fd` returns the right one, so a client rehearses
with the code it will run in production.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import time
from collections.abc import Sequence
from typing import Any

import gi

gi.require_version("Gio", "2.0")
gi.require_version("GLib", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

from .errors import AgentError, Busy, KernelRefused  # noqa: E402
from .kernel import sessionwire  # noqa: E402
from .kernel.liveupdate import (  # noqa: E402
    LiveUpdateSession,
    RealLiveUpdateSession,
    validate_token,
)
from .service import contract  # noqa: E402
from .service import interfaces as api  # noqa: E402
from .service.errors import NOT_ON_BUS_ERRORS, DaemonUnreachable, from_dbus  # noqa: E402


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


def remote_error(err: GLib.Error) -> tuple[str, str] | None:
    """(the D-Bus error name, its message) of an error reply; None for a local error.
    Gio.DBusError.strip_remote_error edits a C copy of the error in PyGObject, not the Python
    object: the "GDBus.Error:NAME: " prefix is stripped here."""
    if not Gio.DBusError.is_remote_error(err):
        return None
    name: str = Gio.DBusError.get_remote_error(err)
    message: str = err.message
    return name, message.removeprefix(f"GDBus.Error:{name}: ")


class AgentClient:
    """kho-agentd's Manager for one VM manager: one Gio connection (the system bus unless one
    is given), calls bounded by `call_timeout_s`. Every fd passed in stays the caller's; every
    fd or session returned is the caller's to close."""

    def __init__(self, connection: Gio.DBusConnection | None = None, *,
                 call_timeout_s: float = 600) -> None:
        self.connection = connection or Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
        self.call_timeout_ms = int(call_timeout_s * 1000)

    def call(self, method: str, *values: Any, fds: Sequence[int] = ()
             ) -> tuple[tuple[Any, ...], list[int]]:
        """One Manager call with `values` as the method's declared in arguments (contract.py):
        (the unpacked reply, checked against its declared out arguments; the fds it carried).
        An error of the agent is raised as its AgentError; no agent on the bus as
        DaemonUnreachable; another error of the bus as AgentError naming it."""
        declared = contract.MANAGER.method(method)
        fd_list = None
        if fds:
            fd_list = Gio.UnixFDList.new()
            for fd in fds:
                fd_list.append(fd)  # a duplicate: the caller keeps its own
        args = GLib.Variant(declared.in_type, values) if declared.in_args else None
        try:
            reply, out = self.connection.call_with_unix_fd_list_sync(
                api.BUS_NAME, api.MANAGER_PATH, api.MANAGER_IFACE, method, args,
                GLib.VariantType.new(declared.out_type),
                Gio.DBusCallFlags.NONE, self.call_timeout_ms, fd_list, None)
        except GLib.Error as exc:
            name, message = remote_error(exc) or ("", exc.message)
            if name in NOT_ON_BUS_ERRORS:
                raise DaemonUnreachable(f"kho-agentd is not on the bus ({message})") from exc
            raise from_dbus(name, message) from exc
        received: list[int] = list(out.steal_fds()) if out is not None else []
        return (tuple(reply.unpack()) if reply is not None else ()), received

    def _one_fd(self, method: str, *values: Any) -> tuple[tuple[Any, ...], int]:
        reply, fds = self.call(method, *values)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise AgentError(f"{method}: the agent sent {len(fds)} fds instead of one")
        return reply, fds[0]

    def create_session(self, name: str, *, digests: bool | None = None,
                       fd_store: bool = False) -> tuple[str, LiveUpdateSession]:
        """A new session (its object path, its fd). `digests`: whether the agent digests its
        files at SetReady and checks them after the kexec (None: the daemon's default); a
        session with digests is handed back after the kexec only once they are checked.
        `fd_store`: the caller keeps the session fd in its own service's fd store (systemd >=
        261, FileDescriptorStorePreserve=) and gets it back from systemd after the kexec."""
        options: dict[str, GLib.Variant] = {}
        if digests is not None:
            options["digests"] = GLib.Variant("b", digests)
        if fd_store:
            options["fd_store"] = GLib.Variant("b", True)
        if not options:
            reply, fd = self._one_fd("CreateSession", name)
        else:
            reply, fd = self._one_fd("CreateSessionWithOptions", name, options)
        return str(reply[0]), session_from_fd(fd, name, incoming=False)

    def preserve(self, name: str, fd: int, token: int) -> None:
        validate_token(token)
        self.call("Preserve", name, 0, token, fds=[fd])

    def set_ready(self, name: str, ready: bool = True) -> None:
        self.call("SetReady", name, ready)

    def release_session(self, name: str) -> None:
        self.call("ReleaseSession", name)

    def retrieve_session(self, name: str, *, wait_s: float = 300,
                         poll_s: float = 0.05) -> LiveUpdateSession:
        """The incoming session after the kexec, as soon as the agent hands it back: while the
        agent is not on the bus yet or answers Busy (still retrieving, or checking the
        session's digests), ask again, for at most `wait_s`. Any other error is raised at once
        (NotFound: the agent does not have it; the verification report says why)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                _reply, fd = self._one_fd("RetrieveSession", name)
                return session_from_fd(fd, name, incoming=True)
            except AgentError as exc:
                waiting = isinstance(exc, Busy | DaemonUnreachable)
                if not waiting or time.monotonic() + poll_s > deadline:
                    raise
            time.sleep(poll_s)

    def check_kept_session(self, name: str, session_fd: int) -> tuple[bool, list[dict[str, Any]]]:
        """After the kexec, for a session created with `fd_store=True` and handed back by
        systemd from the caller's own fd store: the agent checks it against what it recorded
        (sizes, seals, digests). Whether all matched, and the items."""
        (ok, items), fds = self.call("CheckKeptSession", name, 0, fds=[session_fd])
        for fd in fds:
            os.close(fd)
        return bool(ok), list(json.loads(items))

    def retrieve_file(self, name: str, token: int) -> int:
        """RETRIEVE_FD through the agent (the same as on the session fd)."""
        validate_token(token)
        return self._one_fd("RetrieveFile", name, token)[1]

    def finish_session(self, name: str) -> None:
        """FINISH the incoming session once the VM runs: the kernel releases what was not
        retrieved, and the agent forgets the session."""
        self.call("FinishSession", name)
