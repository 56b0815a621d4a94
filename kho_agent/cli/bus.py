"""The kho-agentctl side of the D-Bus API: one Gio connection to kho-agentd.

Gio, not pydbus: calls may pass unix fds, error names must be read exactly (they carry the
agent's error, rebuilt here with `from_dbus` so the exit code survives the bus), and a job is
followed through signals on a private main context, so nothing here needs a main loop.

A job is followed by subscribing to its signals *before* the call that starts it (the
PropertiesChanged of every Job object and the Manager's JobRemoved): a job that ends before its
path comes back in the reply is still seen whole.

Every wait is bounded by one deadline, the command's --timeout: connecting (asynchronously, so a
bus that does not answer cannot hang us either), each call (also capped at CALL_TIMEOUT_MS),
property reads, and following a job. A daemon that owns its name but does not answer in time
(stopped with SIGSTOP, hung, overloaded) is DaemonNotResponding; one that is not there is
DaemonUnreachable; a job still running when the wait ends is JobNotFinished.

--kernel and --initrd are opened here, with this process's rights (kernel/callerfile.py: regular
files only, never blocking), and sent as file descriptors (`kernel_fd`/`initrd_fd`, type h: an
index into the message's fd list) beside their absolute names (`kernel`/`initrd`, shown and
recorded only): kho-agentd reads what the caller could open, never a path on its behalf.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import gi

gi.require_version("Gio", "2.0")
gi.require_version("GLib", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

from ..client import remote_error  # noqa: E402
from ..errors import (  # noqa: E402
    AgentError,
    InvalidArgument,
    JobNotFinished,
    NotFound,
    PermissionDenied,
)
from ..kernel.callerfile import open_regular  # noqa: E402
from ..service import contract  # noqa: E402
from ..service import interfaces as api  # noqa: E402
from ..service.buses import StartFacts, describe_bus, start_advice  # noqa: E402
from ..service.errors import (  # noqa: E402
    NOT_ON_BUS_ERRORS,
    DaemonNotResponding,
    DaemonUnreachable,
    from_dbus,
)

DBUS_NAME = "org.freedesktop.DBus"
DBUS_PATH = "/org/freedesktop/DBus"
DBUS_IFACE = "org.freedesktop.DBus"
PROPERTIES_IFACE = "org.freedesktop.DBus.Properties"
INTROSPECTABLE_IFACE = "org.freedesktop.DBus.Introspectable"
JOB_DIR = api.JOB_PATH_PREFIX.rstrip("/")

CALL_TIMEOUT_MS = 60_000          # Preflight reads the target image and the KHO state
DEFAULT_CALL_TIMEOUT = CALL_TIMEOUT_MS / 1000  # --timeout of the commands that only ask
DEFAULT_JOB_TIMEOUT = 1800.0      # digesting large guests can take minutes
PING_MS = 1000                    # once a job's wait ran out: does the daemon still answer?
_TICK_MS = 100                    # bounds each blocking main-context iteration
# kexec_file_load reads a kernel or an initrd of at most KEXEC_FILE_SIZE_MAX bytes (4 GiB,
# kernel/kexec_file.c): a larger file can never be loaded, so it is refused before anything is
# asked. kho-agentctl reads neither; kho-agentd reads the kernel with its own, smaller bound.
KEXEC_FILE_SIZE_MAX = 4 << 30
_ADDRESS_FLAGS = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                  | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
NO_UID = 0xFFFFFFFF               # the daemon's "owner not known"

# Bus errors that mean "nobody serves org.khoagent.Agent1 here"
_UNREACHABLE_ERRORS = (*NOT_ON_BUS_ERRORS, "org.freedesktop.DBus.Error.Disconnected")
_SPAWN_ERROR_PREFIX = "org.freedesktop.DBus.Error.Spawn."
_ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"
# ... and the ones that mean "no such object here" (a job whose 120 s linger ended)
_NO_OBJECT_ERRORS = ("org.freedesktop.DBus.Error.UnknownObject",
                     "org.freedesktop.DBus.Error.UnknownMethod",
                     "org.freedesktop.DBus.Error.UnknownInterface",
                     "org.freedesktop.DBus.Error.UnknownProperty")
# ... and the bus's own "the destination never replied" (its reply_timeout ran out first)
_NO_REPLY_ERRORS = ("org.freedesktop.DBus.Error.NoReply",
                    "org.freedesktop.DBus.Error.Timeout",
                    "org.freedesktop.DBus.Error.TimedOut")


# ---------------------------------------------------------------------------------- options

@dataclass(frozen=True)
class BusTarget:
    kind: str = "system"            # "system" or "session"; ignored with an address
    address: str | None = None

    def describe(self) -> str:
        """The bus, with the address tried and where it came from."""
        return describe_bus(self.kind, self.address, os.environ)

    def to_json(self) -> dict[str, str | None]:
        return {"bus": "address" if self.address else self.kind, "address": self.address}

    def hint(self, facts: StartFacts | None = None) -> str:
        """How to start kho-agentd, in commands that work on this host (`facts`: what it has,
        probed when not given)."""
        return start_advice(self.kind, self.address, facts or StartFacts.probe(os.environ))


def add_bus_options(parser: argparse.ArgumentParser, *, top_level: bool = False) -> None:
    """--bus / --bus-address, accepted before the command (top level) or after it. The
    sub-command copies default to SUPPRESS so they do not overwrite a top-level value."""
    default: Any = None if top_level else argparse.SUPPRESS
    group = parser.add_argument_group("daemon connection") if top_level else parser
    group.add_argument("--bus", choices=("system", "session"), default=default,
                       help="the bus kho-agentd serves (default: system)")
    group.add_argument("--bus-address", metavar="ADDR", default=default,
                       help="a D-Bus address instead (a private bus, tests)")


def timeout_seconds(text: str) -> float:
    """--timeout's value: a finite number of seconds above 0. Zero is refused too: no call can
    be answered in no time (`--no-wait` is how a job command does not wait)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number of seconds above 0")
    return value


