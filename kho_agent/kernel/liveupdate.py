"""`/dev/liveupdate` (include/uapi/linux/liveupdate.h): sessions and the files preserved in them.

The protocols below are the seam: the real implementation (ioctls through `fcntl.ioctl`) and the
simulated kernel (`kho_agent.sim`) both provide them, and everything above `kernel/` only sees the
protocols. Every failure is a `KernelRefused` carrying the errno and advice a user can act on.
"""

from __future__ import annotations

import errno
import fcntl
import os
import platform
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ..errors import AbiMismatch, InvalidArgument, KernelRefused
from .procfd import FdHolder, describe_holders, find_holders

SESSION_NAME_LENGTH = 64  # includes the NUL: names are 1..63 bytes
DEVICE_PATH = "dev/liveupdate"  # relative to the host root


class LiveUpdateSession(Protocol):
    """A LUO session file. Outgoing sessions (created in this boot) take PRESERVE_FD; incoming
    ones (retrieved after a live update) take RETRIEVE_FD and FINISH. Closing an outgoing session
    before the kexec unpreserves its files; closing an incoming one finishes it."""

    @property
    def name(self) -> str: ...

    @property
    def incoming(self) -> bool: ...

    def fileno(self) -> int: ...

    def preserve_fd(self, fd: int, token: int) -> None: ...

    def retrieve_fd(self, token: int) -> int:
        """Return a new fd (O_CLOEXEC) owned by the caller."""
        ...

    def finish(self) -> None: ...

    def get_name(self) -> str: ...

    def close(self) -> None: ...


class LiveUpdateDevice(Protocol):
    """An open `/dev/liveupdate` (exclusive: one open file per host)."""

    def create_session(self, name: str) -> LiveUpdateSession: ...

    def retrieve_session(self, name: str) -> LiveUpdateSession: ...

    def close(self) -> None: ...


class LiveUpdate(Protocol):
    """The device as a whole: whether it exists, who holds it, and opening it."""

    def present(self) -> bool: ...

    def holders(self) -> list[int]:
        """Pids that hold the device open (from /proc/*/fd), for the EBUSY message."""
        ...

    def open(self) -> LiveUpdateDevice: ...

    def adopt_session(self, fd: int, name: str) -> LiveUpdateSession:
        """Take over an incoming session fd that another process retrieved (systemd's fd store
        hands them back after the kexec in hand-off mode `fdstore`). The fd is owned by the
        returned session from then on, also when the name does not match (it is closed)."""
        ...


# --- ioctl numbers ---------------------------------------------------------------------------

LIVEUPDATE_IOCTL_TYPE = 0xBA


@dataclass(frozen=True)
class IocLayout:
    """How `_IOC()` packs direction, type, nr and size on one architecture family."""

    none: int
    write: int
    read: int
    size_bits: int
    dir_bits: int
    nr_bits: int = 8
    type_bits: int = 8


GENERIC_IOC = IocLayout(none=0, write=1, read=2, size_bits=14, dir_bits=2)
# powerpc, mips, sparc and alpha: three direction bits with NONE = 1 (arch/*/uapi/asm/ioctl.h)
THREE_DIR_BIT_IOC = IocLayout(none=1, write=4, read=2, size_bits=13, dir_bits=3)
# parisc keeps the generic widths but swaps READ and WRITE
PARISC_IOC = IocLayout(none=0, write=2, read=1, size_bits=14, dir_bits=2)

_THREE_DIR_BIT_PREFIXES = ("ppc", "powerpc", "mips", "sparc", "alpha")


def ioc_layout(machine: str | None = None) -> IocLayout:
    """The layout for a `platform.machine()` name (this machine's when None)."""
    arch = (platform.machine() if machine is None else machine).lower()
    if arch.startswith(_THREE_DIR_BIT_PREFIXES):
        return THREE_DIR_BIT_IOC
    if arch.startswith("parisc"):
        return PARISC_IOC
    return GENERIC_IOC


