"""The handover between two simulated kernels, in the directory of the boot it was handed to
(written while that boot is built, boots.py):

    handover/memory.core   physical memory at the kexec (ELF core, /proc/kcore layout)
    handover/fdt           the root KHO FDT (its page is also in memory.core)
    handover/scratch.bin   the kho_scratch[] array (16 bytes per area), the kexec segment
    handover/info.json     who handed over (release, boot id), for messages only
    handover/sim-freeze.json
                           the simulator's own note, no kernel structure: the seals it added
                           to preserved memfds to freeze their size (liveupdate.py), which
                           the restored files get again

The next kernel reads it with the decoder (`kho_agent.abi`) and applies the kernel's rules
(docs/kernel-abi.md §1.1, §2.2, §2.4, §3.9): an unknown KHO root drops the handover, a LUO blob
it cannot take panics it, a broken file chain fails /dev/liveupdate with EIO at the first open.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..abi import luo
from ..abi.context import DecodeContext, Side, cstr
from ..abi.errors import AbiError, MemoryUnavailable
from ..abi.fdt import FDT_MAGIC, parse_fdt
from ..abi.findings import Severity
from ..abi.formats import kexec_metadata_v1 as kexec_metadata
from ..abi.formats import memblock_v1 as memblock
from ..abi.kho_root import KhoRoot, decode_root
from ..abi.luo_common import LuoState
from ..abi.memfd import ALL_SEALS, MemfdState
from ..abi.memory import PhysicalMemory
from ..errors import StateCorrupt
from ..kernel.physmem import ElfCoreMemory, write_elf_core
from .boot import PAGE_SIZE, Cmdline, Scratch
from .outgoing import Handover
from .store import crash_point, remove_tree, write_atomic, write_new
from .versions import SimAbi

HANDOVER_DIR = "handover"
FREEZE_FILE = "sim-freeze.json"
# What the page of the freed luo_ser held in the captured 7.3 run: page-cache data of /init.
FREED_PAGE = (b"#!/bin/busybox sh\nmount -t proc proc /proc\nmount -t debugfs none "
              b"/sys/kernel/debug\n").ljust(PAGE_SIZE, b"\n")


def write_handover(directory: Path, ho: Handover, scratch: list[Scratch],
                   info: dict[str, object]) -> None:
    """Into `directory`, the next boot being built."""
    path = directory / HANDOVER_DIR
    crash_point()
    path.mkdir(parents=True)
    write_elf_core(str(path / "memory.core"), sorted(ho.pages.items()))
    write_new(path / "fdt", ho.root)
    write_new(path / "scratch.bin", b"".join(struct.pack("<QQ", s.phys, s.size)
                                             for s in scratch))
    write_new(path / "info.json", json.dumps(info, indent=1).encode())
    write_new(path / FREEZE_FILE, json.dumps(
        [[index, token, seals] for (index, token), seals in sorted(ho.frozen.items())]).encode())


def clear_handover(directory: Path) -> None:
    remove_tree(directory / HANDOVER_DIR)


def read_freeze(directory: Path) -> dict[tuple[int, int], int]:
    """(session position in the chain, token) -> the seals the simulator added at PRESERVE_FD
    (none when the note is missing)."""
    try:
        raw = json.loads((directory / HANDOVER_DIR / FREEZE_FILE).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise StateCorrupt(f"{directory / HANDOVER_DIR / FREEZE_FILE} cannot be read ({exc})")\
            from exc
    return {(int(index), int(token)): int(seals) for index, token, seals in raw}


@dataclass
class Received:
    root: KhoRoot
    root_blob: bytes
    memory_path: str
    scratch: list[Scratch]
    info: dict[str, object]


def read_handover(directory: Path) -> Received | str | None:
    """The handover as the next kernel finds it; a string says why it is unusable."""
    path = directory / HANDOVER_DIR
    if not (path / "fdt").exists():
        return None
    blob = (path / "fdt").read_bytes()
    try:
        root = decode_root(blob)
    except AbiError as exc:
        return f"handover FDT is not a valid FDT: {exc}"
    raw = (path / "scratch.bin").read_bytes()
    scratch = [Scratch(*struct.unpack_from("<QQ", raw, i)) for i in range(0, len(raw), 16)]
    info = json.loads((path / "info.json").read_text())
    return Received(root, blob, str(path / "memory.core"), scratch, info)


def _subtree(root: KhoRoot, name: str) -> tuple[int, int | None] | None:
    for sub in root.subtrees:
        if sub.name == name and sub.phys:
            return sub.phys, sub.size
    return None


def _blob(mem: ElfCoreMemory, phys: int, size: int | None) -> bytes:
    if size is None:  # a root without blob-size: an FDT whose header gives its size
        head = mem.read(phys, 8)
        size = int.from_bytes(head[4:8], "big") if int.from_bytes(head[:4], "big") == FDT_MAGIC \
            else PAGE_SIZE
    return mem.read(phys, size)


@dataclass
class Accepted:
    """What a kernel that accepted the handover takes from it at boot."""

    scratch: list[Scratch]
    preserved: list[tuple[int, int]]
    revived: dict[str, int] = field(default_factory=dict)
    previous_release: str | None = None
    kexec_count: int = 0
    luo_number: int | None = None      # the incoming liveupdate number, if LUO took the state
    pages: dict[int, bytes] = field(default_factory=dict)  # memory still reserved after boot
    in_blobs: dict[str, bytes] = field(default_factory=dict)  # debugfs kho/in/sub_fdts
    notes: list[str] = field(default_factory=list)


@dataclass
class Refused:
    """KHO revival disabled: the kernel boots as after a cold boot."""

    notes: list[str]


@dataclass
class Panic:
    message: str


def accept(rec: Received, abi: SimAbi, cmd: Cmdline, *, luo_mismatch: bool) -> (
        Accepted | Refused | Panic):
    """kho_populate(), kho_memory_init(), luo_early_startup(), reserve_mem revive and the
    kexec-metadata read of the next kernel."""
    root = rec.root
    if root.compatible != abi.kho:
        return Refused([f"KHO: setup: handover FDT is incompatible with '{abi.kho}' (it is "
                        f"'{root.compatible}')", "KHO: disabling KHO revival"])
    fmt = abi.kho_format  # the root's compatible is this kernel's own
    if not root.memmap_phys:
        return Refused(["KHO: setup: handover FDT has no preserved-memory-map",
                        "KHO: disabling KHO revival"])
    with ElfCoreMemory(rec.memory_path) as mem:
        walk = fmt.walk_memmap(mem, root.memmap_phys, PAGE_SIZE.bit_length() - 1)
        if walk.issues or walk.missing_pages:
            return Refused(["KHO: failed to walk the preserved-memory map",
                            "KHO: disabling KHO revival"])
        starts, ends = walk.extents.union()
        acc = Accepted(rec.scratch, [(s, e - s) for s, e in zip(starts, ends, strict=True)],
                       notes=["KHO: found kexec handover data."])
        for phys, size in acc.preserved:
            for page in range(phys, phys + size, PAGE_SIZE):
                try:
                    acc.pages[page] = mem.read(page, PAGE_SIZE)
                except MemoryUnavailable:
                    continue
        for sub in root.subtrees:
            if sub.phys and (sub.size is not None or not abi.has_blob_size):
                try:
                    acc.in_blobs[sub.name] = _blob(mem, sub.phys, sub.size)
                except MemoryUnavailable:
                    continue
        _metadata(acc, abi)
        _memblock(acc, abi, cmd)
        if not cmd.kho:
            acc.notes.append("liveupdate: Disabling liveupdate because KHO is disabled")
            return acc
        where = _subtree(root, luo.SUBTREE_NAME)
        if where is None:
            return acc
        blob = _blob(mem, *where)
        panic = _luo_early(acc, mem, blob, abi, luo_mismatch)
        if panic is not None:
            return panic
        # luo_early_startup() frees the luo_ser page right away; debugfs still shows it
        page = where[0] // PAGE_SIZE * PAGE_SIZE
        acc.pages[page] = FREED_PAGE
        acc.in_blobs[luo.SUBTREE_NAME] = FREED_PAGE[where[0] - page:][:len(blob)]
    return acc


def _metadata(acc: Accepted, abi: SimAbi) -> None:
    blob = acc.in_blobs.get(kexec_metadata.SUBTREE_NAME)
    if blob is None or not abi.has_kexec_metadata:
        return
    ctx = DecodeContext(None, Side.IN)
    meta = kexec_metadata.decode(blob, ctx, "/kexec-metadata")
    if meta is None or meta.previous_release is None or ctx.findings:
        acc.notes.append("KHO: ignoring invalid kexec metadata")
        return
    acc.previous_release = meta.previous_release
    acc.kexec_count = meta.kexec_count or 0
    acc.notes.append(f"KHO: exec from: {meta.previous_release} (count {acc.kexec_count})")


def _memblock(acc: Accepted, abi: SimAbi, cmd: Cmdline) -> None:
    blob = acc.in_blobs.get(memblock.SUBTREE_NAME)
    if blob is None:
        return
    state = memblock.decode(blob, DecodeContext(None, Side.IN), "/memblock")
    if state is None or state.compatible != abi.memblock:
        return
    old = {r.name: r for r in state.regions if r.compatible == memblock.REGION_COMPATIBLE}
    for want in cmd.reserve_mem:
        have = old.get(want.name)
        if have is not None and have.start is not None and have.size == want.size \
                and have.start % want.align == 0:
            acc.revived[want.name] = have.start
            acc.notes.append(f"Revived memory reservation '{want.name}' from KHO")


def _luo_early(acc: Accepted, mem: ElfCoreMemory, blob: bytes, abi: SimAbi,
               forced_mismatch: bool) -> Panic | None:
    """luo_early_startup(): any problem with the LUO blob or the session chain panics."""
    def fail(why: str) -> Panic:
        return Panic(f"{why}\nKernel panic - not syncing: The incoming tree failed to "
                     "initialize properly [-EINVAL], disabling live update")
    is_fdt = len(blob) >= 4 and int.from_bytes(blob[:4], "big") == FDT_MAGIC
    if is_fdt:
        try:
            tree = parse_fdt(blob)
        except AbiError as exc:
            return fail(f"luo: the LUO FDT is malformed: {exc}")
        compat = (tree.root.prop("compatible") or b"").split(b"\0")[0].decode(
            "ascii", "backslashreplace")
    else:
        compat = cstr(blob[:luo.MAX_COMPAT_LEN])[0]
    if forced_mismatch or compat != abi.luo:
        return fail(f"luo: incoming LUO state is '{compat}', this kernel speaks "
                    f"'{'another version' if forced_mismatch else abi.luo}'")
    early = abi.luo_format.early_startup(blob, DecodeContext(mem, Side.IN))
    if isinstance(early, str):
        return fail(early)
    num = early
    acc.luo_number = num
    acc.notes.append(f"luo: Retrieved live update data, liveupdate number: {num}")
    return None


# --- the first open of /dev/liveupdate: deserialize the incoming sessions ---------------------

@dataclass
class IncomingFile:
    token: int
    compatible: str
    memfd: MemfdState | None
    frozen: int = 0       # seals the simulator added to freeze the size (FREEZE_FILE)


@dataclass
class IncomingSession:
    name: str
    files: list[IncomingFile]


def deserialize(directory: Path, abi: SimAbi) -> list[IncomingSession] | str:
    """luo_session_deserialize(): the sessions, or why the first open fails with EIO."""
    rec = read_handover(directory)
    if not isinstance(rec, Received):
        return "the handover is gone from the simulator directory"
    where = _subtree(rec.root, luo.SUBTREE_NAME)
    if where is None:
        return []
    with ElfCoreMemory(rec.memory_path) as mem:
        ctx = DecodeContext(mem, Side.IN)
        state = luo.decode(_blob(mem, *where), ctx, "/LUO")
    errors = [f"{f.path}: {f.message}" for f in ctx.findings if f.severity is Severity.ERROR]
    if not isinstance(state, LuoState):
        return "; ".join(errors) or "the incoming LUO state cannot be decoded"
    frozen = read_freeze(directory)
    sessions: list[IncomingSession] = []
    for index, s in enumerate(state.sessions):
        files = []
        for f in s.files:
            if f.compatible != abi.memfd:
                errors.append(f"session {s.name!r} token {f.token:#x}: no file handler for "
                              f"{f.compatible!r} (this kernel has {abi.memfd})")
            handler = f.handler if isinstance(f.handler, MemfdState) else None
            files.append(IncomingFile(f.token, f.compatible, handler,
                                      frozen.get((index, f.token), 0)))
        sessions.append(IncomingSession(s.name, files))
    if errors:
        return "; ".join(errors)
    return sessions


def handover_memory(directory: Path) -> ElfCoreMemory | None:
    """The memory image the last kexec handed over, or None when it is gone."""
    path = directory / HANDOVER_DIR / "memory.core"
    try:
        return ElfCoreMemory(str(path))
    except FileNotFoundError:
        return None


def restore_content(memory: PhysicalMemory | None, state: MemfdState) -> bytes | str:
    """memfd_luo_retrieve()'s data from the handed-over memory: the file's bytes, or why the
    folios cannot be restored. Only the memory image is needed: the root FDT was checked at boot
    (and parsing it again for each of thousands of files made retrieval the slowest part of a
    verify)."""
    if state.seals is not None and state.seals & ~ALL_SEALS:
        return "EOPNOTSUPP"
    if not state.complete or memory is None:
        return "EIO"
    out = bytearray()
    for phys, length in state.data_runs:
        try:
            out += memory.read(phys, length)
        except MemoryUnavailable:
            return "EIO"
    if len(out) < state.size:
        return "EIO"
    return bytes(out[:state.size])


def save_info(directory: Path, name: str, data: dict[str, object]) -> None:
    write_atomic(directory / name, json.dumps(data, indent=1).encode())
