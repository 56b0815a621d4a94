"""The outgoing KHO/LUO state of a simulated kernel: what it allocated and preserved at boot (the
root FDT, kexec-metadata, luo_ser and FLB page, the memblock FDT), the memfds preserved since, the
preserved-memory map, and the serialization reboot() performs.

Everything is written byte-exact with the decoder's encoders (`kho_agent.abi`), into a
SparseMemory that the simulator exposes as `/proc/kcore` and hands over at the kexec.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..abi import luo as luo_subtree
from ..abi.context import DecodeContext
from ..abi.formats import kexec_metadata_v1 as kexec_metadata
from ..abi.formats import memblock_v1 as memblock
from ..abi.kho_root import encode_root
from ..abi.luo_common import LuoFile, LuoSession, LuoState
from ..abi.memory import PageAllocator, SparseMemory
from ..errors import AgentError, KernelRefused
from .boot import PAGE_SIZE, Memblock
from .boot_record import Baseline, BootState
from .memory import SimAllocator, load_core

MiB = 1 << 20
META_WINDOW = 16 * MiB   # room for the preserved-memory map's own pages (never preserved)
DATA_START = 64 * MiB    # buddy allocations start above the low reservations
BASELINE_CORE = "kernel/baseline.core"


def split_blocks(phys: int, size: int) -> list[tuple[int, int, int]]:
    """kho_preserve_pages(): the largest naturally aligned blocks tiling [phys, phys+size)."""
    out: list[tuple[int, int, int]] = []
    pfn, end = phys // PAGE_SIZE, (phys + size) // PAGE_SIZE
    while pfn < end:
        align_order = (pfn & -pfn).bit_length() - 1 if pfn else 63
        order = min(align_order, (end - pfn).bit_length() - 1, 10)  # MAX_PAGE_ORDER
        out.append((pfn * PAGE_SIZE, PAGE_SIZE << order, order))
        pfn += 1 << order
    return out


def build_baseline(state: BootState, mb: Memblock, memory: SparseMemory) -> None:
    """What the kernel allocates and preserves between fs_initcall and late_initcall: the root
    FDT, kexec-metadata, the LUO blob and FLB page, the memblock FDT (§1.2, §2.2, §2.4)."""
    avoid = [(s.phys, s.size) for s in state.scratch]
    free = [(lo, hi) for lo, hi in mb.free_ranges(avoid) if hi > DATA_START]
    free = [(max(lo, DATA_START), hi) for lo, hi in free]
    meta = next(((-(-lo // META_WINDOW) * META_WINDOW) for lo, hi in free
                 if -(-lo // META_WINDOW) * META_WINDOW + META_WINDOW <= hi), None)
    if meta is None:
        raise AgentError("the simulated memory has no 16 MiB window for the preserved-memory "
                         "map; give more memory_mib")
    ranges: list[tuple[int, int]] = []
    for lo, hi in free:  # carve the meta window out of the data ranges
        for a, b in ((lo, min(hi, meta)), (max(lo, meta + META_WINDOW), hi)):
            if a < b:
                ranges.append((a, b))
    base = Baseline(meta_window=(meta, META_WINDOW), free_ranges=ranges)
    state.baseline = base
    if not state.kho_enabled:
        base.cursor = ranges[0][0] if ranges else 0
        return
    alloc = SimAllocator(ranges, ranges[0][0])
    start = len(alloc.log)
    abi = state.abi
    base.root = alloc.alloc(PAGE_SIZE)
    base.memmap = 0 if abi.memmap_at_finalize else meta
    if abi.has_kexec_metadata:
        blob = kexec_metadata.encode(kexec_metadata.KexecMetadata(
            kexec_metadata.VERSION, state.release, state.kexec_count))
        base.metadata = alloc.alloc(len(blob))
        memory.write(base.metadata, blob)
    if state.luo_enabled:
        luo = LuoState(abi.luo, state.liveupdate_number, 0, 0, sessions_serialized=False)
        blob = abi.luo_format.encode(luo, memory, alloc, serialize_sessions=False)
        base.flb = luo.flbs_phys
        base.luo, base.luo_size = alloc.alloc(len(blob)), len(blob)
        memory.write(base.luo, blob)
    if state.reserve_mem:
        regions = [memblock.ReserveMemRegion(name, memblock.REGION_COMPATIBLE, phys, size)
                   for name, (phys, size) in state.reserve_mem.items()]
        blob = memblock.encode(memblock.MemblockState(abi.memblock, regions))
        base.memblock, base.memblock_size = alloc.alloc(len(blob)), len(blob)
        memory.write(base.memblock, blob)
    base.preserved = [(p, alloc.live[p]) for p in alloc.log[start:]]
    base.preserved += list(state.reserve_mem.values())
    base.cursor = alloc.next
    memory.write(base.root, root_fdt(state, base.memmap))


def subtrees(state: BootState) -> list[tuple[str, int, int | None]]:
    """Root subnodes in kho_add_subtree() order: kexec-metadata (fs_initcall), then LUO and
    memblock (late_initcall)."""
    b = state.baseline
    sized = state.abi.has_blob_size
    out: list[tuple[str, int, int | None]] = []
    if b.metadata:
        out.append((kexec_metadata.SUBTREE_NAME, b.metadata,
                    kexec_metadata.SIZE_V1 if sized else None))
    if b.luo:
        out.append((luo_subtree.SUBTREE_NAME, b.luo, b.luo_size if sized else None))
    if b.memblock:
        out.append((memblock.SUBTREE_NAME, b.memblock, b.memblock_size if sized else None))
    return out


def root_fdt(state: BootState, memmap: int) -> bytes:
    return encode_root(state.abi.kho, memmap, subtrees(state))


def debugfs_fdt_size(state: BootState) -> int:
    """Size of the root FDT when kho_init() created debugfs out/fdt: after kexec-metadata was
    added, before LUO and memblock (late_initcall) grew it."""
    early = [s for s in subtrees(state) if s[0] == kexec_metadata.SUBTREE_NAME]
    return len(encode_root(state.abi.kho, state.baseline.memmap, early))


@dataclass
class PreservedFile:
    token: int
    fd: int                      # the kernel's reference to the file (a dup)
    inode: tuple[int, int]
    size: int
    seals: int                   # as the client had them: what memfd-v2 records
    ser: int                     # memfd_luo_ser address
    data_pages: list[int]        # physical page of each page index
    allocs: list[int]            # allocations to free on unpreserve
    frozen: int = 0              # seals the simulator added to freeze the size (liveupdate.py)


@dataclass
class OutSession:
    name: str
    files: list[PreservedFile] = field(default_factory=list)


@dataclass
class Handover:
    pages: dict[int, bytes]
    root: bytes
    memmap: int
    # (session position, token) -> seals the simulator added at PRESERVE_FD (not in the ABI)
    frozen: dict[tuple[int, int], int] = field(default_factory=dict)


class Outgoing:
    """One process's view of the outgoing state: the baseline of this boot plus the sessions this
    process created (the kernel keeps them while their files are open)."""

    def __init__(self, directory: Path, state: BootState) -> None:
        self.state = state
        self.memory = SparseMemory(PAGE_SIZE)
        core = directory / BASELINE_CORE
        if core.exists():
            load_core(str(core), self.memory)
        b = state.baseline
        self.alloc = SimAllocator(b.free_ranges, b.cursor)
        self.sessions: list[OutSession] = []
        self.empty_block = False  # the 7.2/7.3 duplicate-CREATE_SESSION defect (§1.5)
        self.dirty = True           # /proc/kcore is stale
        self.debugfs_dirty = True   # debugfs kho/out is stale

    # --- preservation --------------------------------------------------------------------------
    def preserve(self, session: OutSession, fd: int, token: int, inode: tuple[int, int],
                 seals: int, frozen: int = 0) -> None:
        """memfd_luo_preserve(): pin every page (holes materialised), allocate the folio array
        and memfd_luo_ser, record them as preserved."""
        dup = os.dup(fd)
        try:
            size = os.fstat(dup).st_size
            content = _read_all(dup, size)
            start = len(self.alloc.log)
            ser = self.state.abi.memfd_format.encode(content, self.memory, self.alloc, size=size,
                                                     pos=os.lseek(dup, 0, os.SEEK_CUR),
                                                     seals=seals)
        except BaseException:
            os.close(dup)
            raise
        allocs = self.alloc.log[start:]
        decoded = self.state.abi.memfd_format.decode(DecodeContext(self.memory), ser, "/")
        pages = [p for phys, length in (decoded.data_runs if decoded else [])
                 for p in range(phys, phys + length, PAGE_SIZE)]
        session.files.append(PreservedFile(token, dup, inode, size, seals, ser, pages, allocs,
                                           frozen))
        self.dirty = self.debugfs_dirty = True

    def unpreserve(self, session: OutSession) -> None:
        for f in session.files:
            for phys in f.allocs:
                self.alloc.free(phys, self.memory)
            os.close(f.fd)
        session.files.clear()
        self.dirty = self.debugfs_dirty = True

    def release_all(self) -> None:
        for s in self.sessions:
            for f in s.files:
                os.close(f.fd)
            s.files.clear()
        self.sessions.clear()

    def preserved(self) -> list[tuple[int, int]]:
        out = list(self.state.baseline.preserved)
        for s in self.sessions:
            for f in s.files:
                out += [(p, self.alloc.live[p]) for p in f.allocs]
        return out

    # --- views ------------------------------------------------------------------------------------
    def encode_map(self, extra: list[tuple[int, int]]) -> tuple[int, SparseMemory]:
        """Write the preserved-memory map for everything preserved; return (root, its pages)."""
        meta = SparseMemory(PAGE_SIZE)
        blocks = [blk for phys, size in self.preserved() + extra
                  for blk in split_blocks(phys, size)]
        start, size = self.state.baseline.meta_window
        meta_alloc = PageAllocator(start, PAGE_SIZE)
        root = self.state.abi.kho_format.encode_memmap(blocks, meta, meta_alloc,
                                                        PAGE_SIZE.bit_length() - 1)
        if meta_alloc.next > start + size:
            raise AgentError("the preserved-memory map outgrew the simulator's 16 MiB map "
                             "window; preserve less or create the simulation with more memory")
        return root, meta

    def live_map(self) -> tuple[int, SparseMemory]:
        """The map as it stands before reboot: live from boot (the radix tree), or none until
        finalize (the memmap_at_finalize quirk)."""
        if self.state.abi.memmap_at_finalize:
            return 0, SparseMemory(PAGE_SIZE)
        return self.encode_map([])

    def sub_blobs(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for name, phys, size in subtrees(self.state):
            if size is None:  # a root without blob-size: an FDT, as long as its header says
                size = int.from_bytes(self.memory.read(phys + 4, 4), "big")
            out[name] = self.memory.read(phys, size)
        return out

    # --- reboot -----------------------------------------------------------------------------------
    def check_freeze(self) -> None:
        """memfd freeze() fails only on an internal inconsistency (EINVAL). A real preserved memfd
        cannot change size (EPERM). The simulator freezes a preserved memfd with seals when it
        can (liveupdate.py); one it could not seal (no MFD_ALLOW_SEALING, F_SEAL_SEAL already
        set, an unlinked tmpfs file) can change size, and that is the inconsistency found
        here: the reboot fails and the sessions stay preserved, where a real kernel would have
        refused the resize itself."""
        for s in self.sessions:
            for f in s.files:
                now = os.fstat(f.fd).st_size
                if now != f.size:
                    raise KernelRefused(
                        "reboot", errno.EINVAL,
                        f"memfd token {f.token:#x} of session {s.name!r} changed size from "
                        f"{f.size} to {now} bytes after PRESERVE_FD (a real kernel refuses that "
                        "with EPERM); restore its size, or close the session and preserve the "
                        "file again, then retry")

    def serialize(self) -> Handover:
        """liveupdate_reboot(): freeze every file (refresh its pages, record f_pos), write sessions
        and files, then the map and the root FDT. check_freeze() must have passed."""
        abi = self.state.abi
        ps = PAGE_SIZE
        for s in self.sessions:
            for f in s.files:
                content = _read_all(f.fd, f.size)
                for index, page in enumerate(f.data_pages):
                    self.memory.write(page, content[index * ps:(index + 1) * ps].ljust(ps, b"\0"))
                self.memory.write(f.ser, struct.pack("<Q", os.lseek(f.fd, 0, os.SEEK_CUR)))
        b = self.state.baseline
        extra: list[tuple[int, int]] = []
        if b.luo:
            luo = LuoState(abi.luo, self.state.liveupdate_number, 0, b.flb,
                           sessions_serialized=True)
            for s in self.sessions:
                files = [LuoFile(i, abi.memfd, f.token, f.ser) for i, f in enumerate(s.files)]
                luo.sessions.append(LuoSession(s.name, len(files), 0, files))
            start = len(self.alloc.log)
            blob = abi.luo_format.encode(luo, self.memory, self.alloc, serialize_sessions=True)
            if abi.luo_blocks and self.empty_block and luo.sessions_phys:
                self._append_empty_block(luo.sessions_phys)
            if len(blob) != b.luo_size:
                raise AgentError(f"internal: the LUO blob changed size ({b.luo_size} -> "
                                 f"{len(blob)}) while serializing")
            self.memory.write(b.luo, blob)
            extra = [(p, self.alloc.live[p]) for p in self.alloc.log[start:]]
        memmap, meta = self.encode_map(extra) if (extra or abi.memmap_at_finalize) \
            else self.live_map()
        root = root_fdt(self.state, memmap)
        self.memory.write(b.root, root)
        pages = dict(self.memory.pages())
        pages.update(meta.pages())
        frozen = {(index, f.token): f.frozen for index, s in enumerate(self.sessions)
                  for f in s.files if f.frozen}
        return Handover(pages, root, memmap, frozen)

    def _append_empty_block(self, first: int) -> None:
        """luo_session_insert() grew the chain before the duplicate-name check and did not
        shrink it: an empty block (count 0) stays linked at the end."""
        phys = first
        while True:
            nxt = struct.unpack("<Q", self.memory.read(phys, 8))[0]
            if nxt == 0:
                break
            phys = nxt
        empty = self.alloc.alloc(PAGE_SIZE)
        self.memory.write(empty, bytes(PAGE_SIZE))
        self.memory.write(phys, struct.pack("<Q", empty))


def _read_all(fd: int, size: int) -> bytes:
    """The file's bytes, zero-filled past EOF up to `size` (holes read as zeros)."""
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, min(size - len(out), 1 << 24), len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out.ljust(size, b"\0"))