def _IOC(direction: int, type_: int, nr: int, size: int, machine: str | None = None) -> int:
    """The kernel's `_IOC()` macro for `machine` (this machine's when None)."""
    layout = ioc_layout(machine)
    fields = (("direction", direction, layout.dir_bits), ("type", type_, layout.type_bits),
              ("nr", nr, layout.nr_bits), ("size", size, layout.size_bits))
    for label, value, bits in fields:
        if not 0 <= value < (1 << bits):
            raise ValueError(f"ioctl {label} {value:#x} does not fit in {bits} bits")
    type_shift = layout.nr_bits
    size_shift = type_shift + layout.type_bits
    dir_shift = size_shift + layout.size_bits
    return (direction << dir_shift) | (size << size_shift) | (type_ << type_shift) | nr


def _IO(type_: int, nr: int, machine: str | None = None) -> int:
    return _IOC(ioc_layout(machine).none, type_, nr, 0, machine)


# op name -> (ioctl nr, the kernel's macro name, struct size). The op names are what
# KernelRefused.op carries.
LUO_IOCTLS: dict[str, tuple[int, str, int]] = {
    "CREATE_SESSION": (0x00, "LIVEUPDATE_IOCTL_CREATE_SESSION", 72),
    "RETRIEVE_SESSION": (0x01, "LIVEUPDATE_IOCTL_RETRIEVE_SESSION", 72),
    "PRESERVE_FD": (0x40, "LIVEUPDATE_SESSION_PRESERVE_FD", 16),
    "RETRIEVE_FD": (0x41, "LIVEUPDATE_SESSION_RETRIEVE_FD", 16),
    "FINISH": (0x42, "LIVEUPDATE_SESSION_FINISH", 8),
    "GET_NAME": (0x43, "LIVEUPDATE_SESSION_GET_NAME", 72),
}
_BY_KERNEL_NAME = {kernel: op for op, (_, kernel, _) in LUO_IOCTLS.items()}


def ioctl_number(name: str, machine: str | None = None) -> int:
    """The request number of a LUO ioctl, by op name (`PRESERVE_FD`) or kernel macro name
    (`LIVEUPDATE_SESSION_PRESERVE_FD`), for `machine` (this machine's when None)."""
    op = _BY_KERNEL_NAME.get(name, name)
    if op not in LUO_IOCTLS:
        known = ", ".join(LUO_IOCTLS)
        raise InvalidArgument(f"unknown LUO ioctl {name!r}; known: {known}")
    return _IO(LIVEUPDATE_IOCTL_TYPE, LUO_IOCTLS[op][0], machine)


def ioctl_numbers(machine: str | None = None) -> dict[str, int]:
    return {op: ioctl_number(op, machine) for op in LUO_IOCTLS}


# --- ioctl argument structs (include/uapi/linux/liveupdate.h) --------------------------------
# Native byte order with standard sizes: the kernel reads these as CPU-native structs, and on the
# two KHO architectures (x86-64, arm64) "=" gives the same bytes as the "<" of
# docs/kernel-abi.md §3.3.

_SESSION = struct.Struct("=Ii64s")   # create_session / retrieve_session: size, fd (out), name
_FD = struct.Struct("=IiQ")          # preserve_fd / retrieve_fd: size, fd, token
_FINISH = struct.Struct("=II")       # size, reserved
_GET_NAME = struct.Struct("=II64s")  # size, reserved, name (out)

SESSION_ARGS_SIZE = _SESSION.size
FD_ARGS_SIZE = _FD.size
FINISH_ARGS_SIZE = _FINISH.size
GET_NAME_ARGS_SIZE = _GET_NAME.size
TOKEN_LIMIT = 1 << 64


@dataclass(frozen=True)
class SessionArgs:
    """`liveupdate_ioctl_create_session` / `liveupdate_ioctl_retrieve_session`."""

    size: int
    fd: int
    name: bytes  # up to the first NUL


