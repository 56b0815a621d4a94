"""A fuzzer for kho-agentd's D-Bus surface (issue 11): generated calls from several identities,
invariants checked after every batch, findings recorded with a reproduction.

What it drives: every method of every interface in kho_agent/service/contract.py (read from the
declarations there, so a new method is fuzzed without touching this file), Properties
Get/GetAll/Set on the Manager, Job and Session objects (existing and not), Job.Cancel, calls with
the wrong signature, and sequences that make sense (sessions with preserved memfds, prepare with
the real target kernel, a Job.Cancel mid-prepare, cancel, commit --dry-run, real commits: on the
simulated kernel a commit ends the daemon as a kexec would, and the fuzzer starts it again as the
next boot, where it verifies on its own and the owners retrieve and finish their sessions).

Who calls: root, a uid polkit authorizes, and one it does not (nobody). Each identity is one
long-lived client process (`client_main`, run as that uid with setpriv) that receives call
descriptions as JSON lines on stdin, builds the fds of the call itself (memfds, pipes, sockets,
eventfds, directories, ...: fds are per process) and answers with the outcome.

What is checked after each batch (`Fuzzer.check`): the daemon is alive and answers within a
timeout; no job or transient state is stuck; State and StateMessage agree (and with the kexec
image the simulated kernel has loaded); ListSessions, the Session objects on the bus, the session
fds the clients hold (a GET_NAME on each) and the sockets in the daemon's /proc/PID/fd agree, and
every session a client created and did not release is still listed unless a signal said it was
dropped; no fd a client passed stays in the daemon unless it is a preserved file of a listed
session, no file is open over and over, and its memory does not grow beyond what it holds. After
a simulated kexec: the daemon's own verification passed and the manifest names the kernel that
booted. Per call: every error name is documented (the agent's
org.khoagent.Agent1.Error.<Name> or a standard bus error for a malformed call), never an internal
error or a bare strerror; no call answers later than the hang timeout; the unauthorized uid
changes nothing and nobody acts on another uid's session; a non-root caller learns nothing from a
file it cannot read; a retrieved file has the bytes that were preserved.

Everything is deterministic by seed given the daemon's answers; a finding names the seed, the call
index, the call, the calls before it and what was violated.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import pwd
import random
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import gi

gi.require_version("Gio", "2.0")
gi.require_version("GLib", "2.0")
from agenthost import POLKIT_POLICY, Authority  # noqa: E402
from dbusrig import (  # noqa: E402
    CONNECTION_FLAGS,
    NOBODY,
    PROPERTIES_IFACE,
    REPO,
    Daemon,
    GioClient,
    PrivateBus,
    RemoteError,
    as_user,
    client_env,
    wait_readable,
    why_cannot_run_as,
)
from gi.repository import Gio, GLib  # noqa: E402

from kho_agent.service import contract  # noqa: E402
from kho_agent.service import interfaces as api  # noqa: E402

ROOT = "root"
AUTHORIZED = "authorized"
UNAUTHORIZED = "unauthorized"
IDENTITIES = (ROOT, AUTHORIZED, UNAUTHORIZED)

INTROSPECTABLE_IFACE = "org.freedesktop.DBus.Introspectable"
PEER_IFACE = "org.freedesktop.DBus.Peer"
BUS_ERROR = "org.freedesktop.DBus.Error."
# Standard errors a malformed call may get from Gio or the bus (names only: the fuzzer also checks
# who gets them, e.g. root never gets AccessDenied from the bus policy).
STANDARD_ERRORS = frozenset(BUS_ERROR + n for n in (
    "InvalidArgs", "UnknownMethod", "UnknownObject", "UnknownInterface", "UnknownProperty",
    "PropertyReadOnly", "AccessDenied", "InvalidSignature"))
# The Manager methods the README calls read-only ("need no privilege"): every other method must
# fail for a uid polkit does not authorize. A new method is thus treated as privileged.
READ_ONLY_METHODS = frozenset({"Preflight", "ScratchPlan", "GetManifest", "ListSessions",
                               "History"})
# Manager States a job passes through: at a quiescent check (no job running) none may remain.
TRANSIENT_STATES = frozenset({"preparing", "committing", "cancelling", "verifying"})
SECRET_RELEASE = "7.3.9-secret"   # the release of the image in the 0700 directory
TARGET_RELEASE = "7.3.1-sim"
ALT_RELEASE = "7.4.0-sim"
OLD_RELEASE = "7.1.0-sim"

_ERRNO_NAME = re.compile(r"\bE[A-Z0-9]{2,}\b")
_STRERRORS = sorted({os.strerror(code) for code in errno.errorcode if code},
                    key=len, reverse=True)


class FuzzerError(RuntimeError):
    """The fuzzer itself cannot go on (a client process died, the daemon does not start)."""


# --- the contract ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Method:
    iface: str
    name: str
    in_args: tuple[tuple[str, str], ...]    # (name, signature)
    out_args: tuple[tuple[str, str], ...]

    @property
    def in_signature(self) -> str:
        return "(" + "".join(sig for _name, sig in self.in_args) + ")"

    @property
    def out_signature(self) -> str:
        return "(" + "".join(sig for _name, sig in self.out_args) + ")"


@dataclass(frozen=True)
class Interface:
    name: str
    methods: tuple[Method, ...]
    properties: tuple[tuple[str, str, bool], ...]   # (name, signature, writable)
    signals: tuple[str, ...]


def load_interfaces(source: Path | None) -> ModuleType:
    """kho_agent/service/contract.py of this checkout, or of the tree the daemon runs from
    (fuzz/dbus.py puts that tree first on sys.path before it imports this module)."""
    if source is not None:
        where = Path(contract.__file__).resolve()
        if not where.is_relative_to(source.resolve()):
            raise FuzzerError(f"the contract was imported from {where}, not from {source}: put "
                              f"{source} first on sys.path (as fuzz/dbus.py does)")
    return contract


def load_contract(module: ModuleType = contract) -> dict[str, Interface]:
    """Every interface the contract declares (contract.INTERFACES)."""
    out: dict[str, Interface] = {}
    for declared in module.INTERFACES:
        methods = tuple(Method(declared.name, m.name,
                               tuple((a.name, a.signature) for a in m.in_args),
                               tuple((a.name, a.signature) for a in m.out_args))
                        for m in declared.methods)
        props = tuple((p.name, p.signature, False) for p in declared.properties)
        out[declared.name] = Interface(declared.name, methods, props,
                                       tuple(s.name for s in declared.signals))
    return out


def option_keys(module: ModuleType = contract) -> dict[str, dict[str, str]]:
    """The option keys of every method that takes an a{sv}, by its name in lower case (a stem
    `options_for` finds in the method's name)."""
    return {m.name.lower(): dict(m.options) for declared in module.INTERFACES
            for m in declared.methods if m.options is not None}


def options_for(method: str, keys: dict[str, dict[str, str]]) -> dict[str, str]:
    """The option keys of a method: the dictionary whose stem the method's name contains
    (the longest one: ScratchPlan: scratchplan, CreateSessionWithOptions: its own)."""
    lowered = method.lower()
    stems = sorted((s for s in keys if s in lowered), key=len, reverse=True)
    return keys[stems[0]] if stems else {}


def documented_error_names() -> frozenset[str]:
    """org.khoagent.Agent1.Error.<Name> for every error the registry says kho-agentd sends
    (kho_agent.errors.REGISTRY) and in the README's exit-code tables."""
    from kho_agent.errors import REGISTRY

    names = {e.name for e in REGISTRY if e.on_bus}
    readme = REPO / "README.md"
    if readme.exists():
        names |= set(re.findall(r"^\| `(\w+)` \| \d+ \|", readme.read_text(), re.MULTILINE))
    return frozenset(api.ERROR_PREFIX + n for n in names)


def bare_strerror(message: str) -> str | None:
    """The strerror text in `message` when no errno name (EBUSY) goes with it: "/x: No such file
    or directory" or "[Errno 2] ..." tell a user less than the kernel said."""
    # the wording is at the start or the end of a message (which may echo a megabyte argument)
    message = message if len(message) <= 4000 else message[:2000] + " ... " + message[-2000:]
    if _ERRNO_NAME.search(message):
        return None
    if re.search(r"\[Errno \d+\]", message):
        return "[Errno N]"
    for text in _STRERRORS:
        if len(text) >= 8 and (message == text or message.endswith(": " + text)
                               or f": {text}:" in message or f": {text};" in message):
            return text
    return None


# --- variants on the wire between the fuzzer and its client processes -----------------------------

def encode_variant(value: GLib.Variant | None) -> list[str] | None:
    """[type, hex of the serialized bytes]: exact for every value (NaN, huge strings, h)."""
    if value is None:
        return None
    data = value.get_data_as_bytes().get_data() or b""
    return [value.get_type_string(), bytes(data).hex()]


def decode_variant(wire: list[str] | None) -> GLib.Variant | None:
    if wire is None:
        return None
    kind, data = wire
    return GLib.Variant.new_from_bytes(GLib.VariantType.new(kind),
                                       GLib.Bytes.new(bytes.fromhex(data)), False)


def show_variant(value: GLib.Variant | None, limit: int = 300) -> str:
    """A variant as text for a report: long strings shortened to 'x'*N form."""
    if value is None:
        return "()"
    return shorten(value.print_(False), limit)


_RUN = re.compile(r"(.)\1{40,}")


def shorten(text: str, limit: int = 300) -> str:
    """Runs of one character as c*N, then cut at `limit`. Linear in what is kept: arguments and
    echoed messages run to megabytes, and this is called for every call."""
    out: list[str] = []
    kept = pos = 0
    while pos < len(text) and kept <= limit:
        found = _RUN.search(text, pos, min(len(text), pos + 2 * limit + 64))
        if found is None:
            piece = text[pos:pos + 2 * limit]
            out.append(piece)
            kept += len(piece)
            pos += len(piece)
            continue
        char = found.group(1)
        end = re.compile(re.escape(char) + "+").match(text, found.start())
        stop = end.end() if end else found.end()
        piece = text[pos:found.start()] + f"{char}*{stop - found.start()}"
        out.append(piece)
        kept += len(piece)
        pos = stop
    short = "".join(out)
    if pos >= len(text) and len(short) <= limit:
        return short
    return short[:limit] + f"... ({len(text)} chars)"


# --- fds a client builds for a call ---------------------------------------------------------------

PAGE = 4096
F_SEAL_FUTURE_WRITE = 0x10
CLASSIC_SEALS = 0x0F  # F_SEAL_SEAL | SHRINK | GROW | WRITE
# kinds a Preserve may accept: unlinked shmem files that are not hugetlb
PRESERVABLE = frozenset({"memfd", "memfd_sealed", "memfd_future_write", "memfd_noseal",
                         "memfd_sparse", "memfd_ro", "memfd_wo", "memfd_shared", "shm_tmpfile"})
# kinds whose inode the daemon may hold for its own reasons (its stdin is /dev/null, eventfds
# share one anonymous inode, a session fd is the daemon's own): not leak-checked
SHARED_INODE_KINDS = frozenset({"devnull", "devzero", "eventfd", "session_fd", "dir_opath",
                                "dir", "fifo"})


def content(size: int, fill: int) -> bytes:
    """The bytes of a generated memfd: a pattern from `fill`, so the parent knows them too."""
    if size <= 0:
        return b""
    block = hashlib.sha256(str(fill).encode()).digest() * (PAGE // 32)
    return (block * (size // PAGE + 1))[:size]


def sparse_pages(size: int, fill: int) -> dict[int, bytes]:
    """A sparse memfd: only its first and last page written."""
    if size <= 0:
        return {}
    page = content(PAGE, fill)
    return {0: page[:min(PAGE, size)], max(0, size - PAGE) // PAGE * PAGE:
            page[:size - max(0, size - PAGE) // PAGE * PAGE]}


def expected_digest(spec: dict[str, Any]) -> str | None:
    """sha256 of what a memfd of this spec holds, for a RetrieveFile check."""
    kind, size, fill = spec["kind"], int(spec.get("size", 0)), int(spec.get("fill", 0))
    if kind == "memfd_sparse":
        data = bytearray(size)
        for offset, chunk in sparse_pages(size, fill).items():
            data[offset:offset + len(chunk)] = chunk
        return hashlib.sha256(bytes(data)).hexdigest()
    if kind in PRESERVABLE:
        return hashlib.sha256(content(size, fill)).hexdigest()
    return None


@dataclass
class BuiltFds:
    fds: list[int] = field(default_factory=list)           # passed in the call (dup'ed by Gio)
    passed: list[dict[str, Any]] = field(default_factory=list)
    cleanup: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        for undo in self.cleanup:
            with contextlib.suppress(OSError):
                undo()


def _memfd(size: int, fill: int, flags: int = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING) -> int:
    fd = os.memfd_create("fuzz", flags)
    data = content(size, fill)
    if data:
        os.write(fd, data)
    return fd


def _reopen(fd: int, flags: int) -> int:
    """The same memfd through /proc/self/fd with other access flags."""
    try:
        return os.open(f"/proc/self/fd/{fd}", flags | os.O_CLOEXEC)
    finally:
        os.close(fd)


def fallback_kind(kind: str, note: str) -> str:
    """What a client passed when it could not build the kind asked for (the note says why)."""
    if note.startswith("cannot open"):
        return "devnull"
    if note.startswith(("no hugetlb", "no session fd")):
        return "memfd"
    return kind


class FdFactory:
    """Builds the fds of one call inside a client process (they belong to its uid)."""

    def __init__(self, fifo: str) -> None:
        self.fifo = fifo
        self.shared: dict[int, int] = {}   # slot -> a memfd kept across calls (never written)
        self.held: dict[str, list[int]] = {}

    def build(self, specs: Iterable[dict[str, Any]]) -> BuiltFds:
        out = BuiltFds()
        try:
            for spec in specs:
                fd, note = self._one(spec, out)
                out.fds.append(fd)
                st = os.fstat(fd)
                out.passed.append({"kind": fallback_kind(spec["kind"], note), "dev": st.st_dev,
                                   "ino": st.st_ino, "note": note})
        except BaseException:
            out.close()
            raise
        return out

    def _one(self, spec: dict[str, Any], out: BuiltFds) -> tuple[int, str]:
        kind = spec["kind"]
        size, fill = int(spec.get("size", PAGE)), int(spec.get("fill", 0))
        maker = getattr(self, "_" + kind, None)
        if maker is None:
            raise ValueError(f"unknown fd kind {kind!r}")
        if kind == "path":
            return self._path(size, fill, out, str(spec["path"]))
        result: tuple[int, str] = maker(size, fill, out)
        return result

    # one method per kind: (fd, note)
    def _memfd(self, size: int, fill: int, _out: BuiltFds) -> tuple[int, str]:
        return _memfd(size, fill), ""

    def _memfd_sealed(self, size: int, fill: int, _out: BuiltFds) -> tuple[int, str]:
        fd = _memfd(size, fill)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, CLASSIC_SEALS)
        return fd, ""

    def _memfd_future_write(self, size: int, fill: int, _out: BuiltFds) -> tuple[int, str]:
        fd = _memfd(size, fill)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_FUTURE_WRITE)
        return fd, ""

    def _memfd_noseal(self, size: int, fill: int, _out: BuiltFds) -> tuple[int, str]:
        return _memfd(size, fill, os.MFD_CLOEXEC), ""

    def _memfd_hugetlb(self, size: int, fill: int, _out: BuiltFds) -> tuple[int, str]:
        try:
            fd = os.memfd_create("fuzz-huge", os.MFD_CLOEXEC | os.MFD_HUGETLB)
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0)
            return _memfd(size, fill), f"no hugetlb memfd here ({code})"
        with contextlib.suppress(OSError):  # no huge pages reserved: an empty hugetlb file
            os.ftruncate(fd, 2 << 20)
        return fd, ""

    def _memfd_sparse(self, size: int, fill: int, _out: BuiltFds) -> tuple[int, str]:
        fd = os.memfd_create("fuzz-sparse", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(fd, size)
        for offset, chunk in sparse_pages(size, fill).items():
            os.pwrite(fd, chunk, offset)
        return fd, ""

    def _memfd_ro(self, size: int, fill: int, _out: BuiltFds) -> tuple[int, str]:
        return _reopen(_memfd(size, fill), os.O_RDONLY), ""

    def _memfd_wo(self, size: int, fill: int, _out: BuiltFds) -> tuple[int, str]:
        return _reopen(_memfd(size, fill), os.O_WRONLY), ""

    def _memfd_shared(self, size: int, fill: int, _out: BuiltFds) -> tuple[int, str]:
        # the same file in several calls: a second Preserve of it is EBUSY in the kernel
        slot = fill % 3
        if slot not in self.shared:
            self.shared[slot] = _memfd(size, fill)
        return os.dup(self.shared[slot]), f"slot {slot}"

    def _shm_tmpfile(self, size: int, fill: int, _out: BuiltFds) -> tuple[int, str]:
        fd = os.open("/dev/shm", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        os.write(fd, content(size, fill))
        return fd, ""

    def _shm_linked(self, size: int, fill: int, out: BuiltFds) -> tuple[int, str]:
        fd, path = tempfile.mkstemp(prefix="kho-fuzz-", dir="/dev/shm")
        os.write(fd, content(size, fill))
        out.cleanup.append(lambda: os.unlink(path))
        return fd, ""

    def _regular(self, size: int, fill: int, out: BuiltFds) -> tuple[int, str]:
        fd, path = tempfile.mkstemp(prefix="kho-fuzz-")
        os.write(fd, content(size, fill))
        out.cleanup.append(lambda: os.unlink(path))
        return fd, ""

    def _dir_opath(self, _size: int, _fill: int, _out: BuiltFds) -> tuple[int, str]:
        return os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC), ""

    def _dir(self, _size: int, _fill: int, _out: BuiltFds) -> tuple[int, str]:
        return os.open("/tmp", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), ""

    def _pipe_r(self, _size: int, _fill: int, out: BuiltFds) -> tuple[int, str]:
        read, write = os.pipe()
        out.cleanup.append(lambda: os.close(write))
        return read, ""

    def _pipe_w(self, _size: int, _fill: int, out: BuiltFds) -> tuple[int, str]:
        read, write = os.pipe()
        out.cleanup.append(lambda: os.close(read))
        return write, ""

    def _socket(self, _size: int, _fill: int, out: BuiltFds) -> tuple[int, str]:
        one, other = socket.socketpair()
        out.cleanup.append(other.close)
        return one.detach(), ""

    def _eventfd(self, _size: int, _fill: int, _out: BuiltFds) -> tuple[int, str]:
        return os.eventfd(0, os.EFD_CLOEXEC), ""

    def _devnull(self, _size: int, _fill: int, _out: BuiltFds) -> tuple[int, str]:
        return os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC), ""

    def _devzero(self, _size: int, _fill: int, _out: BuiltFds) -> tuple[int, str]:
        return os.open("/dev/zero", os.O_RDONLY | os.O_CLOEXEC), ""

    def _fifo(self, _size: int, _fill: int, _out: BuiltFds) -> tuple[int, str]:
        return os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), ""

    def _path(self, size: int, fill: int, out: BuiltFds, path: str = "") -> tuple[int, str]:
        """A file opened with this client's rights; one it may not open is /dev/null instead."""
        try:
            return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), ""
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0)
            return self._devnull(size, fill, out)[0], f"cannot open {path} ({code})"

    def _session_fd(self, size: int, fill: int, _out: BuiltFds) -> tuple[int, str]:
        for fds in self.held.values():
            if fds:
                return os.dup(fds[0]), ""
        return _memfd(size, fill), "no session fd held: a memfd instead"


