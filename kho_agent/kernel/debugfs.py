"""The KHO debugfs tree (`/sys/kernel/debug/kho/{out,in}`), read as plain files.

    out/fdt            root FDT (cold boot only; cut short once subtrees grow it, a 7.2/7.3 defect)
    out/scratch_phys   one "0x%llx" line per scratch area: lowmem, global, one per node
    out/scratch_len
    out/sub_fdts/NAME  each subtree blob, at the size given to kho_add_subtree()
    in/fdt             the root FDT this kernel received (KHO boot only)
    in/sub_fdts/NAME   received blobs (in/sub_fdts/LUO points at a page freed during boot)

debugfs reports size 0 in stat, so every file is read to EOF, never past the bound its format
allows (below). The same layout is accepted from a copy on disk (a snapshot or a test case
directory), so decode and check work offline; there anything can be found where a file is
expected (a FIFO, a device, a directory, a 2 GB sparse file): every file is opened with
kernel/callerfile.py (regular files only, without blocking) and refused with a DebugfsError
whose `kind` is the agent error it amounts to.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

from ..abi.kho_state import MAX_SIZED_BLOB
from ..errors import AgentError, InvalidArgument, NotFound, PermissionDenied, errno_text
from .callerfile import file_kind, open_regular

DEFAULT_DEBUGFS = "/sys/kernel/debug"

# The root FDT is one page: the kernel creates it with fdt_create(root, PAGE_SIZE) and adding a
# subtree that does not fit fails with -ENOMEM (kho_add_subtree(); docs/kernel-abi.md §1.1). The
# largest PAGE_SIZE of an architecture with KHO is 64 KiB (arm64 with 64K pages).
MAX_ROOT_FDT = 64 << 10
# A subtree blob is what its subsystem gave kho_add_subtree(); the decoder refuses a blob-size
# above MAX_SIZED_BLOB (16 MiB) when it reads one from memory, so a debugfs copy of one cannot be
# larger either. The largest real ones are a page (memblock's FDT; LUO's is 32 bytes).
MAX_SUB_BLOB = MAX_SIZED_BLOB
# Each subtree is a node of the one-page root FDT: FDT_BEGIN_NODE, a name padded to 4 bytes, a
# `preserved-data` property (12-byte header + 8-byte value) and FDT_END_NODE take at least 32
# bytes, so at most MAX_ROOT_FDT / 32 subtrees exist.
MAX_SUBTREES = MAX_ROOT_FDT // 32
# What one snapshot may hold in all its subtree blobs together: four of the largest blob the
# decoder takes. Real trees hold a few pages.
MAX_SUB_BLOBS_TOTAL = 4 * MAX_SUB_BLOB
# scratch_phys/scratch_len: one "0x%llx\n" line (at most 2 + 16 + 1 bytes) per scratch area, and
# the areas are lowmem, global and one per NUMA node; MAX_NUMNODES is 1 << NODES_SHIFT, whose
# largest value on x86-64 and arm64 is 10.
SCRATCH_LINE_MAX = len(f"{(1 << 64) - 1:#x}\n")
MAX_SCRATCH_AREAS = 2 + (1 << 10)
MAX_SCRATCH_FILE = MAX_SCRATCH_AREAS * SCRATCH_LINE_MAX
U64_MAX = (1 << 64) - 1


class DebugfsError(Exception):
    """The KHO debugfs tree (or a copy of it) cannot be read; the message says why and what to
    do. `kind` is the agent error it amounts to (NotFound, PermissionDenied, InvalidArgument),
    for callers that report a name and an exit code."""

    def __init__(self, message: str, kind: type[AgentError] = InvalidArgument) -> None:
        super().__init__(message)
        self.kind = kind

    def as_agent_error(self) -> AgentError:
        return self.kind(str(self))


@dataclass
class KhoDebugfsSnapshot:
    path: str
    fdt: bytes | None
    sub_blobs: dict[str, bytes] = field(default_factory=dict)
    scratch_phys: list[int] = field(default_factory=list)
    scratch_len: list[int] = field(default_factory=list)


def _refusal(exc: AgentError, path: str) -> DebugfsError:
    message = exc.message
    if isinstance(exc, PermissionDenied):
        message += "; KHO debugfs files are root-only (0400): run as root"
    elif isinstance(exc, NotFound) and os.path.islink(path):
        message = f"{path} is a symbolic link to nothing ({os.readlink(path)!r})"
    return DebugfsError(message, type(exc))


def read_file(path: str, what: str, limit: int, why: str) -> bytes:
    """A whole regular file of at most `limit` bytes (`why`: the reason for the bound). Size 0
    in stat is read to EOF, as debugfs reports it; a file that grows past `limit` while it is
    read is refused too."""
    try:
        with open_regular(path, what) as opened:
            if opened.size > limit:
                raise DebugfsError(f"{what} {path} has {opened.size} bytes, more than the {limit} "
                                   f"it can have: {why}")
            return opened.read_all(limit, allow_empty=True)
    except AgentError as exc:
        raise _refusal(exc, path) from exc


_FDT_WHY = "the kernel builds the root FDT in one page"
_BLOB_WHY = "the decoder takes no larger subtree blob"
_SCRATCH_WHY = f"one line per scratch area, at most {MAX_SCRATCH_AREAS} areas"


def _optional(path: str, what: str, limit: int, why: str) -> bytes | None:
    """A file that may be absent (None); a dangling symlink in its place is not absence."""
    if not os.path.lexists(path):
        return None
    return read_file(path, what, limit, why)


def read_root_fdt(path: str) -> bytes:
    """A root KHO FDT file (`kho/out/fdt`, `kho/in/fdt`, or a copy of one)."""
    return read_file(path, "the root KHO FDT", MAX_ROOT_FDT, _FDT_WHY)


def _hex_lines(path: str) -> list[int]:
    data = _optional(path, "the scratch list", MAX_SCRATCH_FILE, _SCRATCH_WHY)
    if data is None:
        return []
    lines = data.decode("ascii", errors="replace").split()
    if len(lines) > MAX_SCRATCH_AREAS:
        raise DebugfsError(f"{path} has {len(lines)} lines; the kernel writes one per scratch "
                           f"area, at most {MAX_SCRATCH_AREAS} (lowmem, global, one per NUMA "
                           "node)")
    out = []
    for n, line in enumerate(lines, 1):
        try:
            value = int(line, 16)
        except ValueError as exc:
            raise DebugfsError(f"{path} line {n}: {line[:40]!r} is not a hex number") from exc
        if not 0 <= value <= U64_MAX:
            raise DebugfsError(f"{path} line {n}: {line[:40]!r} does not fit 64 bits")
        out.append(value)
    return out


def _directory(path: str, what: str) -> None:
    """Refuse anything but a directory where one is expected (without opening it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError as exc:
        if os.path.islink(path):
            raise DebugfsError(f"{what} {path} is a symbolic link to nothing", NotFound) from exc
        raise DebugfsError(f"{what} {path} does not exist", NotFound) from exc
    except PermissionError as exc:
        raise DebugfsError(f"{what} {path} cannot be read: permission denied; run as root",
                           PermissionDenied) from exc
    except OSError as exc:
        raise DebugfsError(f"{what} {path} cannot be read: {errno_text(exc)}") from exc
    if not stat.S_ISDIR(st.st_mode):
        kind = "a regular file" if stat.S_ISREG(st.st_mode) else file_kind(st.st_mode)
        raise DebugfsError(f"{what} {path} is {kind}, not a directory")


def read_sub_blobs(path: str, what: str = "the subtree directory") -> dict[str, bytes]:
    """Every file of a `sub_fdts` directory (or one laid out like it), by name. Each entry must
    be a regular file of at most MAX_SUB_BLOB bytes; at most MAX_SUBTREES of them, holding at
    most MAX_SUB_BLOBS_TOTAL bytes together."""
    _directory(path, what)
    names: list[str] = []
    try:
        with os.scandir(path) as entries:
            for entry in entries:
                names.append(entry.name)
                if len(names) > MAX_SUBTREES:
                    raise DebugfsError(f"{what} {path} has more than {MAX_SUBTREES} entries; a "
                                       "one-page root FDT holds no more subtrees")
    except OSError as exc:
        if isinstance(exc, PermissionError):
            raise DebugfsError(f"{what} {path} cannot be listed: permission denied; run as "
                               "root", PermissionDenied) from exc
        raise DebugfsError(f"{what} {path} cannot be listed: {errno_text(exc)}") from exc
    blobs: dict[str, bytes] = {}
    total = 0
    for name in sorted(names):
        try:
            blob = read_file(os.path.join(path, name), "the subtree blob", MAX_SUB_BLOB,
                             _BLOB_WHY)
        except DebugfsError as exc:
            # removed after the listing (a subsystem dropped its subtree meanwhile): the tree
            # is read as it is now, without it
            if exc.kind is NotFound and not os.path.lexists(os.path.join(path, name)):
                continue
            raise
        total += len(blob)
        if total > MAX_SUB_BLOBS_TOTAL:
            raise DebugfsError(f"the subtree blobs in {path} hold more than "
                               f"{MAX_SUB_BLOBS_TOTAL >> 20} MiB together; a KHO state's "
                               "blobs are a few pages")
        blobs[name] = blob
    return blobs


def kho_dir(debugfs: str, side: str) -> str:
    """Locate kho/<side> under a debugfs mount, or raise DebugfsError saying what is missing."""
    if not os.path.isdir(debugfs):
        if os.path.lexists(debugfs):
            _directory(debugfs, "debugfs")  # says what it is instead
        raise DebugfsError(f"{debugfs} does not exist: debugfs is not available on this host",
                           NotFound)
    kho = os.path.join(debugfs, "kho")
    if not os.path.isdir(kho):
        try:
            empty = not os.listdir(debugfs)
        except OSError as exc:
            raise DebugfsError(f"debugfs {debugfs} cannot be listed: {errno_text(exc)}",
                               PermissionDenied if isinstance(exc, PermissionError)
                               else InvalidArgument) from exc
        if empty:
            raise DebugfsError(f"debugfs is not mounted at {debugfs}; mount it with "
                               f"'mount -t debugfs none {debugfs}' and try again", NotFound)
        if os.path.lexists(kho):
            _directory(kho, "the KHO debugfs directory")
        raise DebugfsError(f"{kho} does not exist: KHO is off (boot with kho=on) or the kernel "
                           "lacks CONFIG_KEXEC_HANDOVER_DEBUGFS", NotFound)
    path = os.path.join(kho, side)
    if not os.path.isdir(path):
        if os.path.lexists(path):
            _directory(path, "the KHO debugfs directory")
        if side == "in":
            raise DebugfsError(f"{path} does not exist: this boot did not come through KHO, so "
                               "there is no incoming state", NotFound)
        raise DebugfsError(f"{path} does not exist: KHO did not start on this kernel", NotFound)
    return path


def read_snapshot(path: str) -> KhoDebugfsSnapshot:
    """Read a kho/out or kho/in directory (live or a copy)."""
    _directory(path, "the KHO state directory")
    fdt = _optional(os.path.join(path, "fdt"), "the root KHO FDT", MAX_ROOT_FDT, _FDT_WHY)
    snap = KhoDebugfsSnapshot(path, fdt)
    subs = os.path.join(path, "sub_fdts")
    if os.path.lexists(subs):
        snap.sub_blobs = read_sub_blobs(subs)
    snap.scratch_phys = _hex_lines(os.path.join(path, "scratch_phys"))
    snap.scratch_len = _hex_lines(os.path.join(path, "scratch_len"))
    if len(snap.scratch_phys) != len(snap.scratch_len):
        raise DebugfsError(f"{path}: scratch_phys has {len(snap.scratch_phys)} lines but "
                           f"scratch_len has {len(snap.scratch_len)}")
    return snap