@dataclass(frozen=True)
class FdArgs:
    """`liveupdate_session_preserve_fd` / `liveupdate_session_retrieve_fd`."""

    size: int
    fd: int
    token: int


@dataclass(frozen=True)
class FinishArgs:
    size: int
    reserved: int


@dataclass(frozen=True)
class GetNameArgs:
    size: int
    reserved: int
    name: bytes  # up to the first NUL


def _name_field(name: bytes) -> bytes:
    # struct's "64s" would cut a longer name silently; 64 bytes without a NUL is allowed through
    # on purpose (the kernel's EINVAL case), anything longer cannot be expressed at all
    if len(name) > SESSION_NAME_LENGTH:
        raise ValueError(f"session name field holds {SESSION_NAME_LENGTH} bytes, got {len(name)}")
    return name


def _cut(field: bytes) -> bytes:
    end = field.find(b"\0")
    return field if end < 0 else field[:end]


def _check_len(data: bytes | bytearray, expected: int, what: str) -> None:
    if len(data) != expected:
        raise ValueError(f"{what} is {expected} bytes, got {len(data)}")


def pack_create_session(name: bytes, fd: int = -1) -> bytes:
    return _SESSION.pack(SESSION_ARGS_SIZE, fd, _name_field(name))


def unpack_create_session(data: bytes | bytearray) -> SessionArgs:
    _check_len(data, SESSION_ARGS_SIZE, "liveupdate_ioctl_create_session")
    size, fd, name = _SESSION.unpack(data)
    return SessionArgs(size, fd, _cut(name))


pack_retrieve_session = pack_create_session  # the same layout


def unpack_retrieve_session(data: bytes | bytearray) -> SessionArgs:
    _check_len(data, SESSION_ARGS_SIZE, "liveupdate_ioctl_retrieve_session")
    size, fd, name = _SESSION.unpack(data)
    return SessionArgs(size, fd, _cut(name))


def pack_preserve_fd(fd: int, token: int) -> bytes:
    return _FD.pack(FD_ARGS_SIZE, fd, token)


def unpack_preserve_fd(data: bytes | bytearray) -> FdArgs:
    _check_len(data, FD_ARGS_SIZE, "liveupdate_session_preserve_fd")
    return FdArgs(*_FD.unpack(data))


def pack_retrieve_fd(token: int, fd: int = -1) -> bytes:
    return _FD.pack(FD_ARGS_SIZE, fd, token)


def unpack_retrieve_fd(data: bytes | bytearray) -> FdArgs:
    _check_len(data, FD_ARGS_SIZE, "liveupdate_session_retrieve_fd")
    return FdArgs(*_FD.unpack(data))


def pack_finish(reserved: int = 0) -> bytes:
    return _FINISH.pack(FINISH_ARGS_SIZE, reserved)


def unpack_finish(data: bytes | bytearray) -> FinishArgs:
    _check_len(data, FINISH_ARGS_SIZE, "liveupdate_session_finish")
    return FinishArgs(*_FINISH.unpack(data))


def pack_get_name(reserved: int = 0) -> bytes:
    return _GET_NAME.pack(GET_NAME_ARGS_SIZE, reserved, b"")


def unpack_get_name(data: bytes | bytearray) -> GetNameArgs:
    _check_len(data, GET_NAME_ARGS_SIZE, "liveupdate_session_get_name")
    size, reserved, name = _GET_NAME.unpack(data)
    return GetNameArgs(size, reserved, _cut(name))


# --- argument validation (refuse before the kernel would say EINVAL) --------------------------