# --- the client process (one per identity) --------------------------------------------------------

def _get_name(fd: int, timeout: float) -> tuple[bool, str]:
    """GET_NAME on a simulated session fd (kho_agent/kernel/sessionwire.py), bounded in time:
    (alive, the name or why not). A session the agent closed answers nothing (EOF)."""
    from kho_agent.kernel import sessionwire

    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.settimeout(timeout)
            sock.sendmsg([sessionwire.REQUEST.pack(sessionwire.OP_GET_NAME, 0)])
            data, _anc, _flags, _addr = sock.recvmsg(sessionwire.REPLY.size)
    except OSError as exc:
        return False, f"{errno.errorcode.get(exc.errno or 0, exc)}"
    if len(data) != sessionwire.REPLY.size:
        return False, "closed (EOF)"
    err, name = sessionwire.REPLY.unpack(data)
    if err:
        return False, errno.errorcode.get(err, str(err))
    return True, name.split(b"\0")[0].decode("utf-8", "surrogateescape")


def _describe_received(fd: int) -> dict[str, Any]:
    st = os.fstat(fd)
    info: dict[str, Any] = {"mode": stat.S_IFMT(st.st_mode), "dev": st.st_dev,
                            "ino": st.st_ino, "size": st.st_size,
                            "socket": stat.S_ISSOCK(st.st_mode)}
    if stat.S_ISREG(st.st_mode) and st.st_size <= 64 << 20:
        info["sha256"] = hashlib.sha256(os.pread(fd, st.st_size, 0)).hexdigest()
    return info


class ClientState:
    """The loop of a client process: one D-Bus connection, the session fds it was given."""

    def __init__(self, address: str, fifo: str) -> None:
        self.conn = Gio.DBusConnection.new_for_address_sync(address, CONNECTION_FLAGS, None,
                                                             None)
        self.factory = FdFactory(fifo)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "call":
            return self.call(request)
        if op == "probe":
            return {"held": [self._probe(name, fd) for name, fds in self.factory.held.items()
                             for fd in fds]}
        if op == "drop":
            for name in request["names"]:
                for fd in self.factory.held.pop(name, []):
                    os.close(fd)
            return {}
        raise ValueError(f"unknown op {op!r}")

    def _probe(self, name: str, fd: int) -> dict[str, Any]:
        st = os.fstat(fd)
        alive, got = _get_name(fd, 2.0)
        return {"name": name, "dev": st.st_dev, "ino": st.st_ino, "alive": alive, "got": got}

    def call(self, req: dict[str, Any]) -> dict[str, Any]:
        built = self.factory.build(req.get("fds", []))
        try:
            return self._call(req, built)
        finally:
            # only now: the other end of a pipe or socket stays open while the daemon has the
            # call, as a client that keeps writing would keep it
            built.close()

    def _call(self, req: dict[str, Any], built: BuiltFds) -> dict[str, Any]:
        fd_list = Gio.UnixFDList.new()
        for fd in built.fds:
            fd_list.append(fd)  # a dup
        flags = Gio.DBusCallFlags.NONE
        if req.get("interactive"):
            flags |= Gio.DBusCallFlags.ALLOW_INTERACTIVE_AUTHORIZATION
        args = decode_variant(req.get("args"))
        start = time.monotonic()
        out: dict[str, Any] = {"passed": built.passed}
        try:
            reply, out_fds = self.conn.call_with_unix_fd_list_sync(
                req["dest"], req["path"], req["iface"], req["member"], args, None, flags,
                int(req["timeout"] * 1000), fd_list if built.fds else None, None)
        except GLib.Error as err:
            out.update(_call_error(err))
        else:
            out.update(status="ok", reply=encode_variant(reply),
                       fds=self._received(out_fds, req.get("keep_as")))
        out["elapsed"] = time.monotonic() - start
        return out

    def _received(self, fd_list: Gio.UnixFDList | None, keep_as: str | None) -> list[Any]:
        """Describe the fds of a reply; keep session fds (sockets on the simulated kernel)
        under the session's name, close the rest."""
        infos = []
        for fd in (fd_list.steal_fds() if fd_list is not None else []):
            info = _describe_received(fd)
            infos.append(info)
            if info["socket"] and keep_as is not None:
                self.factory.held.setdefault(keep_as, []).append(fd)
            else:
                os.close(fd)
        return infos


def _call_error(err: GLib.Error) -> dict[str, Any]:
    if Gio.DBusError.is_remote_error(err):
        name = Gio.DBusError.get_remote_error(err)
        message = err.message
        prefix = f"GDBus.Error:{name}: "
        if message.startswith(prefix):
            message = message[len(prefix):]
        return {"status": "error", "error_name": name, "error_message": message}
    if err.matches(Gio.io_error_quark(), Gio.IOErrorEnum.TIMED_OUT):
        return {"status": "timeout", "error_message": err.message}
    return {"status": "local", "error_message": err.message}