def add_timeout_option(p: argparse.ArgumentParser, default: float, bounds: str) -> None:
    p.add_argument("--timeout", type=timeout_seconds, default=default, metavar="SECONDS",
                   help=f"give up after this long: {bounds} (default {default:g}); "
                        "DaemonNotResponding when kho-agentd does not answer in time")


def target_from_args(args: argparse.Namespace) -> BusTarget:
    kind = getattr(args, "bus", None)
    address = getattr(args, "bus_address", None)
    if kind is not None and address is not None:
        raise InvalidArgument("--bus and --bus-address exclude each other; give one")
    return BusTarget(kind or "system", address)


# ---------------------------------------------------------------------------------- records

@dataclass
class JobInfo:
    path: str
    id: int = 0
    type: str = ""
    state: str = api.JOB_RUNNING
    progress: int = 0
    phase: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    result: str = ""
    error_name: str = ""
    error_message: str = ""

    def update(self, props: dict[str, Any]) -> None:
        for key, attr in (("Id", "id"), ("Type", "type"), ("State", "state"),
                          ("Progress", "progress"), ("Phase", "phase"), ("Result", "result"),
                          ("ErrorName", "error_name"), ("ErrorMessage", "error_message")):
            if key in props:
                setattr(self, attr, props[key])
        if "Bytes" in props:  # an older daemon has neither Phase nor Bytes
            self.bytes_done, self.bytes_total = props["Bytes"]

    @property
    def running(self) -> bool:
        return self.state == api.JOB_RUNNING

    def result_json(self) -> Any:
        """The parsed Result (None while running or when failed)."""
        if not self.result:
            return None
        try:
            return json.loads(self.result)
        except json.JSONDecodeError:
            return {"unparsed": self.result}

    def error(self) -> AgentError:
        """The typed agent error a failed job carries (its exit code included)."""
        return from_dbus(self.error_name or api.ERROR_PREFIX + "Failed",
                         self.error_message or f"job {self.id} ({self.type}) failed")

    def to_json(self) -> dict[str, Any]:
        return {"job": self.path, "id": self.id, "type": self.type, "state": self.state,
                "progress": self.progress, "phase": self.phase,
                "bytes": [self.bytes_done, self.bytes_total], "result": self.result_json(),
                "error": self.error().to_json() if self.state == api.JOB_FAILED else None}