def validate_session_name(name: str) -> bytes:
    """The UTF-8 bytes of a valid session name: 1..63 bytes, no NUL."""
    if not isinstance(name, str):
        raise InvalidArgument(f"session name must be a string, got {type(name).__name__}")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidArgument(f"session name {name!r:.80} is not valid UTF-8 ({exc.reason}); "
                              "use a plain text name") from exc
    if not raw:
        raise InvalidArgument("session name is empty; give a name of 1 to 63 bytes")
    if b"\0" in raw:
        raise InvalidArgument(f"session name {name!r:.80} contains a NUL byte; the kernel would "
                              "cut it there: remove it")
    limit = SESSION_NAME_LENGTH - 1
    if len(raw) > limit:
        raise InvalidArgument(f"session name {name!r:.80} is {len(raw)} bytes in UTF-8; the kernel "
                              f"allows at most {limit}: shorten it")
    return raw


def validate_token(token: int) -> int:
    if isinstance(token, bool) or not isinstance(token, int):
        raise InvalidArgument(f"token must be an integer, got {type(token).__name__}")
    if not 0 <= token < TOKEN_LIMIT:
        raise InvalidArgument(f"token {token} is outside 0..2**64-1; choose a 64-bit token")
    return token


def _validate_fd(fd: int) -> int:
    if isinstance(fd, bool) or not isinstance(fd, int) or not 0 <= fd < (1 << 31):
        raise InvalidArgument(f"{fd!r} is not a file descriptor number")
    return fd


# --- errno -> advice ---------------------------------------------------------------------------
# Templates may use {path}, {name}, {token}, {fd}, {holders}; see kernel-abi.md §3.1/§3.2.

def _caps(errno_name: str, sessions: bool) -> str:
    """The caps of the LUO versions (their records) that answer `errno_name` at the session or the
    file cap, e.g. "luo-v5: 10000 blocks of 51, 510,000 sessions"."""
    # Imported here, on the error path: the registry imports every format record, which costs
    # every process that loads this module (kho-agentctl, VM managers' AgentClient) ~70 ms.
    from ..abi import registry

    parts = []
    for f in registry.LUO_FORMATS:
        lim = f.limits
        if sessions and lim.sessions_errno == errno_name:
            parts.append(f"{f.compatible}: {lim.sessions_why}, {lim.sessions:,} sessions")
        elif not sessions and lim.files_errno == errno_name:
            parts.append(f"{f.compatible}: {lim.files_why}, {lim.files_per_session:,} files")
    return "; ".join(parts)


_EEXIST_DEFECT = (
    "Kernel defect (7.2/7.3): a refused duplicate CREATE_SESSION can leave an empty session block "
    "that makes the next kernel panic at boot; do not commit a live update until a throwaway "
    "session has been created and closed (that clears it), or reboot cold")