def client_main(argv: list[str] | None = None) -> int:
    """`python -c 'import dbusfuzz; dbusfuzz.client_main()' ADDRESS FIFO`: JSON lines in, JSON
    lines out; the first line out says who this client is on the bus."""
    address, fifo = (argv if argv is not None else sys.argv[1:])[:2]
    state = ClientState(address, fifo)
    out = sys.stdout

    def say(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    say({"unique_name": state.conn.get_unique_name(), "uid": os.getuid()})
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = state.handle(request)
        except Exception as exc:  # noqa: BLE001 - a bug of the client is reported, not fatal
            answer = {"status": "local", "error_message": f"client: {type(exc).__name__}: {exc}"}
        answer["id"] = request.get("id")
        say(answer)
    return 0


class ClientError(RuntimeError):
    """A client process died or stopped answering."""


class ClientProc:
    """The parent's handle on one client process."""

    def __init__(self, label: str, uid: int, gid: int, address: str, fifo: Path,
                 log_dir: Path) -> None:
        self.label = label
        self.uid = uid
        self.gid = gid
        self.address = address
        self.fifo = fifo
        self.log_path = log_dir / f"client-{label}.stderr"
        self.unique_name = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self._next_id = 0

    def start(self) -> ClientProc:
        prefix = as_user(self.uid, self.gid) if self.uid != os.getuid() else []
        code = "import dbusfuzz, sys; sys.exit(dbusfuzz.client_main())"
        with self.log_path.open("ab") as err:
            self._proc = subprocess.Popen(
                [*prefix, sys.executable, "-c", code, self.address, str(self.fifo)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd="/",
                env=client_env())
        hello = self._read(30.0)
        self.unique_name = hello["unique_name"]
        if hello["uid"] != self.uid:
            raise ClientError(f"client {self.label} runs as uid {hello['uid']}, not {self.uid}")
        return self

    def send(self, request: dict[str, Any]) -> int:
        assert self._proc is not None and self._proc.stdin is not None
        self._next_id += 1
        request = {**request, "id": self._next_id}
        try:
            self._proc.stdin.write(json.dumps(request).encode() + b"\n")
            self._proc.stdin.flush()
        except OSError as exc:
            raise ClientError(f"client {self.label} is gone: {exc}; {self.stderr_tail()}") from exc
        return self._next_id

    def receive(self, request_id: int, timeout: float) -> dict[str, Any]:
        while True:
            answer = self._read(timeout)
            if answer.get("id") == request_id:
                return answer

    def request(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        return self.receive(self.send(request), timeout)

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not wait_readable(fd, left):
                raise ClientError(f"client {self.label} did not answer within {timeout:.0f} s")
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise ClientError(f"client {self.label} exited: {self.stderr_tail()}")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def stderr_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def close(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


# --- the simulated host: files to name, a polkit stand-in, the daemon -----------------------------

@dataclass
class Fixtures:
    """Paths the generated options name: real kernel images and hostile files."""

    directory: Path
    target: Path          # the real target kernel
    alt: Path             # another valid kernel (a Preflight of it between Prepare and Commit)
    old_abi: Path         # a kernel whose ABI the running one cannot hand over to
    secret: Path          # a kernel image only root can read (in a 0700 directory)
    garbage: Path
    empty: Path
    fifo: Path
    fifo_link: Path       # a symlink to the FIFO
    subdir: Path
    missing: Path

    @classmethod
    def create(cls, directory: Path, sim_dir: Path) -> Fixtures:
        from kho_agent.sim import SimAbi, SimKernel

        sim = SimKernel(sim_dir)
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
        directory.chmod(0o755)  # clients of other uids open the FIFO here
        private = directory / "private"
        private.mkdir(mode=0o700)
        old = SimAbi(kho="kho-v3", luo="luo-v1", memfd="memfd-v2")
        fx = cls(directory=directory,
                 target=sim.write_kernel_image(directory / "vmlinuz-target",
                                               release=TARGET_RELEASE, abi=SimAbi()),
                 alt=sim.write_kernel_image(directory / "vmlinuz-alt", release=ALT_RELEASE,
                                            abi=SimAbi()),
                 old_abi=sim.write_kernel_image(directory / "vmlinuz-old",
                                                release=OLD_RELEASE, abi=old),
                 secret=sim.write_kernel_image(private / "vmlinuz-secret",
                                               release=SECRET_RELEASE, abi=SimAbi()),
                 garbage=directory / "garbage", empty=directory / "empty",
                 fifo=directory / "fifo", fifo_link=directory / "fifo-link",
                 subdir=directory / "subdir", missing=directory / "missing")
        fx.garbage.write_bytes(random.Random(7).randbytes(64 << 10))
        fx.empty.write_bytes(b"")
        os.mkfifo(fx.fifo, 0o666)
        fx.fifo.chmod(0o666)
        fx.fifo_link.symlink_to(fx.fifo)
        fx.subdir.mkdir()
        for path in (fx.target, fx.alt, fx.old_abi, fx.garbage, fx.empty):
            path.chmod(0o644)
        return fx

    def hostile_paths(self) -> list[str]:
        return [str(p) for p in (self.old_abi, self.secret, self.garbage, self.empty, self.fifo,
                                 self.fifo_link, self.subdir, self.missing)] + [
            "/dev/zero", "/dev/null", "/etc/shadow", "", "vmlinuz", "../../../../etc/passwd",
            str(self.directory) + "/./vmlinuz-target/..", "/" + "a" * 5000, "/tmp/\nx",
            str(self.target) + "\u00e9", "~root/vmlinuz"]

    def blocking(self) -> frozenset[str]:
        """Paths whose open blocks until a writer comes (a hang of the engine, if followed)."""
        return frozenset({str(self.fifo), str(self.fifo_link)})

    def unblock_fifos(self, seconds: float = 1.0) -> int:
        """Open and close the FIFO's write end while a reader waits in open(): the reader then
        reads EOF. Returns how many readers were released."""
        released = misses = 0
        deadline = time.monotonic() + seconds
        # a reader blocked in open() is there already; the engine may open it again right
        # after (the next queued call): a few tries, not the whole time when nobody reads
        while time.monotonic() < deadline and misses < 3:
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: nobody reads
                misses += 1
                time.sleep(0.02)
                continue
            os.close(fd)
            released += 1
            misses = 0
        return released


@dataclass
class Identity:
    label: str
    uid: int
    gid: int


def authorized_uid() -> int | None:
    """A regular user to grant the polkit actions to: the first uid >= 1000 (not nobody)."""
    for entry in sorted(pwd.getpwall(), key=lambda e: e.pw_uid):
        if 1000 <= entry.pw_uid < NOBODY:
            return entry.pw_uid
    return None


def pick_identities(notes: list[str]) -> list[Identity]:
    """root, an authorized uid and nobody, as far as this machine can run clients as them."""
    out = [Identity(ROOT, os.getuid(), os.getgid())]
    if os.getuid() != 0:
        notes.append("not root: only calls from this uid are fuzzed")
        out[0].label = ROOT  # still the "privileged" slot: the daemon runs as this user too
        return out
    for label, uid in ((AUTHORIZED, authorized_uid()), (UNAUTHORIZED, NOBODY)):
        if uid is None:
            notes.append(f"{label}: no regular user on this machine")
            continue
        reason = why_cannot_run_as(uid, python=True)
        if reason is not None:
            notes.append(f"{label} (uid {uid}) skipped: {reason}")
            continue
        out.append(Identity(label, uid, pwd.getpwuid(uid).pw_gid))
    return out


@dataclass
class SignalRecord:
    sender: str
    path: str
    iface: str
    member: str
    args: tuple[Any, ...]


class Observer:
    """The fuzzer's own connection (root, in this process): the invariant reads, and every
    signal on the bus, collected on a private main context."""

    def __init__(self, address: str, timeout: float) -> None:
        self.client = GioClient(address, timeout=timeout)
        self.context = GLib.MainContext.new()
        self.received: list[SignalRecord] = []
        self.context.push_thread_default()
        try:
            self._subscription = self.client.connection.signal_subscribe(
                None, None, None, None, None, Gio.DBusSignalFlags.NONE, self._on_signal)
        finally:
            self.context.pop_thread_default()

    def _on_signal(self, _conn: Gio.DBusConnection, sender: str, path: str, iface: str,
                   member: str, parameters: GLib.Variant) -> None:
        self.received.append(SignalRecord(sender, path, iface, member,
                                          tuple(parameters.unpack())))

    def wait(self, timeout: float) -> None:
        """Block until a signal (or anything else for this context) arrives, or `timeout`."""
        tick = GLib.timeout_source_new(max(1, int(timeout * 1000)))
        tick.set_callback(lambda *_: False)
        tick.attach(self.context)
        try:
            self.context.iteration(True)
        finally:
            tick.destroy()

    def drain(self) -> list[SignalRecord]:
        while self.context.iteration(False):
            pass
        out, self.received = self.received, []
        return out

    def call(self, path: str, iface: str, member: str, signature: str = "",
             values: tuple[Any, ...] = (), timeout: float | None = None) -> tuple[Any, ...]:
        return self.client.call_values(path, iface, member, signature, values,
                                       timeout=timeout)[0]

    def get(self, path: str, iface: str, name: str, timeout: float | None = None) -> Any:
        return self.call(path, PROPERTIES_IFACE, "Get", "ss", (iface, name), timeout)[0]

    def get_all(self, path: str, iface: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call(path, PROPERTIES_IFACE, "GetAll", "s", (iface,))[0]
        return result

    def children(self, path: str) -> list[str]:
        (xml,) = self.call(path, INTROSPECTABLE_IFACE, "Introspect")
        node = Gio.DBusNodeInfo.new_for_xml(xml)
        return sorted(f"{path.rstrip('/')}/{child.path}" for child in node.nodes)

    def close(self) -> None:
        self.client.connection.signal_unsubscribe(self._subscription)
        while self.context.iteration(False):
            pass
        self.client.close()


class FuzzHost:
    """A private system bus with the shipped policy and a polkit stand-in, a simulated host with
    the fixtures, kho-agentd on both (`--polkit-bus served`), and one client per identity."""

    def __init__(self, base: Path | None = None, *, call_timeout: float = 5.0,
                 daemon_args: Iterable[str] = (), daemon_source: Path | None = None) -> None:
        self.base_arg = base
        self.call_timeout = call_timeout
        self.daemon_args = list(daemon_args)
        # another tree's kho_agent to run the daemon from (e.g. `git archive` of a commit)
        self.daemon_source = daemon_source
        self.notes: list[str] = []
        self.stack = contextlib.ExitStack()
        self.clients: dict[str, ClientProc] = {}
        self.identities: dict[str, Identity] = {}

    def __enter__(self) -> FuzzHost:
        try:
            self._start()
        except BaseException:
            self.stack.close()
            raise
        return self

    def _start(self) -> None:
        from kho_agent.sim import SimKernel

        self.base = Path(tempfile.mkdtemp(prefix="kho-dbusfuzz-", dir=self.base_arg))
        self.base.chmod(0o755)
        self.stack.callback(shutil.rmtree, self.base, True)
        self.sim_dir = self.base / "sim"
        SimKernel.create(self.sim_dir)
        self.fixtures = Fixtures.create(self.base / "files", self.sim_dir)
        self.bus = self.stack.enter_context(PrivateBus(extra_policy=POLKIT_POLICY))
        identities = pick_identities(self.notes)
        self.identities = {i.label: i for i in identities}
        grants = {uid for uid in (i.uid for i in identities if i.label == AUTHORIZED)}
        actions = {getattr(api, a): set(grants) for a in dir(api) if a.startswith("ACTION_")}
        self.authority = Authority(self.bus.address, actions)
        self.stack.callback(self.authority.stop)
        argv = None
        if self.daemon_source is not None:
            code = (f"import sys; sys.path.insert(0, {str(self.daemon_source)!r}); "
                    "from kho_agent.daemon import main; sys.exit(main())")
            argv = [sys.executable, "-c", code]
        self.daemon = Daemon(self.bus.address, self.sim_dir, self.base / "state",
                             ["--polkit-bus", "served", *self.daemon_args], argv=argv,
                             log_dir=self.base / "daemon-log")
        self.daemon.start()
        self.stack.callback(self.daemon.close, check=False)
        self.observer = Observer(self.bus.address, self.call_timeout)
        self.stack.callback(self.observer.close)
        for ident in identities:
            client = ClientProc(ident.label, ident.uid, ident.gid, self.bus.address,
                                self.fixtures.fifo, self.base)
            self.stack.callback(client.close)
            self.clients[ident.label] = client.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # a FIFO reader would keep the daemon from stopping
        self.fixtures.unblock_fifos(0.2)
        self.stack.close()


# --- what the fuzzer sends ------------------------------------------------------------------------

@dataclass
class Call:
    identity: str
    path: str
    iface: str
    member: str
    args: GLib.Variant | None
    fds: list[dict[str, Any]] = field(default_factory=list)
    note: str = ""                 # what is hostile about it, for the report
    interactive: bool = False
    keep_as: str | None = None     # the session name a returned session fd is kept under

    def describe(self) -> str:
        short = self.iface.rsplit(".", 1)[-1]
        where = "" if self.path == api.MANAGER_PATH else f" on {self.path}"
        fds = f" fds=[{', '.join(f['kind'] for f in self.fds)}]" if self.fds else ""
        note = f"  # {self.note}" if self.note else ""
        return (f"{self.identity}: {short}.{self.member}{show_variant(self.args)}{where}{fds}"
                f"{note}")

    def wire(self, timeout: float) -> dict[str, Any]:
        return {"op": "call", "dest": api.BUS_NAME, "path": self.path, "iface": self.iface,
                "member": self.member, "args": encode_variant(self.args), "fds": self.fds,
                "timeout": timeout, "interactive": self.interactive, "keep_as": self.keep_as}

    def arg(self, index: int) -> Any:
        if self.args is None or index >= self.args.n_children():
            return None
        return self.args.get_child_value(index).unpack()


@dataclass
class Outcome:
    status: str                     # ok, error, timeout, local (the client could not send it)
    error_name: str = ""
    error_message: str = ""
    reply: tuple[Any, ...] = ()
    fds: list[dict[str, Any]] = field(default_factory=list)
    passed: list[dict[str, Any]] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def describe(self) -> str:
        if self.ok:
            text = repr(self.reply)
            return "ok " + (text if len(text) < 200 else text[:200] + "...")
        if self.status == "error":
            return f"{self.error_name}: {shorten(self.error_message)}"
        return f"{self.status}: {shorten(self.error_message)}"


@dataclass
class WaitJob:
    """Wait for a job's JobRemoved; the scenario gets an Outcome with reply (result,)."""

    path: str
    timeout: float = 30.0


@dataclass
class Burst:
    """Calls sent at once from different clients, answered in any order."""

    calls: list[Call]


@dataclass
class MemoryProbe:
    """Calls with big arguments, the daemon's resident memory measured before and after."""

    calls: list[Call]


Step = Call | WaitJob | Burst | MemoryProbe
Scenario = Generator[Step, Any, None]


@dataclass
class SessionModel:
    """What the fuzzer believes the daemon lists about one session."""

    name: str
    creator: str                    # identity label
    uid: int
    sender: str
    path: str = ""
    incoming: bool = False
    claimed: bool = False
    ready: bool | None = False      # None: unknown (set by calls racing each other)
    claimer: tuple[int, str] | None = None  # (uid, bus name) of who retrieved it
    holder: str = ""                # the client that holds its session fd (creator, claimer)
    tokens: dict[int, str | None] = field(default_factory=dict)  # token -> sha256 of the file
    inodes: set[tuple[int, int]] = field(default_factory=set)    # memfds preserved into it
    size: int = 0                   # bytes preserved into it (the simulator copies them)
    announced: str = ""             # a signal said it was dropped (which)
    ended_by: str = ""              # another identity released or finished it (the call)


@dataclass
class JobModel:
    path: str
    kind: str                       # the method that started it, lower case
    identity: str
    index: int
    result: str = ""                # from JobRemoved
    checked: bool = False


@dataclass
class Model:
    sessions: dict[str, SessionModel] = field(default_factory=dict)
    uncertain: set[str] = field(default_factory=set)   # session calls that timed out
    jobs: dict[str, JobModel] = field(default_factory=dict)
    fresh: int = 0

    def fresh_name(self) -> str:
        self.fresh += 1
        return f"vm-{self.fresh}"

    def this_boot(self) -> list[SessionModel]:
        return [s for s in self.sessions.values() if not s.incoming]


HOSTILE_NAMES = ("", "a" * 63, "b" * 64, "\u00e9" * 31 + "e", "\u00e9" * 32, "x" * 4096,
                 "..", ".", "/", "../../etc/passwd", "vm/1", "vm\n1", " ", "vm 1", "-", "_2d",
                 "kho-agent", "systemd", "KHO-AGENT", "kho-agent\u200b", "\U0001f642" * 15,
                 "\U0001f642" * 16, "\u202evm", "vm%1", "vm:1", "\t")
CMDLINES = ("", "console=ttyS0", "kho=off", "liveupdate=off", "'unbalanced", "a" * 5000,
            "kho_scratch=garbage", "x\ny", "-- init=/bin/sh", "\\", "\u00e9=\u00e9",
            "kho=on liveupdate=on quiet")
SCRATCH = ("keep", "auto", "", "16M", "1G,1G,1G", "garbage", "-1", "0", "99999999999999999999G",
           "16M%", "%", ",,,", "a" * 1000, "64M,64M,64M,64M", "0x10000000")
DOUBLES = (0.0, 0.5, 1.0, 10.0, -1.0, -0.0, math.nan, math.inf, -math.inf, 1e308, 5e-324,
           1.7976931348623157e308, 1e9)
TOKENS = (0, 1, 2, 7, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)
INT_EDGES = {"y": (0, 1, 255), "n": (-2**15, -1, 0, 2**15 - 1), "q": (0, 1, 2**16 - 1),
             "i": (-2**31, -1, 0, 1, 2**31 - 1), "u": (0, 1, 2**32 - 1),
             "x": (-2**63, -1, 0, 2**63 - 1), "t": TOKENS, "h": (0, 1, -1, 2**31 - 1)}
WRONG_SIGNATURES = ("()", "(s)", "(i)", "(b)", "(a{sv})", "(a{ss})", "(sa{sv})", "(st)",
                    "(sht)", "(sb)", "(v)", "(ay)", "(as)", "(ssss)", "(t)", "(u)", "(h)",
                    "(sa{sv}s)", "(a{sv}a{sv})", "(o)", "(d)", "((s))")
FD_WEIGHTS = {"memfd": 30, "memfd_sealed": 5, "memfd_future_write": 3, "memfd_noseal": 3,
              "memfd_hugetlb": 3, "memfd_sparse": 3, "memfd_ro": 3, "memfd_wo": 3,
              "memfd_shared": 5, "shm_tmpfile": 4, "shm_linked": 3, "regular": 3,
              "dir_opath": 2, "dir": 2, "pipe_r": 2, "pipe_w": 2, "socket": 2, "eventfd": 2,
              "devnull": 2, "devzero": 2, "fifo": 2, "session_fd": 3, "path": 2}
# fds that can block a reader for as long as the client keeps the other end: quarantined after a
# hang, like the FIFO path
STREAM_KINDS = frozenset({"pipe_r", "socket", "fifo"})
# an error message longer than this echoes a caller's argument without a bound
MESSAGE_MAX = 8192
# resident memory the daemon may gain beyond the preserved files it holds (caches, allocator)
MEMORY_SLACK = 160 << 20


def split_signature(sig: str) -> list[str]:
    """The complete types of a signature: "sa{sv}(ii)" -> ["s", "a{sv}", "(ii)"]."""
    out, i = [], 0
    while i < len(sig):
        j = _type_end(sig, i)
        out.append(sig[i:j])
        i = j
    return out


def _type_end(sig: str, i: int) -> int:
    if sig[i] == "a":
        return _type_end(sig, i + 1)
    if sig[i] in "({":
        close = ")" if sig[i] == "(" else "}"
        depth, j = 0, i
        while True:
            if sig[j] in "({":
                depth += 1
            elif sig[j] in ")}":
                depth -= 1
                if depth == 0 and sig[j] == close:
                    return j + 1
            j += 1
    return i + 1


class CallGenerator:
    """Scenarios of calls, deterministic by the rng given the daemon's answers."""

    def __init__(self, rng: random.Random, contract: dict[str, Interface], fixtures: Fixtures,
                 model: Model, identities: list[str], quarantine: set[str],
                 keys: dict[str, dict[str, str]]) -> None:
        self.rng = rng
        self.contract = contract
        self.fx = fixtures
        self.model = model
        self.identities = identities
        self.keys = keys
        self.manager = contract[api.MANAGER_IFACE]
        self.quarantine = quarantine   # values that hung the daemon once: not sent again
        self.commits_left = 0

    # ---- small choices
    def who(self, weights: tuple[int, int, int] = (40, 35, 25)) -> str:
        table = dict(zip(IDENTITIES, weights, strict=True))
        names = [i for i in self.identities if table.get(i, 0) > 0] or self.identities
        return self.rng.choices(names, [table.get(n, 1) for n in names])[0]

    def privileged(self) -> str:
        return self.who((55, 45, 0))

    def method(self, name: str) -> Method | None:
        return next((m for m in self.manager.methods if m.name == name), None)

    def string(self) -> str:
        return self.rng.choice(("", "x", "a" * 300, "\u00e9\U0001f642", "/tmp", "..",
                                "x" * self.rng.choice((1000, 65536)), "kho-agent", "vm-1"))

    def path_string(self, weight_target: float) -> str:
        if self.rng.random() < weight_target:
            return str(self.fx.target)
        choices = [str(self.fx.alt), *self.fx.hostile_paths()]
        choices = [c for c in choices if c not in self.quarantine] or [str(self.fx.target)]
        return self.rng.choice(choices)

    def session_name(self, identity: str) -> str:
        roll = self.rng.random()
        own = [n for n, s in self.model.sessions.items() if s.creator == identity]
        others = [n for n, s in self.model.sessions.items() if s.creator != identity]
        if roll < 0.35 and own:
            return self.rng.choice(own)
        if roll < 0.55 and others:
            return self.rng.choice(others)
        if roll < 0.75:
            return self.model.fresh_name()
        return self.rng.choice(HOSTILE_NAMES)

    def token(self, name: str) -> int:
        known = self.model.sessions.get(name)
        roll = self.rng.random()
        if known and known.tokens and roll < 0.2:
            return self.rng.choice(sorted(known.tokens))   # a collision
        if roll < 0.7:
            return self.rng.randrange(1, 1 << 16)
        return self.rng.choice(TOKENS)

    def fd_spec(self, preservable: bool = False) -> dict[str, Any]:
        kinds = [k for k in FD_WEIGHTS if (not preservable or k in PRESERVABLE)
                 and "fdkind:" + k not in self.quarantine]
        kind = self.rng.choices(kinds, [FD_WEIGHTS[k] for k in kinds])[0]
        size = self.rng.choice((0, 1, PAGE, 3 * PAGE + 17, 64 << 10))
        if kind == "memfd_sparse":
            size = self.rng.choice((2 << 20, 8 << 20))
        spec = {"kind": kind, "size": size, "fill": self.rng.randrange(1 << 30)}
        if kind == "path":
            spec["path"] = self.path_string(0.5)
        return spec

    def file_fd(self, key: str, fds: list[dict[str, Any]]) -> tuple[int, str]:
        """An fd option (kernel_fd): a file opened by the caller, mostly the real target; the
        h value indexes the call's fds (sometimes past them)."""
        roll = self.rng.random()
        if roll < 0.55:
            path = str(self.fx.target) if key.startswith("kernel") else str(self.fx.garbage)
            fds.append({"kind": "path", "path": path})
        elif roll < 0.75:
            fds.append({"kind": "path", "path": self.path_string(0.0)})
        else:
            fds.append(self.fd_spec())
        if self.rng.random() < 0.1:
            return self.rng.choice((len(fds), -1, 2**31 - 1)), f"{key} index past the fds"
        return len(fds) - 1, ""

    # ---- values by signature
    def value(self, sig: str, depth: int = 0) -> Any:
        """A Python value GLib.Variant(sig, value) accepts, from the edges of each type."""
        head = sig[0]
        if head in INT_EDGES:
            return self.rng.choice(INT_EDGES[head])
        simple: dict[str, Callable[[], Any]] = {
            "b": lambda: self.rng.random() < 0.5, "d": lambda: self.rng.choice(DOUBLES),
            "s": self.string, "o": lambda: self.rng.choice(("/", api.MANAGER_PATH, "/a/b")),
            "g": lambda: self.rng.choice(("", "s", "a{sv}")),
            "v": lambda: GLib.Variant(*self.leaf())}
        if head in simple:
            return simple[head]()
        if sig.startswith("a{"):
            key, val = split_signature(sig[2:-1])
            return {self.value(key, depth + 1): self.value(val, depth + 1)
                    for _ in range(self.rng.randrange(3))}
        if head == "a":
            return [self.value(sig[1:], depth + 1) for _ in range(self.rng.randrange(3))]
        if head == "(":
            return tuple(self.value(t, depth + 1) for t in split_signature(sig[1:-1]))
        raise ValueError(f"no generator for signature {sig!r}")

    def leaf(self) -> tuple[str, Any]:
        sig = self.rng.choice(("s", "i", "t", "b", "d", "as", "ay", "o", "h", "a{sv}", "v"))
        if sig == "ay":
            return sig, self.rng.randbytes(self.rng.choice((0, 3, 1000)))
        if sig == "v":
            return sig, GLib.Variant("s", "nested")
        if sig == "a{sv}":
            return sig, {"kernel": GLib.Variant("s", str(self.fx.target))}
        return sig, self.value(sig, 1)

    # ---- a{sv} options
    def options(self, method: str, fds: list[dict[str, Any]], *, valid: bool = False
                ) -> tuple[dict[str, GLib.Variant], str]:
        """(options, note): well-typed keys of the method mostly, else unknown keys, wrong
        variant types and huge values. Fd options append their fds to `fds`."""
        allowed = options_for(method, self.keys)
        roll = 0.0 if valid else self.rng.random()
        opts: dict[str, GLib.Variant] = {}
        note = ""
        for key, sig in allowed.items():
            want = 0.9 if (key == "kernel" and method == "Prepare") else 0.45
            if self.rng.random() >= want:
                continue
            if sig == "h":
                index, note = self.file_fd(key, fds)
                opts[key] = GLib.Variant("h", index)
            else:
                opts[key] = GLib.Variant(sig, self.option_value(method, key, sig))
        if roll < 0.62:
            return opts, note
        if roll < 0.78 and allowed:
            key = self.rng.choice(sorted(allowed))
            wrong, value = self.leaf()
            if wrong != allowed[key]:
                opts[key] = GLib.Variant(wrong, value)
                note = f"option {key} as {wrong}"
            return opts, note
        if roll < 0.9:
            union = sorted({k for d in self.keys.values() for k in d} - set(allowed))
            key = self.rng.choice([*union, "", "kernal", "x" * 300, "Kernel", "kernel\u00e9"])
            opts[key] = GLib.Variant(*self.leaf())
            return opts, f"unknown option {key[:20]!r}"
        key = self.rng.choice(sorted(allowed) or ["kernel"])
        opts[key] = GLib.Variant("s", "/" + "k" * self.rng.choice((4096, 1 << 20)))
        return opts, f"huge {key}"

    def option_value(self, method: str, key: str, sig: str) -> Any:
        if key == "kernel":
            return self.path_string(0.75 if method == "Prepare" else 0.45)
        if key == "initrd":
            return self.path_string(0.0) if self.rng.random() < 0.5 else str(self.fx.garbage)
        if key == "cmdline":
            return self.rng.choice(CMDLINES)
        if key == "scratch":
            return self.rng.choice(SCRATCH)
        if key == "margin":
            return self.rng.choice(DOUBLES)
        if key == "dry_run" and method == "Commit":
            return True if self.commits_left <= 0 else self.rng.random() < 0.7
        return self.value(sig)

    # ---- single calls
    def manager_call(self, identity: str | None = None, name: str | None = None) -> Call:
        method = self.rng.choice(self.manager.methods)
        return self.build(method, identity or self.who(), name)

    def build(self, method: Method, identity: str, name: str | None = None, *,
              valid_options: bool = False) -> Call:
        values: list[Any] = []
        notes: list[str] = []
        fds: list[dict[str, Any]] = []
        session = name
        for arg, sig in method.in_args:
            if sig == "a{sv}":
                opts, note = self.options(method.name, fds, valid=valid_options)
                values.append(opts)
                notes.append(note)
            elif sig == "s" and arg == "name":
                session = session if session is not None else self.session_name(identity)
                values.append(session)
            elif sig == "t" and arg == "token":
                values.append(self.token(session or ""))
            elif sig == "h":
                index, specs, note = self.handle()
                values.append(index)
                fds += specs
                notes.append(note)
            else:
                values.append(self.value(sig))
        if method.name == "Commit" and self.commits_left <= 0 and isinstance(values[0], dict):
            # no real commit left in the budget: keep dry_run (unless its type is the point)
            current = values[0].get("dry_run")
            if current is None or current.get_type_string() == "b":
                values[0]["dry_run"] = GLib.Variant("b", True)
        keep = session if "h" in method.out_signature and session is not None else None
        return Call(identity, api.MANAGER_PATH, method.iface, method.name,
                    GLib.Variant(method.in_signature, tuple(values)), fds,
                    "; ".join(n for n in notes if n), self.rng.random() < 0.2, keep)

    def handle(self) -> tuple[int, list[dict[str, Any]], str]:
        """(the h value, the fds sent, a note): one fd at index 0 mostly; none; a wrong index;
        extra fds."""
        roll = self.rng.random()
        if roll < 0.08:
            return 0, [], "no fd passed"
        if roll < 0.14:
            return self.rng.choice((1, 5, -1, 2**31 - 1)), [self.fd_spec()], "index past the fds"
        specs = [self.fd_spec() for _ in range(1 if roll < 0.92 else self.rng.randint(2, 3))]
        return 0, specs, ""

    def property_call(self) -> Call:
        identity = self.who()
        path, iface = self.object_path()
        ifaces = [iface, *sorted(self.contract), "", PROPERTIES_IFACE, "org.nope." + "x" * 200]
        asked = self.rng.choice(ifaces) if self.rng.random() < 0.25 else iface
        props = [p for i in self.contract.values() for p, _s, _w in i.properties]
        roll = self.rng.random()
        if roll < 0.5:
            prop = self.rng.choice([*props, "", "x" * 1000, "State\u00e9", "Nope"])
            return Call(identity, path, PROPERTIES_IFACE, "Get", GLib.Variant("(ss)",
                                                                              (asked, prop)))
        if roll < 0.8:
            return Call(identity, path, PROPERTIES_IFACE, "GetAll", GLib.Variant("(s)",
                                                                                 (asked,)))
        prop = self.rng.choice([*props, "Nope"])
        return Call(identity, path, PROPERTIES_IFACE, "Set", GLib.Variant(
            "(ssv)", (asked, prop, GLib.Variant(*self.leaf()))), note="read-only property")

    def object_path(self) -> tuple[str, str]:
        """An existing or made-up object, and the interface it would have."""
        jobs = sorted(self.model.jobs)
        sessions = sorted(s.path for s in self.model.sessions.values() if s.path)
        roll = self.rng.random()
        if roll < 0.35:
            return api.MANAGER_PATH, api.MANAGER_IFACE
        if roll < 0.6 and jobs:
            return self.rng.choice(jobs), api.JOB_IFACE
        if roll < 0.8 and sessions:
            return self.rng.choice(sessions), api.SESSION_IFACE
        made_up = [(api.JOB_PATH_PREFIX + "0", api.JOB_IFACE),
                   (api.JOB_PATH_PREFIX + "4294967295", api.JOB_IFACE),
                   (api.JOB_PATH_PREFIX + "x", api.JOB_IFACE),
                   (api.SESSION_PATH_PREFIX + "nope", api.SESSION_IFACE),
                   (api.SESSION_PATH_PREFIX + "_", api.SESSION_IFACE),
                   (api.SESSION_PATH_PREFIX + api.escape_path_component("kho-agent"),
                    api.SESSION_IFACE),
                   (api.MANAGER_PATH + "/session", api.SESSION_IFACE),
                   ("/", api.MANAGER_IFACE), ("/org/khoagent", api.MANAGER_IFACE)]
        return self.rng.choice(made_up)

    def job_cancel(self, path: str | None = None, identity: str | None = None) -> Call:
        if path is None:
            path, _iface = self.object_path()
        return Call(identity or self.who(), path, api.JOB_IFACE, "Cancel", None)

    def malformed_call(self) -> Call:
        identity = self.who()
        roll = self.rng.random()
        if roll < 0.55:
            method = self.rng.choice(self.manager.methods)
            sigs = [s for s in WRONG_SIGNATURES if s != method.in_signature]
            sig = self.rng.choice(sigs)
            fds = [self.fd_spec()] if "h" in sig and self.rng.random() < 0.7 else []
            return Call(identity, api.MANAGER_PATH, api.MANAGER_IFACE, method.name,
                        GLib.Variant(sig, self.value(sig)), fds, f"wrong signature {sig}")
        if roll < 0.75:
            iface, member = self.rng.choice((
                (api.MANAGER_IFACE, "Frobnicate"), (api.MANAGER_IFACE, "prepare"),
                ("org.khoagent.Agent1.Nope", "Prepare"), (api.SESSION_IFACE, "Cancel"),
                (api.JOB_IFACE, "Cancel")))
            return Call(identity, api.MANAGER_PATH, iface, member, None, note="unknown member")
        path, _iface = self.object_path()
        if roll < 0.9:
            return Call(identity, path, INTROSPECTABLE_IFACE, "Introspect", None)
        return Call(identity, path, PEER_IFACE, "Ping", None)

    # ---- scenarios
    def next_scenario(self) -> Scenario:
        incoming = [s for s in self.model.sessions.values() if s.incoming]
        table: list[tuple[Callable[[], Scenario], int]] = [
            (self.single(self.manager_call), 40), (self.single(self.property_call), 12),
            (self.single(self.job_cancel), 4), (self.single(self.malformed_call), 8),
            (self.session_setup, 14), (self.prepare_cancel, 8), (self.burst, 6)]
        if self.commits_left > 0:
            table.append((self.live_update, 2))
        if incoming:
            table.append((self.claims, 8))
        table.append((self.big_arguments, 1))
        maker = self.rng.choices([m for m, _w in table], [w for _m, w in table])[0]
        return maker()

    def single(self, make: Callable[[], Call]) -> Callable[[], Scenario]:
        def scenario() -> Scenario:
            yield make()
        scenario.__name__ = make.__name__
        return scenario

    def create(self, identity: str, name: str) -> Call:
        method = self.method("CreateSessionWithOptions") if self.rng.random() < 0.3 else None
        method = method or self.method("CreateSession")
        assert method is not None
        call = self.build(method, identity, name, valid_options=True)
        return call

    def preserve(self, identity: str, name: str) -> Call:
        method = self.method("Preserve")
        assert method is not None
        spec = self.fd_spec(preservable=self.rng.random() < 0.85)
        token = self.token(name) if self.rng.random() < 0.3 else self.rng.randrange(1, 1 << 20)
        return Call(identity, api.MANAGER_PATH, method.iface, method.name,
                    GLib.Variant(method.in_signature, (name, 0, token)), [spec])

    def simple(self, identity: str, member: str, *values: Any) -> Call:
        method = self.method(member)
        assert method is not None
        return Call(identity, api.MANAGER_PATH, method.iface, method.name,
                    GLib.Variant(method.in_signature, values),
                    keep_as=values[0] if values and "h" in method.out_signature else None)

    def session_setup(self, identity: str | None = None) -> Scenario:
        identity = identity or self.who((45, 45, 10))
        name = self.model.fresh_name() if self.rng.random() < 0.9 else self.rng.choice(
            HOSTILE_NAMES)
        outcome = yield self.create(identity, name)
        if not outcome.ok:
            return
        for _ in range(self.rng.choice((0, 1, 1, 2, 3))):
            yield self.preserve(identity, name)
        if self.rng.random() < 0.85:
            yield self.simple(identity, "SetReady", name, True)
        if self.rng.random() < 0.08:
            yield self.simple(identity, "ReleaseSession", name)

    def prepare(self, identity: str, kernel: str | None = None, dry_run: bool = False) -> Call:
        method = self.method("Prepare")
        assert method is not None
        kernel = kernel or str(self.fx.target)
        opts = {"kernel": GLib.Variant("s", kernel)}
        fds: list[dict[str, Any]] = []
        if "kernel_fd" in options_for("Prepare", self.keys) and (
                identity != ROOT or self.rng.random() < 0.3):
            # the caller opens the image itself (the daemon opens paths only for root)
            fds.append({"kind": "path", "path": kernel})
            opts["kernel_fd"] = GLib.Variant("h", 0)
        if dry_run:
            opts["dry_run"] = GLib.Variant("b", True)
        if self.rng.random() < 0.2:
            opts["scratch"] = GLib.Variant("s", self.rng.choice(("keep", "auto")))
        return Call(identity, api.MANAGER_PATH, method.iface, method.name,
                    GLib.Variant(method.in_signature, (opts,)), fds)

    def prepare_cancel(self) -> Scenario:
        """Prepare the real target, then maybe cancel the job while it runs (from anyone), or
        cancel the whole update after it."""
        outcome = yield self.prepare(self.privileged(), dry_run=self.rng.random() < 0.2)
        if not outcome.ok:
            return
        job = outcome.reply[0]
        roll = self.rng.random()
        if roll < 0.45:
            yield self.job_cancel(job, self.who((40, 40, 20)))
        elif roll < 0.6:
            yield self.simple(self.privileged(), "Cancel")
        yield WaitJob(job)
        if self.rng.random() < 0.4:
            done = yield self.simple(self.privileged(), "Cancel")
            if done.ok:
                yield WaitJob(done.reply[0])

    def live_update(self) -> Scenario:
        """Sessions, prepare, maybe a read-only call between prepare and commit, commit
        --dry-run, then a real commit (the runner restarts the daemon as the next boot), then
        the owners take their sessions back."""
        for _ in range(self.rng.randint(1, 3)):
            yield from self.session_setup(self.who((50, 50, 0)))
        outcome = yield self.prepare(self.privileged())
        if not outcome.ok:
            return
        ended = yield WaitJob(outcome.reply[0])
        if ended.reply != ("done",):
            return
        if self.rng.random() < 0.5:
            # a read-only call between prepare and commit must not change what is prepared
            member = self.rng.choice(("Preflight", "ScratchPlan"))
            method = self.method(member)
            if method is not None:
                kernel = self.rng.choice((None, self.fx.alt, self.fx.old_abi, self.fx.target))
                opts = {} if kernel is None else {"kernel": GLib.Variant("s", str(kernel))}
                yield Call(ROOT, api.MANAGER_PATH, method.iface, method.name,
                           GLib.Variant(method.in_signature, (opts,)))
        for dry in (True, False):
            method = self.method("Commit")
            assert method is not None
            opts = {"dry_run": GLib.Variant("b", dry)}
            if self.rng.random() < 0.5:
                opts["force"] = GLib.Variant("b", True)
            commit = yield Call(self.privileged(), api.MANAGER_PATH, method.iface,
                                method.name, GLib.Variant(method.in_signature, (opts,)))
            if not commit.ok:
                return
            yield WaitJob(commit.reply[0])
        yield from self.claims()

    def claims(self) -> Scenario:
        """After a kexec: owners (and others) retrieve sessions and files, and finish them."""
        incoming = sorted((s for s in self.model.sessions.values() if s.incoming),
                          key=lambda s: s.name)
        for session in incoming:
            owner = session.creator if self.rng.random() < 0.8 else self.who()
            if self.rng.random() < 0.6:
                yield self.simple(owner, "RetrieveSession", session.name)
            for token in sorted(session.tokens)[:3]:
                if self.rng.random() < 0.7:
                    yield self.simple(owner, "RetrieveFile", session.name, token)
            if self.rng.random() < 0.4:
                yield self.simple(owner, "FinishSession", session.name)

    def big_arguments(self) -> Scenario:
        """Calls with a 2 MiB name, mostly from nobody (refused at once): what they cost the
        daemon must not stay with it."""
        identity = self.who((20, 20, 60))
        member = self.rng.choice(("SetReady", "ReleaseSession", "CreateSession"))
        method = self.method(member)
        if method is None:
            return
        name = "v" * (2 << 20)
        calls = [Call(identity, api.MANAGER_PATH, method.iface, method.name,
                      GLib.Variant(method.in_signature, tuple(
                          name if sig == "s" else self.value(sig) for _a, sig in method.in_args)),
                      note="2 MiB name") for _ in range(8)]
        yield MemoryProbe(calls)

    def burst(self) -> Scenario:
        """Two or three clients at once, mostly about the same session name."""
        name = self.rng.choice([*self.model.sessions, self.model.fresh_name()])
        calls = []
        for identity in self.rng.sample(self.identities, min(len(self.identities),
                                                                self.rng.randint(2, 3))):
            roll = self.rng.random()
            if roll < 0.3:
                calls.append(self.create(identity, name))
            elif roll < 0.5:
                calls.append(self.preserve(identity, name))
            elif roll < 0.65:
                calls.append(self.simple(identity, "ReleaseSession", name))
            elif roll < 0.8:
                calls.append(self.prepare(identity))
            else:
                calls.append(self.manager_call(identity, name))
        yield Burst(calls)


# --- findings and counts --------------------------------------------------------------------------

@dataclass
class Finding:
    kind: str
    violation: str
    seed: int
    index: int                     # the call after which it was seen
    call: str
    preceding: list[str]
    count: int = 1
    others: list[str] = field(default_factory=list)   # other violations under the same key

    def render(self) -> str:
        lines = [f"[{self.kind}] {self.violation}",
                 f"    seed {self.seed}, after call #{self.index} (seen {self.count}x)",
                 f"    call: {self.call}"]
        lines += [f"    also: {other}" for other in self.others]
        if self.preceding:
            lines.append("    before it:")
            lines += [f"      {line}" for line in self.preceding]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Stats:
    calls: Counter[str] = field(default_factory=Counter)       # per identity
    methods: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)      # by error name
    signals: Counter[str] = field(default_factory=Counter)
    checks: Counter[str] = field(default_factory=Counter)      # invariant checks run
    restarts: Counter[str] = field(default_factory=Counter)
    scenarios: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    commits: int = 0
    elapsed: float = 0.0
    max_daemon_fds: int = 0
    max_daemon_rss: int = 0
    slowest: tuple[float, str] = (0.0, "")

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    def render(self) -> str:
        rate = self.total / self.elapsed if self.elapsed else 0.0
        lines = [f"calls: {self.total} in {self.elapsed:.1f} s ({rate:.0f}/s); batches "
                 f"{self.batches}; invariant checks {sum(self.checks.values())}; real commits "
                 f"(simulated kexecs) {self.commits}; daemon restarts {dict(self.restarts)}",
                 "calls per identity: " + _counts(self.calls),
                 "outcomes: " + _counts(self.outcomes),
                 "errors by name: " + _counts(self.errors),
                 "methods: " + _counts(self.methods),
                 "scenarios: " + _counts(self.scenarios),
                 "invariant checks: " + _counts(self.checks),
                 "signals: " + _counts(self.signals),
                 f"most fds the daemon held: {self.max_daemon_fds}; its largest resident "
                f"memory: {self.max_daemon_rss >> 20} MiB; slowest answer "
                 f"{self.slowest[0]:.2f} s ({self.slowest[1]})"]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        out = {k: dict(v) if isinstance(v, Counter) else v for k, v in vars(self).items()}
        out["total"] = self.total
        return out


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counter.most_common()) or "none"


@dataclass
class Report:
    seed: int
    stats: Stats
    findings: list[Finding]
    notes: list[str]
    identities: list[str] = field(default_factory=list)

    def render(self) -> str:
        head = [f"D-Bus fuzz, seed {self.seed}: {self.stats.total} calls from "
                f"{', '.join(self.identities)}, {len(self.findings)} distinct finding(s)"]
        head += [f"note: {n}" for n in self.notes]
        body = [self.stats.render()]
        if self.findings:
            body.append("findings:")
            body += [f.render() for f in self.findings]
        else:
            body.append("no crash, hang or inconsistency")
        return "\n".join(head + body)

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "stats": self.stats.to_json(), "notes": self.notes,
                "identities": self.identities,
                "findings": [f.to_json() for f in self.findings]}


# --- the runner -----------------------------------------------------------------------------------

@dataclass
class Held:
    label: str
    dev: int
    ino: int
    alive: bool
    got: str


@dataclass
class FdEntry:
    fd: int
    target: str
    dev: int
    ino: int


SESSION_METHODS = frozenset({"Preserve", "SetReady", "ReleaseSession", "RetrieveSession",
                             "RetrieveFile", "FinishSession"})
# what a StateMessage says about the State it goes with (engine transitions)
MESSAGE_STATES = (("preparing ", {"preparing"}), ("prepared ", {"prepared"}),
                  ("cancelling", {"cancelling"}), ("handing off", {"committing"}),
                  ("verifying the", {"verifying"}), ("verified: every", {"verified"}),
                  ("verification found problems", {"failed"}), ("cancelled:", {"idle"}),
                  ("prepare failed", {"idle", "verified"}))


class Fuzzer:
    def __init__(self, host: FuzzHost, *, seed: int, calls: int, batch: int = 25,
                 commits: int | None = None, job_timeout: float = 10.0,
                 log: Callable[[str], None] | None = None, trace: Path | None = None) -> None:
        self.host = host
        self.seed = seed
        self.budget = calls
        self.batch = batch
        self.job_timeout = job_timeout
        self.log = log or (lambda _text: None)
        self.trace = trace.open("w") if trace else None
        self.rng = random.Random(seed)
        module = load_interfaces(host.daemon_source)
        self.contract = load_contract(module)
        self.allowed_errors = documented_error_names() | STANDARD_ERRORS
        self.model = Model()
        self.quarantine: set[str] = set()
        self.gen = CallGenerator(self.rng, self.contract, host.fixtures, self.model,
                                 list(host.clients), self.quarantine, option_keys(module))
        self.gen.commits_left = commits if commits is not None else max(1, calls // 400)
        self.stats = Stats()
        self.findings: dict[tuple[str, ...], Finding] = {}
        self.index = 0
        self.history: deque[str] = deque(maxlen=12)
        self.by_name: dict[str, deque[str]] = {}
        # (dev, ino) of fds clients passed -> (kind, call index, call line, "Member outcome")
        self.passed: dict[tuple[int, int], tuple[str, int, str, str]] = {}
        self.released_names: dict[str, str] = {}  # SessionReleased seen, by session name
        self.shared_fill: dict[tuple[str, int], dict[str, Any]] = {}
        self.expected_incoming: dict[str, SessionModel] = {}
        self.after_kexec: str | None = None     # the release booted, checked once quiescent
        self.boot_count = self._sim_state().boot_count
        self.pair_base: int | None = None
        self.rss_base: int | None = None
        self.open_sessions: set[str] = set()
        self.job_hints: dict[str, list[str]] = {}   # job path -> the calls that may have made it
        self.refused_job_calls: deque[str] = deque(maxlen=8)  # since the last job returned
        self.in_burst = False

    # ---- the loop
    def run(self) -> Report:
        start = time.monotonic()
        try:
            self.check("start")
            next_check = self.batch
            while self.index < self.budget:
                scenario = self.gen.next_scenario()
                self.stats.scenarios[getattr(scenario, "__name__", "?")] += 1
                self.drive(scenario)
                if self.index >= next_check:
                    self.stats.batches += 1
                    self.check("batch")
                    next_check = self.index + self.batch
            self.check("end")
        finally:
            self.stats.elapsed = time.monotonic() - start
            if self.trace:
                self.trace.close()
        return Report(self.seed, self.stats, list(self.findings.values()), self.host.notes,
                      list(self.host.clients))

    def drive(self, scenario: Scenario) -> None:
        outcome: Any = None
        while True:
            try:
                step = scenario.send(outcome)
            except StopIteration:
                return
            if isinstance(step, Call):
                outcome = self.one(step)
            elif isinstance(step, WaitJob):
                outcome = self.wait_job(step.path, step.timeout)
            elif isinstance(step, MemoryProbe):
                outcome = self.memory_probe(step.calls)
            else:
                outcome = self.burst(step.calls)

    def one(self, call: Call) -> Outcome:
        if call.iface == api.MANAGER_IFACE and call.member == "Commit":
            self.before_commit(call)
        outcome = self.send([call])[0]
        self.after_call(call, outcome)
        if call.member == "Commit" and outcome.ok and self.alive():
            self.follow_commit(call, str(outcome.reply[0]))
        return outcome

    def burst(self, calls: list[Call]) -> Outcome:
        # a Commit in a burst could end the daemon while others wait: keep them out
        calls = [c for c in calls if c.member != "Commit"]
        outcomes = self.send(calls)
        self.in_burst = True  # the daemon may have run them in any order
        try:
            for call, outcome in zip(calls, outcomes, strict=True):
                self.after_call(call, outcome)
        finally:
            self.in_burst = False
        for call in calls:  # the daemon may have run them in any order
            session = self.model.sessions.get(str(call.arg(0)))
            if session is not None:
                session.ready = None
        return outcomes[-1] if outcomes else Outcome("ok")

    def memory_probe(self, calls: list[Call]) -> Outcome:
        """A daemon that lets go of each message after answering it ends about where it began;
        one that keeps them grows by what was sent."""
        before = daemon_rss(self.host.daemon.pid)
        outcomes = [self.one(call) for call in calls]
        time.sleep(0.2)
        after = daemon_rss(self.host.daemon.pid)
        sent = sum(len(c.args.get_data_as_bytes().get_data() or b"") for c in calls if c.args)
        self.stats.checks["memory-probe"] += 1
        if before is not None and after is not None and after - before > 0.75 * sent:
            who = sorted({f"{c.identity} (uid {self.uid(c.identity)})" for c in calls})
            self.finding("memory", ("kept-messages",), f"{len(calls)} calls carrying "
                         f"{sent >> 20} MiB from {', '.join(who)} ({outcomes[-1].describe()[:80]})"
                         f" grew the daemon's resident memory by {(after - before) >> 20} MiB: it "
                         "keeps the messages it answered")
        return outcomes[-1]

    def send(self, calls: list[Call]) -> list[Outcome]:
        timeout = self.host.call_timeout
        sent = [(self.host.clients[c.identity], self.host.clients[c.identity].send(
            c.wire(timeout))) for c in calls]
        outcomes = []
        for client, request_id in sent:
            try:
                answer = client.receive(request_id, timeout + 30)
            except ClientError as exc:
                raise FuzzerError(str(exc)) from exc
            outcomes.append(self._outcome(answer))
        return outcomes

    def _outcome(self, answer: dict[str, Any]) -> Outcome:
        reply = decode_variant(answer.get("reply"))
        return Outcome(answer.get("status", "local"), answer.get("error_name", ""),
                       answer.get("error_message", ""),
                       tuple(reply.unpack()) if reply is not None else (),
                       answer.get("fds", []), answer.get("passed", []),
                       answer.get("elapsed", 0.0))

    # ---- after each call
    def after_call(self, call: Call, outcome: Outcome) -> None:
        self.index += 1
        self.count(call, outcome)
        together = " [sent concurrently]" if self.in_burst else ""
        line = f"#{self.index}{together} {call.describe()} -> {outcome.describe()}"
        self.history.append(line)
        name = call.arg(0) if call.iface == api.MANAGER_IFACE else None
        if isinstance(name, str):
            self.by_name.setdefault(name, deque(maxlen=8)).append(line)
        if self.trace:
            self.trace.write(json.dumps({"index": self.index, "call": call.describe(),
                                         "outcome": outcome.describe(),
                                         "burst": self.in_burst}) + "\n")
        self.check_outcome(call, outcome)
        self.note_unknown_job(outcome)
        self.apply(call, outcome)
        self.absorb_signals()
        if outcome.status == "timeout":
            self.on_hang(call)
        self.after_daemon_exit(call)

    def note_unknown_job(self, outcome: Outcome) -> None:
        """A Busy naming a job no call returned: keep the calls before it, which started it."""
        found = re.search(r"\bjob (\d+)\b", outcome.error_message)
        if found is None:
            return
        path = api.JOB_PATH_PREFIX + found.group(1)
        if path not in self.model.jobs and path not in self.job_hints:
            self.job_hints[path] = list(self.history)[-8:]

    def count(self, call: Call, outcome: Outcome) -> None:
        st = self.stats
        st.calls[call.identity] += 1
        st.methods[call.member] += 1
        st.outcomes[outcome.status] += 1
        if outcome.status == "error":
            st.errors[outcome.error_name.rsplit(".", 1)[-1]] += 1
        if outcome.elapsed > st.slowest[0]:
            st.slowest = (outcome.elapsed, call.describe()[:120])

    def finding(self, kind: str, key: tuple[str, ...], violation: str, call: str = "",
                preceding: Iterable[str] | None = None) -> None:
        full = (kind, *key)
        known = self.findings.get(full)
        if known is not None:
            known.count += 1
            short = re.sub(r"\d+", "N", violation)[:160]
            if len(known.others) < 4 and short not in {re.sub(r"\d+", "N", v)[:160]
                                                       for v in [known.violation,
                                                                 *known.others]}:
                known.others.append(violation[:300])
            return
        violation = shorten(violation, 800)
        found = Finding(kind, violation, self.seed, self.index, call or (
            self.history[-1] if self.history else "(before any call)"),
            list(preceding if preceding is not None else list(self.history)[:-1]))
        self.findings[full] = found
        self.log(f"FINDING {found.render()}")

    # ---- per-call invariants
    def check_outcome(self, call: Call, outcome: Outcome) -> None:
        line = self.history[-1]
        if outcome.status == "error":
            self.check_error(call.member, call.identity, outcome.error_name,
                             outcome.error_message, line)
        elif outcome.status == "local":
            self.stats.checks["local-errors"] += 1
        if call.identity != ROOT and SECRET_RELEASE in (repr(outcome.reply)
                                                        + outcome.error_message):
            self.finding("disclosure", (call.member,), f"{call.member} told uid "
                         f"{self.uid(call.identity)} about {self.host.fixtures.secret}, a file "
                         "only root can read (its kernel release is in the answer)", line)
        if outcome.ok:
            self.check_success(call, outcome, line)
        self.check_owner_sees_own(call, outcome, line)

    def check_error(self, member: str, identity: str, name: str, message: str,
                    line: str) -> None:
        self.stats.checks["error-names"] += 1
        if name not in self.allowed_errors and self.alive():
            self.finding("error-name", (member, name), f"{member} answered {name}, which is "
                         f"neither an agent error nor a standard bus error: {message[:300]}",
                         line)
        if name == api.ERROR_PREFIX + "Failed":
            inner = re.search(r"internal error \((\w+)", message)
            if inner or "internal error" in message.lower():
                what = inner.group(1) if inner else "?"
                self.finding("internal-error", (member, what), f"{member} failed with an "
                             f"internal error: {message[:300]}{self.last_traceback()}", line)
            if "not implemented" in message:
                self.finding("internal-error", (member, "not implemented"), message, line)
        if len(message) > MESSAGE_MAX:
            self.finding("error-size", ("echo",), f"{member}: {name} with a message of "
                         f"{len(message)} bytes (it echoes the argument unbounded): "
                         f"{shorten(message, 200)}", line)
        bare = bare_strerror(message)
        if bare is not None:
            self.finding("strerror", (name, bare), f"{member}: {name} with a bare "
                         f"strerror ({bare!r}) and no errno name: {message[:300]}", line)
        if name == BUS_ERROR + "AccessDenied" and identity == ROOT:
            self.finding("error-name", (member, "root-denied"), f"root got AccessDenied for "
                         f"{member}: {message[:200]}", line)

    def check_owner_sees_own(self, call: Call, outcome: Outcome, line: str) -> None:
        """The creator of a session nobody else ended, and no signal dropped, does not hear
        NotFound about it."""
        name = call.arg(0)
        if (outcome.error_name != api.ERROR_PREFIX + "NotFound" or self.in_burst
                or call.iface != api.MANAGER_IFACE or call.member not in SESSION_METHODS
                or not isinstance(name, str)):
            return
        session = self.model.sessions.get(name)
        # a drop announced at about the same time counts: the signal comes on another
        # connection than the answer
        deadline = time.monotonic() + 0.25
        while session is not None and not session.announced and time.monotonic() < deadline:
            self.absorb_signals()
            self.host.observer.wait(0.02)
        if session is None or session.creator != call.identity or session.announced \
                or session.ended_by:
            return
        self.finding("sessions", ("owner-not-found", call.member), f"the creator of {name!r} "
                     f"got NotFound from {call.member} ({outcome.error_message[:160]}); it "
                     "created the session, nobody ended it and no signal said it was dropped",
                     line, preceding=list(self.by_name.get(name, []))[:-1])

    def last_traceback(self) -> str:
        """The end of the last traceback the daemon logged, for an internal error."""
        text = self.host.daemon.stderr_text()
        start = text.rfind("Traceback (most recent call last)")
        if start < 0:
            return ""
        lines = text[start:].splitlines()
        return "\n      daemon log: " + "\n        ".join(lines[-6:])

    def check_success(self, call: Call, outcome: Outcome, line: str) -> None:
        method = self._method(call)
        if method is not None and method.iface == api.MANAGER_IFACE:
            wanted = method.out_signature.count("h")
            if len(outcome.fds) != wanted:
                self.finding("reply", (call.member, "fds"), f"{call.member} answered with "
                             f"{len(outcome.fds)} fds for {wanted} h argument(s)", line)
        privileged = (call.iface == api.MANAGER_IFACE and call.member not in READ_ONLY_METHODS
                      and method is not None) or (call.iface == api.JOB_IFACE)
        if call.identity == UNAUTHORIZED and privileged:
            self.finding("authz", (call.member,), f"uid {self.uid(call.identity)}, whom polkit "
                         f"does not authorize, succeeded with {call.member}", line)
        if call.member == "Set" and call.iface == PROPERTIES_IFACE:
            self.finding("authz", ("Set",), "Properties.Set succeeded on a read-only property",
                         line)
        self.check_owner(call, line)
        self.check_session_success(call, outcome, line)

    def check_owner(self, call: Call, line: str) -> None:
        name = call.arg(0)
        if call.member not in SESSION_METHODS or call.identity == ROOT or not isinstance(name,
                                                                                       str):
            return
        session = self.model.sessions.get(name)
        if session is not None and session.uid != self.uid(call.identity):
            self.finding("authz", (call.member, "owner"), f"uid {self.uid(call.identity)} "
                         f"succeeded with {call.member} on {name!r}, a session of uid "
                         f"{session.uid}", line)

    def check_session_success(self, call: Call, outcome: Outcome, line: str) -> None:
        name = call.arg(0)
        if call.member.startswith("CreateSession") and isinstance(name, str):
            raw = name.encode()
            if name in ("kho-agent", "systemd") or not 0 < len(raw) < 64:
                self.finding("session-name", (call.member, name[:10]), f"{call.member} "
                             f"accepted the name {name[:80]!r} ({len(raw)} bytes)", line)
        if call.member == "Preserve":
            index = call.arg(1)
            kinds = [p["kind"] for p in outcome.passed]
            kind = kinds[index] if isinstance(index, int) and 0 <= index < len(kinds) else None
            if kind is None or kind not in PRESERVABLE:
                self.finding("preserve", (str(kind),), f"Preserve accepted fd index {index} "
                             f"of {kinds} (a {kind})", line)
        if call.member == "RetrieveFile" and isinstance(name, str) and outcome.fds:
            session = self.model.sessions.get(name)
            want = session.tokens.get(call.arg(1)) if session else None
            got = outcome.fds[0].get("sha256")
            if want is not None and got != want:
                self.finding("data", (name,), f"RetrieveFile({name!r}, {call.arg(1)}) gave "
                             f"bytes with sha256 {got}, preserved were {want}", line)

    def _method(self, call: Call) -> Method | None:
        iface = self.contract.get(call.iface)
        if iface is None:
            return None
        method = next((m for m in iface.methods if m.name == call.member), None)
        if method is None or (call.args is None and method.in_args) or (
                call.args is not None and call.args.get_type_string() != method.in_signature):
            return None
        return method

    def uid(self, identity: str) -> int:
        return self.host.identities[identity].uid

    # ---- the model
    def apply(self, call: Call, outcome: Outcome) -> None:
        """What a call did, as far as the fuzzer's picture of the daemon goes."""
        for passed in outcome.passed:
            if passed["kind"] not in SHARED_INODE_KINDS:
                self.passed[(passed["dev"], passed["ino"])] = (
                    passed["kind"], self.index, self.history[-1],
                    f"{call.member} {'accepted' if outcome.ok else 'refused'}")
        self._shared_slots(call)
        method = self._method(call)
        if call.iface != api.MANAGER_IFACE or method is None:
            return
        if method.out_signature == "(o)":  # starts a job: a refused one must leave none behind
            if outcome.ok:
                self.refused_job_calls.clear()
            else:
                self.refused_job_calls.append(self.history[-1])
        name = call.arg(0)
        if outcome.status == "timeout" and isinstance(name, str):
            self.model.uncertain.add(name)
        if outcome.ok and outcome.reply and isinstance(outcome.reply[0], str) and \
                outcome.reply[0].startswith(api.JOB_PATH_PREFIX):
            path = outcome.reply[0]
            self.model.jobs.setdefault(path, JobModel(path, call.member.lower(),
                                                      call.identity, self.index))
        if not outcome.ok or not isinstance(name, str):
            return
        handler = getattr(self, "_did_" + call.member, None)
        if handler is not None:
            handler(call, outcome, name)
        elif call.member.startswith("CreateSession"):
            self._did_CreateSession(call, outcome, name)

    def _shared_slots(self, call: Call) -> None:
        for spec in call.fds:
            if spec["kind"] == "memfd_shared":
                self.shared_fill.setdefault((call.identity, int(spec["fill"]) % 3), spec)

    def _did_CreateSession(self, call: Call, outcome: Outcome, name: str) -> None:
        client = self.host.clients[call.identity]
        self.model.sessions[name] = SessionModel(
            name, call.identity, self.uid(call.identity), client.unique_name,
            path=str(outcome.reply[0]), holder=call.identity)
        self.model.uncertain.discard(name)

    def _did_Preserve(self, call: Call, outcome: Outcome, name: str) -> None:
        session = self.model.sessions.get(name)
        index = call.arg(1)
        if session is None or not isinstance(index, int) or not 0 <= index < len(call.fds):
            return
        spec = {**call.fds[index], "kind": outcome.passed[index]["kind"]}
        if spec["kind"] == "memfd_shared":
            spec = {**self.shared_fill[(call.identity, int(spec["fill"]) % 3)],
                    "kind": "memfd"}
        session.tokens[int(call.arg(2))] = expected_digest(spec)
        session.size += int(spec.get("size", 0))
        session.ready = False
        passed = outcome.passed[index]
        session.inodes.add((passed["dev"], passed["ino"]))

    def _did_SetReady(self, call: Call, _outcome: Outcome, name: str) -> None:
        session = self.model.sessions.get(name)
        if session is not None:
            session.ready = bool(call.arg(1))

    def _did_ReleaseSession(self, call: Call, _o: Outcome, name: str) -> None:
        self._ended_by(call, name)

    def _did_FinishSession(self, call: Call, _o: Outcome, name: str) -> None:
        self._ended_by(call, name)

    def _ended_by(self, call: Call, name: str) -> None:
        """The creator ended its session: it knows. Someone else (root) ending it: the creator
        was not told, unless a signal says so, which the next check looks for."""
        session = self.model.sessions.get(name)
        if session is None:
            return
        if call.identity != session.creator:
            session.ended_by = self.history[-1]
            return
        del self.model.sessions[name]
        for label in {session.creator, session.holder} - {""}:
            self.host.clients[label].request({"op": "drop", "names": [name]}, 10)

    def _did_RetrieveSession(self, call: Call, _o: Outcome, name: str) -> None:
        session = self.model.sessions.get(name)
        if session is not None:
            session.claimed = True
            session.holder = call.identity
            if self.uid(call.identity) == session.uid:  # root claiming for it is not its owner
                session.claimer = (session.uid, self.host.clients[call.identity].unique_name)

    def _did_RetrieveFile(self, _call: Call, _o: Outcome, name: str) -> None:
        session = self.model.sessions.get(name)
        if session is not None:
            session.claimed = True

    def absorb_signals(self) -> None:
        """JobRemoved ends jobs; a cancel that released the sessions (or any signal naming a
        session) tells every client its sessions were dropped."""
        for sig in self.host.observer.drain():
            if sig.sender != self.host.daemon.owner:
                continue
            self.stats.signals[sig.member] += 1
            if self.trace and sig.member != "PropertiesChanged":
                self.trace.write(json.dumps({"after": self.index, "signal": sig.member,
                                             "path": sig.path, "args": repr(sig.args)}) + "\n")
            if sig.member == "JobRemoved" and len(sig.args) >= 3:
                self._job_removed(str(sig.args[1]), str(sig.args[2]))
            elif sig.member != "PropertiesChanged":
                text = repr(sig.args)
                if sig.member == "SessionReleased" and sig.args:
                    # may come before the creator's reply is processed (concurrent calls): kept
                    # by name for the session the model learns of afterwards
                    self.released_names[str(sig.args[0])] = f"{sig.member} on {sig.path}"
                for session in self.model.sessions.values():
                    if session.name in text or (session.path and (session.path in text or
                                                                  sig.path == session.path)):
                        session.announced = f"{sig.member} on {sig.path}"

    def _job_removed(self, path: str, result: str) -> None:
        job = self.model.jobs.get(path)
        if job is None:  # a job the daemon started on its own (verify at start)
            kind = self._job_type(path)
            job = self.model.jobs.setdefault(path, JobModel(path, kind, "daemon", self.index))
        job.result = result
        if (job.kind == "cancel" and result == api.JOB_DONE) or (
                job.kind == "prepare" and result == api.JOB_CANCELED):
            for session in self.model.this_boot():
                session.announced = f"JobRemoved {path} {result}"

    def _job_type(self, path: str) -> str:
        try:
            return str(self.host.observer.get(path, api.JOB_IFACE, "Type"))
        except RemoteError:
            return "unknown"

    # ---- jobs, commits, restarts
    def wait_job(self, path: str, timeout: float) -> Outcome:
        deadline = time.monotonic() + timeout
        while True:
            self.absorb_signals()
            job = self.model.jobs.get(path)
            if job is None:
                return Outcome("local", error_message="job of an earlier daemon run")
            if job.result:
                return Outcome("ok", reply=(job.result,))
            if not self.alive():
                self.after_daemon_exit(None)
                return Outcome("local", error_message="the daemon ended")
            if time.monotonic() >= deadline:
                self.finding("hang", ("job", job.kind), f"{job.kind} job {path} did not end "
                             f"within {timeout:.0f} s")
                self.unstick()
                return Outcome("timeout")
            self.host.observer.wait(0.05)

    def alive(self) -> bool:
        return self.host.daemon.returncode is None

    def before_commit(self, call: Call) -> None:
        """A commit that may be real: check everything first, and note which sessions must
        come back after the kexec."""
        opts = call.arg(0)
        dry = isinstance(opts, dict) and opts.get("dry_run") is True
        if dry or not self.alive():
            return
        self.check("before commit")
        # what the kernel still has: a listed session whose fd is closed will not come back,
        # and that was reported by the check
        self.expected_incoming = {n: s for n, s in self.model.sessions.items()
                                  if not s.incoming and n in self.open_sessions}

    def follow_commit(self, call: Call, job_path: str) -> None:
        """Wait for a commit job; a real one that succeeded ends the daemon (the simulated
        kexec): start it again as the next boot."""
        outcome = self.wait_job(job_path, self.job_timeout)
        if outcome.reply != (api.JOB_DONE,) or not self.alive():
            return
        try:
            result = json.loads(self.host.observer.get(job_path, api.JOB_IFACE, "Result"))
        except (RemoteError, ValueError):
            return
        if result.get("dry_run"):
            return
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.alive():
            self.finding("commit", ("no-exit",), "a real commit job ended 'done' but the "
                         "simulated kexec did not end the daemon within 10 s", call.describe())
            return
        self.after_daemon_exit(call)

    def after_daemon_exit(self, call: Call | None) -> None:
        if self.alive():
            return
        daemon = self.host.daemon
        if self._sim_state().boot_count > self.boot_count:
            self.next_boot()
            return
        self.finding("crash", (str(daemon.returncode),), f"the daemon exited with status "
                     f"{daemon.returncode}; stderr tail:\n{daemon.stderr_text()[-1500:]}",
                     call.describe() if call else "")
        self.restart("crash")

    def next_boot(self) -> None:
        """After a simulated kexec: start the daemon as the next boot; the sessions that were
        listed come back as incoming sessions."""
        sim = self._sim_state()
        self.stats.commits += 1
        self.gen.commits_left -= 1
        self._restart_daemon("kexec")
        self.boot_count = sim.boot_count
        self.model.sessions = {
            name: SessionModel(name, s.creator, s.uid, "", path=api.SESSION_PATH_PREFIX
                               + api.escape_path_component(name), incoming=True,
                               tokens=dict(s.tokens), size=s.size)
            for name, s in self.expected_incoming.items()}
        self.expected_incoming = {}
        self.after_kexec = sim.release
        self.check("after kexec")  # waits for the verification the daemon starts itself

    def restart(self, reason: str) -> None:
        """The daemon crashed or stopped answering: kill it and start it in the same boot
        (its sessions are lost; the fuzzer forgets them)."""
        self.host.daemon.kill()
        self._restart_daemon(reason)
        self.model.sessions = {}

    def _restart_daemon(self, reason: str) -> None:
        self.stats.restarts[reason] += 1
        self.absorb_signals()  # the old run's last words (a later one is filtered by sender)
        self.rss_base = None
        self.host.fixtures.unblock_fifos(0.2)
        self.host.daemon.stop(check=False)
        try:
            self.host.daemon.start()
        except Exception as exc:
            raise FuzzerError(f"the daemon does not start again after {reason}: {exc}") from exc
        for client in self.host.clients.values():
            held = client.request({"op": "probe"}, 30)["held"]
            client.request({"op": "drop", "names": sorted({h["name"] for h in held})}, 10)
        self.model.jobs = {}
        self.job_hints = {}
        self.model.uncertain = set()
        self.passed = {}

    def on_hang(self, call: Call) -> None:
        text = show_variant(call.args, 1 << 30)
        named = [p for p in self.host.fixtures.blocking() if f"'{p}'" in text]
        self.quarantine.update(named)
        blocking = sorted({"a symlink to the FIFO" if p.endswith("-link") else "the FIFO"
                           for p in named})
        streams = sorted({f["kind"] for f in call.fds} & STREAM_KINDS)
        self.quarantine.update("fdkind:" + k for k in streams)
        blocking += [f"a {k} fd" for k in streams]
        why = f" (it passes {', '.join(blocking)})" if blocking else ""
        self.finding("hang", (call.member, *(sorted(blocking) or ["other"])),
                     f"{call.member} got no answer within {self.host.call_timeout:.0f} s{why}")
        self.unstick()

    def unstick(self) -> None:
        """Release an engine blocked on the FIFO; restart a daemon that still does not answer."""
        self.host.fixtures.unblock_fifos(1.0)
        try:
            self.host.observer.get(api.MANAGER_PATH, api.MANAGER_IFACE, "State")
        except (RemoteError, GLib.Error):
            self.finding("hang", ("unresponsive",), "the daemon stopped answering "
                         "Properties.Get after a hang; restarted it")
            self.restart("unresponsive")

    def _sim_state(self) -> Any:
        from kho_agent.sim.boot_record import load

        return load(self.host.sim_dir)

    # ---- the batch invariants
    def check(self, reason: str) -> None:
        if not self.alive():
            self.after_daemon_exit(None)
        if not self.answers():
            return
        self.quiesce()
        self.absorb_signals()
        props = self.check_manager()
        self.check_jobs()
        rows = self.check_sessions(props)
        self.check_fds(rows, props)
        if self.after_kexec is not None:
            self.check_after_kexec(props)
        self.stats.checks[f"checkpoint:{reason}"] += 1

    def answers(self) -> bool:
        self.stats.checks["alive"] += 1
        try:
            self.host.observer.get(api.MANAGER_PATH, api.MANAGER_IFACE, "State")
            return True
        except (RemoteError, GLib.Error) as exc:
            self.finding("hang", ("unresponsive",), f"the daemon (pid {self.host.daemon.pid}) "
                         f"does not answer Properties.Get(State): {exc}")
        self.unstick()
        return self.alive()

    def quiesce(self) -> None:
        """Wait until no job runs and State is not transient; either lasting is a finding."""
        self.stats.checks["quiescent"] += 1
        # once something was stuck (and reported), a shorter wait: the run stays bounded
        stuck_before = any(k[:2] in (("hang", "job"), ("state", "stuck"))
                           for k in self.findings)
        wait = min(3.0, self.job_timeout) if stuck_before else self.job_timeout
        deadline = time.monotonic() + wait
        while True:
            self.absorb_signals()
            running = self.running_jobs()
            state = str(self.host.observer.get(api.MANAGER_PATH, api.MANAGER_IFACE, "State"))
            if not running and state not in TRANSIENT_STATES:
                return
            if time.monotonic() >= deadline:
                break
            self.host.observer.wait(0.05)
        if running:
            path, kind = running[0]
            known = path in self.model.jobs
            self.finding("hang", ("job", kind, str(known)), f"{kind} job {path} still runs "
                         f"after {wait:.0f} s" + ("" if known else
                                                              " (no call returned this job)"),
                         preceding=self._job_origin(path, known))
        else:
            message = self.host.observer.get(api.MANAGER_PATH, api.MANAGER_IFACE,
                                             "StateMessage")
            self.finding("state", ("stuck", state), f"State stays {state!r} ({message!r}) "
                         f"with no job running, for {wait:.0f} s")
        self.unstick()
        if self.alive() and (self.running_jobs() or str(self.host.observer.get(
                api.MANAGER_PATH, api.MANAGER_IFACE, "State")) in TRANSIENT_STATES):
            # every later job would be Busy behind it: go on with a fresh daemon, once the
            # jobs that ended have been looked at (one may say why)
            self.absorb_signals()
            self.check_jobs()
            self.restart("stuck")

    def _job_origin(self, path: str, known: bool) -> list[str] | None:
        """For a job no call returned: the job-starting calls refused since the last one that
        returned a job (one of them made it), else the calls before a Busy first named it."""
        if known:
            return None
        if self.refused_job_calls:
            return ["job-starting calls refused since the last job a call returned:",
                    *self.refused_job_calls]
        return self.job_hints.get(path)

    def running_jobs(self) -> list[tuple[str, str]]:
        """(path, type) of the jobs still running: the ones calls returned, and any Job object
        on the bus whose State is running (a job no call returned may still block others)."""
        out = [(j.path, j.kind) for j in self.model.jobs.values() if not j.result]
        for path in self.host.observer.children(api.MANAGER_PATH + "/job"):
            job = self.model.jobs.get(path)
            if job is not None:
                continue
            try:
                props = self.host.observer.get_all(path, api.JOB_IFACE)
            except RemoteError:
                continue
            if props.get("State") == api.JOB_RUNNING:
                out.append((path, str(props.get("Type"))))
        return out

    def check_manager(self) -> dict[str, Any]:
        self.stats.checks["manager-properties"] += 1
        props = self.host.observer.get_all(api.MANAGER_PATH, api.MANAGER_IFACE)
        want = {p for p, _s, _w in self.contract[api.MANAGER_IFACE].properties}
        if set(props) != want:
            self.finding("state", ("properties",), f"GetAll(Manager) has {sorted(props)}, the "
                         f"contract {sorted(want)}")
        state, message = str(props.get("State")), str(props.get("StateMessage"))
        for prefix, states in MESSAGE_STATES:
            if message.startswith(prefix) and state not in states:
                self.finding("state", ("message", prefix.strip(), state), f"State {state!r} "
                             f"with StateMessage {message[:200]!r}")
        last = str(props.get("LastResult", ""))
        try:
            if last and not isinstance(json.loads(last), dict):
                raise ValueError("not an object")
        except ValueError as exc:
            self.finding("state", ("last-result",), f"LastResult is not a JSON object ({exc}): "
                         f"{last[:200]!r}")
        self.check_loaded(state, str(props.get("TargetKernel", "")), message)
        return props

    def check_loaded(self, state: str, target: str, message: str) -> None:
        """The kexec image the simulated kernel holds agrees with State."""
        loaded = self._sim_state().loaded is not None
        if state == "prepared" and not (loaded and target):
            self.finding("state", ("prepared-unloaded",), f"State 'prepared' ({message[:120]!r})"
                         f" but loaded={loaded}, TargetKernel={target!r}")
        if state == "idle" and loaded:
            self.finding("state", ("idle-loaded",), f"State 'idle' ({message[:120]!r}) but the "
                         "simulated kernel still has a kexec image loaded")

    def check_jobs(self) -> None:
        for job in self.model.jobs.values():
            if not job.result or job.checked:
                continue
            job.checked = True
            self.stats.checks["jobs"] += 1
            try:
                props = self.host.observer.get_all(job.path, api.JOB_IFACE)
            except RemoteError:
                continue  # gone after its linger time
            if props.get("State") != job.result:
                self.finding("job", ("state",), f"JobRemoved said {job.result!r} for {job.path} "
                             f"but its State is {props.get('State')!r}")
            if job.result == api.JOB_FAILED:
                name, message = str(props.get("ErrorName")), str(props.get("ErrorMessage"))
                if not name:
                    self.finding("job", ("no-error",), f"failed {job.kind} job without ErrorName")
                self.check_error(f"{job.kind} job", job.identity, name, message,
                                 f"{job.kind} job {job.path} -> {name}: {message[:200]}")
            elif job.result == api.JOB_DONE:
                try:
                    json.loads(str(props.get("Result")))
                except ValueError:
                    self.finding("job", ("result",), f"{job.kind} job done with a Result that "
                                 f"is not JSON: {str(props.get('Result'))[:200]!r}")

    def probes(self) -> dict[tuple[str, str], Held]:
        """(client, session name) -> the session fd that client holds, asked by GET_NAME."""
        out: dict[tuple[str, str], Held] = {}
        for label, client in self.host.clients.items():
            for h in client.request({"op": "probe"}, 60)["held"]:
                out[(label, h["name"])] = Held(label, h["dev"], h["ino"], h["alive"], h["got"])
        return out

    def check_sessions(self, props: dict[str, Any]) -> dict[str, tuple[Any, ...]]:
        obs = self.host.observer
        self.stats.checks["sessions"] += 1
        (rows,) = obs.call(api.MANAGER_PATH, api.MANAGER_IFACE, "ListSessions")
        listed = {str(r[0]): tuple(r) for r in rows}
        self._check_exported(listed)
        held = self.probes()
        fds = {(e.dev, e.ino) for e in self.daemon_fds()}
        self.open_sessions = {name for name in listed if self._open(name, held)}
        for name, row in listed.items():
            self._check_listed(name, row, held, fds)
        for name in [n for n in self.model.sessions if n not in listed]:
            self._check_vanished(name, held)
        stale: dict[str, list[str]] = {}
        for (label, name) in held:
            if name not in self.model.sessions:
                stale.setdefault(label, []).append(name)
        for label, names in stale.items():
            self.host.clients[label].request({"op": "drop", "names": names}, 10)
        for session in self.model.sessions.values():
            session.announced = ""  # an announcement covers what was dropped until now
        return listed

    def _open(self, name: str, held: dict[tuple[str, str], Held]) -> bool:
        """A listed session is open in the kernel unless its creator's fd says it is closed."""
        session = self.model.sessions.get(name)
        holder = held.get((session.holder, name)) if session else None
        return holder is None or holder.alive

    def _check_exported(self, listed: dict[str, tuple[Any, ...]]) -> None:
        nodes = set(self.host.observer.children(api.MANAGER_PATH + "/session"))
        paths = {str(r[1]) for r in listed.values()}
        if nodes != paths:
            self.finding("sessions", ("exported",), "the Session objects on the bus "
                         f"({sorted(nodes - paths)} extra, {sorted(paths - nodes)} missing) "
                         "differ from ListSessions")
        for reserved in ("kho-agent", "systemd"):
            if reserved in listed:
                self.finding("sessions", ("reserved", reserved), f"ListSessions lists the "
                             f"reserved session {reserved!r}")

    def _check_listed(self, name: str, row: tuple[Any, ...], held: dict[tuple[str, str], Held],
                      daemon_fds: set[tuple[int, int]]) -> None:
        _name, path, uid, sender, ready, claimed, incoming = row
        session = self.model.sessions.get(name)
        lines = list(self.by_name.get(name, []))
        if session is None:
            if name not in self.model.uncertain:
                self.finding("sessions", ("unknown",), f"ListSessions lists {name!r}, which no "
                             "client created (or its creation failed)", preceding=lines)
            creator = next((label for label, c in self.host.clients.items()
                            if c.unique_name == sender), ROOT)
            session = SessionModel(name, creator, int(uid), str(sender), str(path),
                                   bool(incoming), bool(claimed), bool(ready), holder=creator)
            self.model.sessions[name] = session
            self.model.uncertain.discard(name)
        problems = self._row_problems(session, row)
        if problems:
            self.finding("sessions", ("row", "incoming" if incoming else "this-boot",
                                      problems[0].split()[0]),
                         f"ListSessions row {row} disagrees with what the clients did: "
                         + "; ".join(problems), preceding=lines)
        session.ready = bool(ready)
        self._check_object(name, row, session, lines)
        holder = held.get((session.holder, name))
        if holder is not None and (not session.incoming or claimed):
            self._check_kernel(name, holder, daemon_fds, lines)

    def _row_problems(self, session: SessionModel, row: tuple[Any, ...]) -> list[str]:
        """Owner (uid, bus name): the uid the session belongs to, with the bus name of its
        creator, after the kexec of the owner's connection that claimed it (the contract);
        Ready as last set; Claimed and Incoming as the calls left them."""
        _name, _path, uid, sender, ready, claimed, incoming = row
        out = []
        if bool(incoming) != session.incoming:
            out.append(f"Incoming {bool(incoming)}, expected {session.incoming}")
        owner: tuple[Any, ...] = session.claimer or (session.uid, session.sender)
        got: tuple[Any, ...] = (int(uid), str(sender))
        if session.incoming and session.claimer is None:
            owner, got = owner[:1], got[:1]   # the bus name comes with the claim
        if got != owner:
            out.append(f"Owner {got}, expected {owner}")
        if not session.incoming and session.ready is not None and bool(ready) != session.ready:
            out.append(f"Ready {bool(ready)}, expected {session.ready}")
        if session.incoming and bool(claimed) != session.claimed:
            out.append(f"Claimed {bool(claimed)}, expected {session.claimed}")
        return out

    def _check_object(self, name: str, row: tuple[Any, ...], session: SessionModel,
                      lines: list[str]) -> None:
        try:
            props = self.host.observer.get_all(str(row[1]), api.SESSION_IFACE)
        except RemoteError as exc:
            self.finding("sessions", ("object",), f"the Session object of {name!r} at {row[1]} "
                         f"cannot be read: {exc}", preceding=lines)
            return
        seen = (props.get("Name"), tuple(props.get("Owner", ())), props.get("Ready"),
                props.get("Claimed"), props.get("Incoming"))
        if seen != (row[0], (row[2], row[3]), row[4], row[5], row[6]):
            self.finding("sessions", ("object-row",), f"Session object {row[1]} says {seen}, "
                         f"ListSessions {row}", preceding=lines)
        tokens = sorted(props.get("Tokens", []))
        if tokens != sorted(session.tokens):
            self.finding("sessions", ("tokens", "incoming" if session.incoming else "this-boot"),
                         f"Session {name!r} has Tokens {tokens}, the clients preserved "
                         f"{sorted(session.tokens)}", preceding=lines)

    def _check_kernel(self, name: str, holder: Held, daemon_fds: set[tuple[int, int]],
                      lines: list[str]) -> None:
        self.stats.checks["kernel-sessions"] += 1
        if not holder.alive:
            self.finding("kernel", ("listed-closed",), f"ListSessions lists {name!r} but its "
                         f"session is closed in the kernel (GET_NAME on the fd {holder.label} "
                         f"holds: {holder.got})", preceding=lines)
        elif (holder.dev, holder.ino) not in daemon_fds:
            self.finding("kernel", ("not-held",), f"{name!r} is listed and open but the daemon "
                         "no longer holds its session fd", preceding=lines)

    def _check_vanished(self, name: str, held: dict[tuple[str, str], Held]) -> None:
        session = self.model.sessions.pop(name)
        lines = list(self.by_name.get(name, []))
        early = self.released_names.pop(name, None)
        if not session.announced and not early:
            kind = "incoming" if session.incoming else "this-boot"
            how = f" ({session.ended_by.split(' -> ')[0]} ended it)" if session.ended_by else ""
            self.finding("sessions", ("vanished", kind, str(bool(how))), f"{kind} session "
                         f"{name!r} of {session.creator} (uid {session.uid}) is no longer listed"
                         f"{how} and no signal told its owner", preceding=lines)
        holder = held.get((session.holder, name))
        if holder is not None and holder.alive:
            self.finding("kernel", ("unlisted-open",), f"{name!r} is no longer listed but its "
                         f"kernel session is still open (GET_NAME answers {holder.got!r})",
                         preceding=lines)

    def daemon_fds(self) -> list[FdEntry]:
        out = []
        directory = f"/proc/{self.host.daemon.pid}/fd"
        with contextlib.suppress(OSError):
            for entry in os.listdir(directory):
                link = f"{directory}/{entry}"
                with contextlib.suppress(OSError):
                    st = os.stat(link)
                    out.append(FdEntry(int(entry), os.readlink(link), st.st_dev, st.st_ino))
        return out

    def check_fds(self, listed: dict[str, tuple[Any, ...]], props: dict[str, Any]) -> None:
        """No fd a client passed stays in the daemon unless it is a preserved file of a listed
        session; no file is open over and over; the session sockets add up."""
        self.stats.checks["fds"] += 1
        table = self.daemon_fds()
        self.stats.max_daemon_fds = max(self.stats.max_daemon_fds, len(table))
        justified = set().union(*(s.inodes for s in self.model.sessions.values()
                                  if s.name in listed))
        prepared = props.get("State") == "prepared"
        for entry in table:
            if entry.fd <= 2:
                continue  # the daemon's stdio (/dev/null, a log): the same file may be passed
            passed = self.passed.get((entry.dev, entry.ino))
            if passed is not None and prepared and passed[3] == "Prepare accepted":
                continue  # the prepared kernel's image: the daemon may keep it until commit
            if passed is not None and (entry.dev, entry.ino) not in justified:
                kind, index, line, how = passed
                self.finding("fd-leak", ("passed", how.split()[-1]), f"the daemon still "
                             f"holds the {kind} fd passed in call #{index} ({how}; now "
                             f"{entry.target}), and no listed session has it preserved", line)
        base = str(self.host.base)
        # a file opened over and over (passed fds are counted above)
        repeated = Counter(e.target for e in table if e.target.startswith("/")
                           and not e.target.startswith(("/dev/", "/memfd:"))
                           and (e.dev, e.ino) not in self.passed)
        for target, count in repeated.items():
            if count >= 8:
                key = re.sub(r"[0-9a-f]{12,}", "<id>", target.replace(base, "<tmp>"))
                self.finding("fd-leak", ("repeated", key),
                             f"the daemon has {target.replace(base, '<tmp>')} open {count} "
                             "times")
        self._check_socket_count(table, listed, str(props.get("State")))
        self._check_memory(listed)
        self.passed = {k: v for k, v in self.passed.items()
                       if k in {(e.dev, e.ino) for e in table}}

    def _check_memory(self, listed: dict[str, tuple[Any, ...]]) -> None:
        """The daemon's memory stays within what it holds: the simulated kernel keeps a copy of
        every preserved file; anything else that grows with the calls is a leak."""
        rss = daemon_rss(self.host.daemon.pid)
        if rss is None:
            return
        if self.rss_base is None:
            self.rss_base = rss
        held = sum(s.size for n, s in self.model.sessions.items() if n in listed)
        self.stats.max_daemon_rss = max(self.stats.max_daemon_rss, rss)
        self.stats.checks["memory"] += 1
        allowed = self.rss_base + 3 * held + MEMORY_SLACK
        if rss > allowed:
            self.finding("memory", ("growth",), f"the daemon's resident memory is "
                         f"{rss >> 20} MiB: {(rss - self.rss_base) >> 20} MiB more than at its "
                         f"start, while the listed sessions hold {held >> 20} MiB (calls so far: "
                         f"{self.index}; huge arguments are kept?)")

    def _check_socket_count(self, table: list[FdEntry], listed: dict[str, tuple[Any, ...]],
                            state: str) -> None:
        """An open session of the simulated kernel is a socketpair with both ends in the daemon
        (kho_agent/sim/liveupdate.py): one per listed session, plus the agent's own while
        prepared. More is a kernel session that nobody lists (and nobody will release)."""
        peers = unix_peers()
        if peers is None:
            return
        mine = {int(e.target[8:-1]) for e in table if e.target.startswith("socket:[")}
        pairs = {frozenset((a, peers[a])) for a in mine if peers.get(a) in mine}
        expected = len(listed) + (1 if state == "prepared" else 0)
        self.stats.checks["kernel-session-count"] += 1
        if self.pair_base is None:  # the daemon's own socketpairs, from the first check
            self.pair_base = len(pairs) - expected
        expected += self.pair_base
        if len(pairs) > expected:
            self.finding("kernel", ("unlisted-open", state), f"{len(pairs)} sessions are open in "
                         f"the simulated kernel (socketpairs held by the daemon, less "
                         f"{self.pair_base} of its own) but {len(listed)} are listed (state "
                         f"{state}): the rest are held by nobody's knowledge")

    def check_after_kexec(self, props: dict[str, Any]) -> None:
        """The first quiescent check of a boot that came through a commit: the automatic
        verification passed, and the manifest names the kernel that was booted."""
        booted, self.after_kexec = self.after_kexec, None
        self.stats.checks["after-kexec"] += 1
        try:
            last = json.loads(str(props.get("LastResult")) or "{}")
        except ValueError:
            last = {}
        if last.get("result") != "verified":
            failures = last.get("failures") or last.get("reason")
            self.finding("verify", (str(last.get("result")),), "the verification after an "
                         f"undisturbed simulated kexec says {last.get('result')!r}: "
                         f"{json.dumps(failures)[:600]}")
        try:
            (text,) = self.host.observer.call(api.MANAGER_PATH, api.MANAGER_IFACE,
                                              "GetManifest")
            release_to = json.loads(text).get("release_to")
        except (RemoteError, ValueError) as exc:
            release_to = f"(no manifest: {exc})"
        if release_to != booted:
            self.finding("manifest", ("release_to",), f"the committed manifest says release_to "
                         f"{release_to!r}, the kexec booted {booted!r}")


def daemon_rss(pid: int) -> int | None:
    """VmRSS of a process in bytes (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def unix_peers() -> dict[int, int] | None:
    """Unix socket inode -> its peer's inode, from `ss -x` (None when ss is missing)."""
    try:
        out = subprocess.run(["ss", "-xnaH"], capture_output=True, text=True, timeout=10,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    peers = {}
    for line in out.splitlines():
        fields = line.split()
        # Netid State Recv-Q Send-Q Local Port Peer Port
        if len(fields) >= 8 and fields[5].isdigit() and fields[7].isdigit():
            peers[int(fields[5])] = int(fields[7])
    return peers


def run_fuzz(calls: int, seed: int, *, batch: int = 25, commits: int | None = None,
             call_timeout: float = 5.0, base: Path | None = None,
             log: Callable[[str], None] | None = None, trace: Path | None = None,
             daemon_source: Path | None = None, job_timeout: float = 10.0) -> Report:
    """A whole run: its own private bus, simulated host, daemon and clients."""
    with FuzzHost(base, call_timeout=call_timeout, daemon_source=daemon_source) as host:
        fuzzer = Fuzzer(host, seed=seed, calls=calls, batch=batch, commits=commits, log=log,
                        trace=trace, job_timeout=job_timeout)
        return fuzzer.run()