@dataclass
class SessionRow:
    name: str
    path: str
    owner_uid: int | None
    owner_bus_name: str
    ready: bool
    claimed: bool
    incoming: bool
    tokens: list[int] | None = None   # filled by AgentClient.session_details()

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "object": self.path, "owner_uid": self.owner_uid,
                "owner_bus_name": self.owner_bus_name, "ready": self.ready,
                "claimed": self.claimed, "incoming": self.incoming, "tokens": self.tokens}


Progress = Callable[[JobInfo], None]


# ---------------------------------------------------------------------------------- errors

def glib_error(err: GLib.Error, target: BusTarget | None = None, what: str = "") -> AgentError:
    """A local GLib/Gio error (not an error reply) as an agent error with a name: a call that
    timed out is DaemonNotResponding, a connection that closed DaemonUnreachable."""
    where = f"{what}: " if what else ""
    on = target.describe() if target is not None else "the bus"
    io = Gio.io_error_quark()
    if err.matches(io, Gio.IOErrorEnum.TIMED_OUT) or err.matches(io, Gio.IOErrorEnum.CANCELLED):
        return DaemonNotResponding(f"{where}no answer from kho-agentd on {on} in time "
                                   f"({err.message})")
    if err.matches(io, Gio.IOErrorEnum.CLOSED) or err.matches(io, Gio.IOErrorEnum.BROKEN_PIPE):
        return DaemonUnreachable(f"{where}the connection to {on} was closed ({err.message}); "
                                 "check that the D-Bus daemon runs")
    return AgentError(f"{where}{err.message} ({err.domain} error {int(err.code)})")


def bus_error(err: GLib.Error, target: BusTarget, what: str) -> AgentError:
    """The agent error for a failed call: ours rebuilt with their exit codes; the bus's own
    refusals turned into what the operator can do about them."""
    remote = remote_error(err)
    if remote is None:
        return glib_error(err, target, what)
    name, message = remote
    if name in _UNREACHABLE_ERRORS or name.startswith(_SPAWN_ERROR_PREFIX):
        return DaemonUnreachable(f"kho-agentd is not running on {target.describe()} (no owner "
                                 f"for {api.BUS_NAME}: {message}); {target.hint()}")
    if name in _NO_OBJECT_ERRORS:
        return NotFound(f"{what}: {message}")
    if name == _ACCESS_DENIED:
        return PermissionDenied(f"{what}: the bus policy refused the call ({message}); run as "
                                "root, or install etc/dbus-1/system.d/org.khoagent.Agent1.conf")
    if name in _NO_REPLY_ERRORS:
        return DaemonNotResponding(f"{what}: the bus stopped waiting for kho-agentd's answer "
                                   f"({message})")
    return from_dbus(name, message)


# ---------------------------------------------------------------------------------- deadline