LUO_ADVICE: dict[tuple[str, int], str] = {
    ("open", errno.ENOENT): "no {path}: the kernel lacks CONFIG_LIVEUPDATE or was booted "
                            "without kho=on liveupdate=on",
    ("open", errno.EBUSY): "another live-update agent holds {path}: {holders} (from /proc/*/fd); "
                           "stop it or go through it, the device admits one open file",
    ("open", errno.EIO): "incoming live-update state could not be restored; reboot cleanly (cold "
                         "boot) to reset",
    ("open", errno.EACCES): "no permission to open {path} read-write: run as root",
    ("open", errno.EPERM): "no permission to open {path} read-write: run as root, outside a "
                           "device-restricting cgroup or container",
    ("open", errno.ENXIO): "{path} exists but no live-update driver is behind it (a stale device "
                           "node, or LUO disabled itself at boot: see dmesg)",
    ("open", errno.ENODEV): "{path} exists but no live-update driver is behind it (a stale device "
                            "node, or LUO disabled itself at boot: see dmesg)",
    ("CREATE_SESSION", errno.EEXIST): "an outgoing session {name!r} already exists in this boot: "
                                      "use another name. " + _EEXIST_DEFECT,
    ("CREATE_SESSION", errno.EINVAL): "the kernel rejected the session name {name!r}: it must be "
                                      "1 to 63 bytes with a NUL in the 64-byte field",
    ("CREATE_SESSION", errno.ENOSPC): "the kernel's session list is full "
                                      "({caps_sessions_ENOSPC}, at 4 KiB pages): close unused "
                                      "sessions",
    ("CREATE_SESSION", errno.EMFILE): "this process has no free file descriptor: raise "
                                      "RLIMIT_NOFILE (LimitNOFILE=) or close fds",
    ("CREATE_SESSION", errno.ENOMEM): "the kernel is out of memory for a new session, or its "
                                      "fixed session array is full ({caps_sessions_ENOMEM}): close "
                                      "unused sessions",
    ("RETRIEVE_SESSION", errno.ENOENT): "no incoming session {name!r}: cold boot, rejected "
                                        "handover, or never preserved",
    ("RETRIEVE_SESSION", errno.EINVAL): "incoming session {name!r} is already retrieved and "
                                        "still open (or finishing it on close failed)",
    ("RETRIEVE_SESSION", errno.EMFILE): "this process has no free file descriptor: raise "
                                        "RLIMIT_NOFILE (LimitNOFILE=) or close fds",
    ("RETRIEVE_SESSION", errno.ENOMEM): "the kernel is out of memory",
    ("PRESERVE_FD", errno.ENOENT): "only memfds and unlinked shmem files can be preserved (not "
                                   "hugetlb memfds): fd {fd} is neither",
    ("PRESERVE_FD", errno.EBUSY): "this file is already preserved in a session, or was retrieved "
                                  "in this boot and its incoming session is not finished",
    ("PRESERVE_FD", errno.EEXIST): "token {token} is already used in session {name!r}: tokens "
                                   "must be unique within a session",
    ("PRESERVE_FD", errno.EOPNOTSUPP): "the memfd carries seals this kernel cannot preserve: "
                                       "remove them or leave the memfd unsealed",
    ("PRESERVE_FD", errno.EFBIG): "the file has more than 2^32 pages and cannot be preserved",
    ("PRESERVE_FD", errno.EBADF): "fd {fd} is not an open file in this process",
    ("PRESERVE_FD", errno.ENOMEM): "the kernel could not pin or record the file's pages (out of "
                                   "memory; sparse memfds cost their full size)",
    ("PRESERVE_FD", errno.ENOSPC): "session {name!r} holds the maximum number of files "
                                   "({caps_files_ENOSPC}, at 4 KiB pages): use another session",
    ("PRESERVE_FD", errno.EINVAL): "session {name!r} is an incoming (retrieved) session, which "
                                   "takes no new files: preserve into a session created in this "
                                   "boot; or KEXEC_HANDOVER_DEBUG found the pages overlapping the "
                                   "KHO scratch areas",
    ("PRESERVE_FD", errno.ENODEV): "a file-lifecycle-bound object this file needs is not "
                                   "available in this kernel",
    ("RETRIEVE_FD", errno.ENOENT): "no file with token {token} in session {name!r}, or the "
                                   "session is already finished",
    ("RETRIEVE_FD", errno.EIO): "the preserved contents for token {token} could not be restored "
                                "(a page is missing); every retry gives the same error: the data "
                                "is lost",
    ("RETRIEVE_FD", errno.EINVAL): "the handler could not restore token {token}: its saved state "
                                   "is invalid for this kernel (an ABI mismatch between kernels), "
                                   "or session {name!r} is outgoing",
    ("RETRIEVE_FD", errno.EOPNOTSUPP): "token {token} was saved with features (e.g. seals) this "
                                       "kernel cannot restore",
    ("RETRIEVE_FD", errno.EMFILE): "this process has no free file descriptor: raise "
                                   "RLIMIT_NOFILE (LimitNOFILE=) or close fds",
    ("RETRIEVE_FD", errno.ENOMEM): "the kernel is out of memory",
    ("FINISH", errno.EBUSY): "a file handler refused to finish session {name!r} (a retrieved "
                             "file is still in use); nothing was released: retry later",
    ("FINISH", errno.EINVAL): "session {name!r} is outgoing (created in this boot): only "
                              "retrieved sessions are finished",
    ("GET_NAME", errno.EINVAL): "this kernel has no LIVEUPDATE_SESSION_GET_NAME (it arrived in "
                                "7.2): use the name the session was created or retrieved with",
    ("GET_NAME", errno.ENOTTY): "this kernel has no LIVEUPDATE_SESSION_GET_NAME (it arrived in "
                                "7.2), or the fd is not a LUO session",
}

# Any op: what the common ioctl checks answer (§3.2), and the fallback.
LUO_GENERIC_ADVICE: dict[int, str] = {
    errno.ENOTTY: "the fd is not a live-update device or session, or this kernel does not know "
                  "the ioctl",
    errno.EINVAL: "the kernel rejected the request (an ioctl this kernel does not know, or one "
                  "sent to the wrong kind of fd)",
    errno.E2BIG: "the kernel is older than this agent's view of the ioctl struct",
    errno.EFAULT: "the kernel could not access the argument buffer (an agent bug: report it)",
    errno.EBADF: "the fd is closed",
    errno.ENOMEM: "the kernel is out of memory",
    errno.EPERM: "the kernel does not permit this here",
}
LUO_FALLBACK_ADVICE = "unexpected error from the kernel; see dmesg"


class _Fill(dict[str, object]):
    """Template values; a missing one prints as "?" instead of failing the error path."""

    def __missing__(self, key: str) -> object:
        # {caps_sessions_ENOSPC}, {caps_files_ENOSPC}: the LUO versions' caps for that errno
        what, _, errno_name = key.removeprefix("caps_").partition("_")
        if key.startswith("caps_") and what in ("sessions", "files"):
            return _caps(errno_name, sessions=what == "sessions")
        return "?"


def luo_advice(op: str, err: int, **context: object) -> str:
    """Advice for `op` failing with `err`: the op's own entry, else the common one, else the
    fallback. `context` fills {path}, {name}, {token}, {fd}, {holders}."""
    template = LUO_ADVICE.get((op, err)) or LUO_GENERIC_ADVICE.get(err, LUO_FALLBACK_ADVICE)
    return template.format_map(_Fill(context))


def luo_refused(op: str, err: int, **context: object) -> KernelRefused:
    return KernelRefused(op, err, luo_advice(op, err, **context))


def _errno_of(exc: OSError) -> int:
    # Always set for syscall failures; EIO stands in so a KernelRefused never lacks one.
    return exc.errno if exc.errno is not None else errno.EIO


# --- the real device ---------------------------------------------------------------------------

class RealLiveUpdateSession:
    """A session fd from CREATE_SESSION (outgoing) or RETRIEVE_SESSION (incoming)."""

    def __init__(self, fd: int, name: str, incoming: bool, machine: str | None = None) -> None:
        self._fd = fd
        self._name = name
        self._incoming = incoming
        self._numbers = ioctl_numbers(machine)

    @property
    def name(self) -> str:
        return self._name

    @property
    def incoming(self) -> bool:
        return self._incoming

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def fileno(self) -> int:
        if self._fd < 0:
            raise luo_refused("fileno", errno.EBADF)
        return self._fd

    def _ioctl(self, op: str, buf: bytearray, **context: object) -> None:
        if self._fd < 0:
            raise KernelRefused(op, errno.EBADF,
                                f"session {self._name!r} was already closed by this process")
        try:
            fcntl.ioctl(self._fd, self._numbers[op], buf, True)
        except OSError as exc:
            raise luo_refused(op, _errno_of(exc), name=self._name, **context) from exc

    def preserve_fd(self, fd: int, token: int) -> None:
        _validate_fd(fd)
        validate_token(token)
        self._ioctl("PRESERVE_FD", bytearray(pack_preserve_fd(fd, token)), fd=fd,
                    token=_token_text(token))

    def retrieve_fd(self, token: int) -> int:
        validate_token(token)
        buf = bytearray(pack_retrieve_fd(token))
        self._ioctl("RETRIEVE_FD", buf, token=_token_text(token))
        fd = unpack_retrieve_fd(buf).fd
        if fd < 0:
            raise AbiMismatch(f"RETRIEVE_FD of token {token} succeeded but returned fd {fd}; "
                              "the kernel's uAPI differs from this agent's")
        return fd

    def finish(self) -> None:
        self._ioctl("FINISH", bytearray(pack_finish()))

    def get_name(self) -> str:
        buf = bytearray(pack_get_name())
        self._ioctl("GET_NAME", buf)
        # The kernel does not require UTF-8: keep foreign bytes recoverable rather than fail
        return unpack_get_name(buf).name.decode("utf-8", errors="surrogateescape")

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> RealLiveUpdateSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        side = "incoming" if self._incoming else "outgoing"
        return f"RealLiveUpdateSession({self._name!r}, {side}, fd={self._fd})"