@dataclass(frozen=True)
class Deadline:
    """When the command gives up (the --timeout it was given, from when it connects)."""

    seconds: float
    end: float    # time.monotonic()

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        return cls(seconds, time.monotonic() + seconds)

    def remaining(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.remaining() <= 0

    def call_ms(self, cap_ms: int = CALL_TIMEOUT_MS) -> int:
        """The timeout of one call: what is left, at most cap_ms, at least 1 ms (capped before
        it is scaled: a --timeout of 1e308 s must not overflow)."""
        return max(1, math.ceil(min(self.remaining(), cap_ms / 1000) * 1000))


def iterate_until(context: GLib.MainContext, done: Callable[[], bool],
                  deadline: Deadline) -> None:
    """Run `context` until done() or the deadline; each blocking iteration ends at the next
    tick at the latest, so the deadline is checked (and done(): it may look at a flag that a
    signal handler sets, stops.py)."""
    tick = GLib.timeout_source_new(_TICK_MS)
    tick.set_callback(lambda *_: True)
    tick.attach(context)
    try:
        while not done() and not deadline.passed():
            context.iteration(True)
    finally:
        tick.destroy()


def _connect(target: BusTarget, deadline: Deadline) -> Gio.DBusConnection:
    """Connect (authenticate, Hello) within the deadline. Asynchronously on a private main
    context: Gio's synchronous connect has no timeout, and a bus that does not answer must not
    hang the command any more than a daemon that does not."""
    context = GLib.MainContext.new()
    cancellable = Gio.Cancellable.new()
    results: list[Gio.AsyncResult] = []

    def finished(_source: object, result: Gio.AsyncResult, *_data: object) -> None:
        results.append(result)

    context.push_thread_default()
    try:
        if target.address:
            Gio.DBusConnection.new_for_address(target.address, _ADDRESS_FLAGS, None,
                                               cancellable, finished)
        else:
            kind = Gio.BusType.SYSTEM if target.kind == "system" else Gio.BusType.SESSION
            Gio.bus_get(kind, cancellable, finished)
    finally:
        context.pop_thread_default()
    iterate_until(context, lambda: bool(results), deadline)
    if not results:
        cancellable.cancel()
        raise DaemonUnreachable(f"{target.describe()} did not accept a connection within "
                                f"{deadline.seconds:g} s (the D-Bus daemon is stopped or hung), "
                                "so kho-agentd cannot be reached; check `systemctl status "
                                "dbus`, or allow longer with --timeout")
    try:
        if target.address:
            connection: Gio.DBusConnection = Gio.DBusConnection.new_for_address_finish(
                results[0])
        else:
            connection = Gio.bus_get_finish(results[0])
    except GLib.Error as err:
        raise DaemonUnreachable(f"cannot connect to {target.describe()}: {err.message}; so "
                                "kho-agentd cannot be reached (is a D-Bus daemon running "
                                f"there?); {target.hint()}") from err
    return connection


def _process_state(pid: int) -> str | None:
    """The one-letter state of a process (`T`: stopped), from /proc/PID/stat."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read(4096)
    except OSError:
        return None
    _, _, after = stat.rpartition(b")")  # the command name may hold spaces and parentheses
    fields = after.split()
    return fields[0].decode("ascii", "replace") if fields else None


# ---------------------------------------------------------------------------------- client

@dataclass
class _Collected:
    """What the signal handlers saw, for one followed job (or before its path is known)."""

    changes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    removed: list[tuple[int, str, str]] = field(default_factory=list)
    owner_gone: bool = False


@dataclass
class TargetFiles:
    """--kernel/--initrd as sent: the options (names and fd indexes) and the fds, in order."""

    options: dict[str, Any] = field(default_factory=dict)
    fds: list[int] = field(default_factory=list)


def open_target_files(kernel: str | os.PathLike[str] | None,
                      initrd: str | os.PathLike[str] | None, stack: ExitStack) -> TargetFiles:
    """Open the target kernel and initrd here, with this process's rights: regular files only,
    never blocking, at most KEXEC_FILE_SIZE_MAX bytes (kernel/callerfile.py; NotFound,
    PermissionDenied, InvalidArgument). Nothing is read: kho-agentd reads them, with its own
    bounds. The files stay open until `stack` closes."""
    out = TargetFiles()
    for key, path, what in (("kernel", kernel, "target kernel"), ("initrd", initrd, "initrd")):
        if path is None:
            continue
        opened = stack.enter_context(open_regular(path, what, max_size=KEXEC_FILE_SIZE_MAX))
        # the daemon's working directory is not ours: the name it shows and records is absolute
        out.options[key] = os.path.abspath(path)
        out.options[f"{key}_fd"] = len(out.fds)  # an index into the message's fd list
        out.fds.append(opened.fd)
    return out


class AgentClient:
    def __init__(self, connection: Gio.DBusConnection, target: BusTarget,
                 deadline: Deadline) -> None:
        self.connection = connection
        self.target = target
        self.deadline = deadline

    @classmethod
    def connect(cls, target: BusTarget, timeout: float = DEFAULT_CALL_TIMEOUT) -> AgentClient:
        deadline = Deadline.after(timeout)
        return cls(_connect(target, deadline), target, deadline)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AgentClient:
        return cls.connect(target_from_args(args),
                           getattr(args, "timeout", None) or DEFAULT_CALL_TIMEOUT)

    def close(self) -> None:
        if self.connection.is_closed():
            return
        # a close that fails leaves nothing of ours unsent that matters: ignore it
        with contextlib.suppress(GLib.Error):
            self.connection.flush_sync(None)
            if self.target.address:  # the shared system/session singletons stay open
                self.connection.close_sync(None)

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -------------------------------------------------------------- when it does not answer

    def _owner_note(self) -> str:
        """`(pid N, stopped: ...)` for the process that owns the agent's name, asked of the bus
        (which answers for itself); empty when the bus cannot tell in PING_MS."""
        try:
            reply = self.connection.call_sync(
                DBUS_NAME, DBUS_PATH, DBUS_IFACE, "GetConnectionUnixProcessID",
                GLib.Variant("(s)", (api.BUS_NAME,)), GLib.VariantType.new("(u)"),
                Gio.DBusCallFlags.NONE, PING_MS, None)
        except GLib.Error:
            return ""
        (pid,) = reply.unpack()
        # the pid is the bus's view; /proc is ours: on one host (the usual case) they agree
        if _process_state(pid) in ("T", "t"):
            return f" (pid {pid}, stopped: `kill -CONT {pid}` resumes it)"
        return f" (pid {pid})"

    def not_responding(self, why: str) -> DaemonNotResponding:
        return DaemonNotResponding(
            f"kho-agentd{self._owner_note()} owns {api.BUS_NAME} on {self.target.describe()} "
            f"but {why}: it is stopped, hung or overloaded, and whether the request took effect "
            "is unknown; check `systemctl status kho-agent` (then `kho-agentctl status`), or "
            "allow longer with --timeout")

    def answers(self) -> bool:
        """Whether kho-agentd still answers at all (a Ping within PING_MS; any reply counts)."""
        try:
            self.connection.call_sync(api.BUS_NAME, "/", "org.freedesktop.DBus.Peer", "Ping",
                                      None, None, Gio.DBusCallFlags.NONE, PING_MS, None)
        except GLib.Error as err:
            return not isinstance(bus_error(err, self.target, "Ping"),
                                  (DaemonNotResponding, DaemonUnreachable))
        return True

    # -------------------------------------------------------------- calls

    def call(self, path: str, iface: str, method: str, args: GLib.Variant | None = None, *,
             reply_type: str | None = None, fds: Sequence[int] = (),
             dest: str = api.BUS_NAME, interactive: bool = False
             ) -> tuple[tuple[Any, ...], list[int]]:
        """One synchronous call, bounded by the deadline (and CALL_TIMEOUT_MS): the unpacked
        reply and the fds it carried (the caller owns and closes them). `fds` go along in the
        message's fd list (h arguments index it); the caller keeps its own copies."""
        what = f"{method} on {path}"
        if self.deadline.passed():
            raise self.not_responding(f"the --timeout of {self.deadline.seconds:g} s ran out "
                                      f"before {what}")
        timeout_ms = self.deadline.call_ms()
        flags = Gio.DBusCallFlags.NONE
        if interactive:
            flags |= Gio.DBusCallFlags.ALLOW_INTERACTIVE_AUTHORIZATION
        rtype = GLib.VariantType.new(reply_type) if reply_type else None
        fd_list = None
        if fds:
            fd_list = Gio.UnixFDList.new()
            for fd in fds:
                fd_list.append(fd)  # dups
        try:
            reply, out = self.connection.call_with_unix_fd_list_sync(
                dest, path, iface, method, args, rtype, flags, timeout_ms, fd_list, None)
        except GLib.Error as err:
            error = bus_error(err, self.target, what)
            if isinstance(error, DaemonNotResponding):
                bound = (f"the --timeout of {self.deadline.seconds:g} s"
                         if timeout_ms < CALL_TIMEOUT_MS
                         else f"{CALL_TIMEOUT_MS // 1000} s (the longest one call may take)")
                error = self.not_responding(f"did not answer {what} within {bound}")
            raise error from err
        received: list[int] = list(out.steal_fds()) if out is not None else []
        values: tuple[Any, ...] = tuple(reply.unpack()) if reply is not None else ()
        return values, received

    def manager(self, method: str, *values: Any, fds: Sequence[int] = (),
                interactive: bool = False) -> tuple[Any, ...]:
        """A Manager method, called with `values` as its declared in arguments (contract.py);
        the reply is checked against its declared out arguments."""
        declared = contract.MANAGER.method(method)
        args = GLib.Variant(declared.in_type, values) if declared.in_args else None
        replied, received = self.call(api.MANAGER_PATH, api.MANAGER_IFACE, method, args,
                                      reply_type=declared.out_type, fds=fds,
                                      interactive=interactive)
        _close_all(received)
        return replied

    def get_all(self, path: str, iface: str) -> dict[str, Any]:
        (props,), fds = self.call(path, PROPERTIES_IFACE, "GetAll", GLib.Variant("(s)", (iface,)),
                                  reply_type="(a{sv})")
        _close_all(fds)
        out: dict[str, Any] = dict(props)
        return out

    def manager_properties(self) -> dict[str, Any]:
        return self.get_all(api.MANAGER_PATH, api.MANAGER_IFACE)

    def list_sessions(self) -> list[SessionRow]:
        """ListSessions: a(sousbbb), (name, object, owner uid, owner bus name, ready, claimed,
        incoming) as the contract declares it."""
        (rows,) = self.manager("ListSessions")
        return [SessionRow(name, path, None if uid == NO_UID else uid, sender, ready, claimed,
                           incoming)
                for name, path, uid, sender, ready, claimed, incoming in rows]

    def session_details(self, row: SessionRow) -> None:
        """Fill in the preserved tokens and the owner from the Session object."""
        props = self.get_all(row.path, api.SESSION_IFACE)
        row.tokens = list(props.get("Tokens", []))
        owner = props.get("Owner")
        if isinstance(owner, tuple) and len(owner) == 2:
            uid, sender = owner
            row.owner_uid = None if uid == NO_UID else int(uid)
            row.owner_bus_name = str(sender)

    def job_paths(self) -> list[str]:
        """The Job objects that exist now (running, or ended less than 120 s ago)."""
        try:
            (xml,), fds = self.call(JOB_DIR, INTROSPECTABLE_IFACE, "Introspect",
                                    reply_type="(s)")
        except NotFound:
            return []  # no job was ever exported
        _close_all(fds)
        try:
            nodes = Gio.DBusNodeInfo.new_for_xml(xml).nodes
        except GLib.Error as err:
            raise AgentError(f"kho-agentd's introspection of {JOB_DIR} does not parse "
                             f"({err.message})") from err
        ids = sorted(int(n.path) for n in nodes if n.path and n.path.isdigit())
        return [f"{api.JOB_PATH_PREFIX}{i}" for i in ids]

    def job(self, path: str) -> JobInfo:
        info = JobInfo(path)
        info.update(self.get_all(path, api.JOB_IFACE))
        return info

    def jobs(self) -> list[JobInfo]:
        out = []
        for path in self.job_paths():
            # a job whose 120 s linger ends between listing and reading is left out
            with contextlib.suppress(NotFound):
                out.append(self.job(path))
        return out

    # -------------------------------------------------------------- jobs

    def start_job(self, method: str, options: dict[str, GLib.Variant] | None, *,
                  on_progress: Progress, fds: Sequence[int] = (),
                  wait: bool = True) -> JobInfo:
        """Call a job method (options: its a{sv}, or None for a method without arguments) and,
        with `wait`, follow the job until JobRemoved or the deadline; returns the job as it
        ended (or as it started, without `wait`)."""
        args = (options,) if options is not None else ()
        interactive = sys.stdin is not None and sys.stdin.isatty()
        if not wait:
            (path,) = self.manager(method, *args, fds=fds, interactive=interactive)
            return JobInfo(str(path))
        with _JobWatch(self.connection) as watch:
            (path,) = self.manager(method, *args, fds=fds, interactive=interactive)
            job = JobInfo(str(path))
            # Id and Type never change (and are in no PropertiesChanged); the rest comes from
            # the signals, in order, so a snapshot here would only race them
            try:
                props = self.get_all(job.path, api.JOB_IFACE)
                job.update({key: props[key] for key in ("Id", "Type") if key in props})
            except DaemonNotResponding:
                raise
            except AgentError:
                # gone already (a simulated commit ends the daemon): the signals still tell
                # how it ended, and the method names the job's type
                job.type = method.lower()
            return watch.follow(job, on_progress, self)

    def follow(self, path: str, *, on_progress: Progress) -> JobInfo:
        """Follow a job that already exists (started by someone else, or at the daemon's start)."""
        with _JobWatch(self.connection) as watch:
            job = self.job(path)  # read after subscribing: no change falls between
            if not job.running:
                return job
            return watch.follow(job, on_progress, self)


# (sender, interface, member, object path, arg0, callback) of one signal subscription
Subscription = tuple[str, str, str, str | None, str | None, Callable[..., None]]


class SignalWatch:
    """Signal subscriptions on a private main context, made on entry (before the caller's first
    look, so no change falls between) and dropped on exit with their queued callbacks. A
    subclass says which signals (`subscriptions`) and what it keeps of them."""

    def __init__(self, connection: Gio.DBusConnection) -> None:
        self.connection = connection
        self.context = GLib.MainContext.new()
        self._subscriptions: list[int] = []

    def subscriptions(self) -> list[Subscription]:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.context.push_thread_default()
        try:
            self._subscriptions = [
                self.connection.signal_subscribe(sender, iface, member, path, arg0,
                                                 Gio.DBusSignalFlags.NONE, callback)
                for sender, iface, member, path, arg0, callback in self.subscriptions()]
        finally:
            self.context.pop_thread_default()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for sub in self._subscriptions:
            self.connection.signal_unsubscribe(sub)
        self._subscriptions = []
        # let Gio drop the subscriptions' queued callbacks on our context
        while self.context.iteration(False):
            pass


class _JobWatch(SignalWatch):
    """Every Job's PropertiesChanged, the Manager's JobRemoved, and the agent's name losing its
    owner."""

    def __init__(self, connection: Gio.DBusConnection) -> None:
        super().__init__(connection)
        self.seen = _Collected()

    def subscriptions(self) -> list[Subscription]:
        return [
            (api.BUS_NAME, PROPERTIES_IFACE, "PropertiesChanged", None, api.JOB_IFACE,
             self._on_changed),
            (api.BUS_NAME, api.MANAGER_IFACE, "JobRemoved", api.MANAGER_PATH, None,
             self._on_removed),
            (DBUS_NAME, DBUS_IFACE, "NameOwnerChanged", DBUS_PATH, api.BUS_NAME,
             self._on_owner),
        ]

    def _on_changed(self, _conn: Gio.DBusConnection, _sender: str, path: str, _iface: str,
                    _member: str, params: GLib.Variant) -> None:
        _iface_name, changed, _invalidated = params.unpack()
        self.seen.changes.append((path, dict(changed)))

    def _on_removed(self, _conn: Gio.DBusConnection, _sender: str, _path: str, _iface: str,
                    _member: str, params: GLib.Variant) -> None:
        job_id, path, result = params.unpack()
        self.seen.removed.append((job_id, path, result))

    def _on_owner(self, _conn: Gio.DBusConnection, _sender: str, _path: str, _iface: str,
                  _member: str, params: GLib.Variant) -> None:
        _name, _old, new = params.unpack()
        if not new:
            self.seen.owner_gone = True

    def follow(self, job: JobInfo, on_progress: Progress, client: AgentClient) -> JobInfo:
        deadline = client.deadline
        tick = GLib.timeout_source_new(_TICK_MS)
        tick.set_callback(lambda *_: True)
        tick.attach(self.context)
        reported = (job.progress, job.phase, job.bytes_done)
        on_progress(job)
        try:
            while True:
                # drain what arrived; the property changes precede JobRemoved on the wire
                while self.context.iteration(False):
                    pass
                for path, props in self.seen.changes:
                    if path != job.path:
                        continue
                    before = job.progress
                    job.update(props)
                    # Progress only grows: a smaller value was sent before the snapshot that
                    # follow() read, and is older news
                    job.progress = max(job.progress, before)
                    now = (job.progress, job.phase, job.bytes_done)
                    if now != reported:  # every step, not only the latest
                        reported = now
                        on_progress(job)
                self.seen.changes.clear()
                ended = [r for r in self.seen.removed if r[1] == job.path]
                if ended:
                    job.id, _, job.state = ended[0]
                    return job
                if self.seen.owner_gone:
                    raise JobNotFinished(
                        f"kho-agentd left {client.target.describe()} before job {job.path} "
                        "ended: its outcome is unknown (after a commit the host may be "
                        "rebooting); check `kho-agentctl status` once the daemon runs again")
                if deadline.passed():
                    # no news is either a long job or a daemon that cannot send any
                    if not client.answers():
                        raise client.not_responding(
                            f"sent nothing about job {job.path} for {deadline.seconds:g} s and "
                            f"does not answer a Ping within {PING_MS / 1000:g} s")
                    raise JobNotFinished(
                        f"job {job.path} still runs after {deadline.seconds:g} s; it continues "
                        "in kho-agentd: see `kho-agentctl jobs`, or wait longer with --timeout")
                self.context.iteration(True)
        except KeyboardInterrupt:
            raise JobNotFinished(f"interrupted: job {job.path} continues in kho-agentd; see "
                                 "`kho-agentctl jobs` and `kho-agentctl status`") from None
        finally:
            tick.destroy()


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


# ---------------------------------------------------------------------------------- variants

def options(values: dict[str, Any], signatures: dict[str, str]) -> dict[str, GLib.Variant]:
    """An a{sv} dictionary for the contract's option table (`api.PREPARE_OPTIONS`...): each
    value wrapped in its declared type; None values are left out (the daemon's default)."""
    out: dict[str, GLib.Variant] = {}
    for key, value in values.items():
        if value is None:
            continue
        signature = signatures.get(key)
        if signature is None:
            # the client and the contract ship together: only a broken install gets here
            raise AgentError(f"option {key!r} is not in kho-agentd's contract (known: "
                             f"{', '.join(sorted(signatures))}; kho_agent/service/contract.py)"
                             ": this kho-agentctl and its installed contract differ; reinstall "
                             "kho-agent")
        out[key] = GLib.Variant(signature, value)
    return out