def _token_text(token: int) -> str:
    return f"{token} ({token:#x})"


class RealLiveUpdateDevice:
    """An open `/dev/liveupdate`. Closing it leaves the sessions alone."""

    def __init__(self, fd: int, machine: str | None = None) -> None:
        self._fd = fd
        self._machine = machine
        self._numbers = ioctl_numbers(machine)

    def fileno(self) -> int:
        if self._fd < 0:
            raise luo_refused("fileno", errno.EBADF)
        return self._fd

    def _session_ioctl(self, op: str, name: str) -> int:
        raw = validate_session_name(name)
        if self._fd < 0:
            raise KernelRefused(op, errno.EBADF, "/dev/liveupdate was already closed by this "
                                "process: open it again")
        buf = bytearray(pack_create_session(raw))
        try:
            fcntl.ioctl(self._fd, self._numbers[op], buf, True)
        except OSError as exc:
            raise luo_refused(op, _errno_of(exc), name=name) from exc
        fd = unpack_create_session(buf).fd
        if fd < 0:
            raise AbiMismatch(f"{op} {name!r} succeeded but returned fd {fd}; the kernel's uAPI "
                              "differs from this agent's")
        return fd

    def create_session(self, name: str) -> RealLiveUpdateSession:
        fd = self._session_ioctl("CREATE_SESSION", name)
        return RealLiveUpdateSession(fd, name, incoming=False, machine=self._machine)

    def retrieve_session(self, name: str) -> RealLiveUpdateSession:
        fd = self._session_ioctl("RETRIEVE_SESSION", name)
        return RealLiveUpdateSession(fd, name, incoming=True, machine=self._machine)

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> RealLiveUpdateDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RealLiveUpdate:
    """`<root>/dev/liveupdate` on a real kernel."""

    def __init__(self, root: Path, machine: str | None = None) -> None:
        self.root = root
        self.path = root / DEVICE_PATH
        self._machine = machine

    def present(self) -> bool:
        return os.path.exists(self.path)

    def holder_details(self) -> list[FdHolder]:
        return find_holders(self.path, self.root / "proc")

    def holders(self) -> list[int]:
        return [h.pid for h in self.holder_details()]

    def open(self) -> RealLiveUpdateDevice:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            err = _errno_of(exc)
            holders = describe_holders(self.holder_details()) if err == errno.EBUSY else ""
            raise luo_refused("open", err, path=str(self.path), holders=holders) from exc
        return RealLiveUpdateDevice(fd, self._machine)

    def adopt_session(self, fd: int, name: str) -> RealLiveUpdateSession:
        session = RealLiveUpdateSession(fd, name, incoming=True, machine=self._machine)
        try:
            # GET_NAME proves the fd is a LUO session at all and says which one: a wrong
            # name here means the fd store was filled by someone else
            actual = session.get_name()
        except KernelRefused:
            session.close()
            raise
        if actual != name:
            session.close()
            raise InvalidArgument(f"the session fd stored as {name!r} is the session {actual!r}")
        return session
