"""Build synthetic KHO states with the encoders, the way a kernel of each era lays them out.

Everything a subsystem preserves is allocated from `Synth.alloc`, which records it; the
preserved-memory map is written last, from those records, with pages from a separate allocator
(the kernel does not preserve the map's own pages either). `finish()` returns the KhoInput that
decode_state() reads.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from kho_agent.abi import registry
from kho_agent.abi.context import Side
from kho_agent.abi.extents import Extent, ExtentMap
from kho_agent.abi.formats import kexec_metadata_v1 as kexec_metadata
from kho_agent.abi.formats import luo_v1, luo_v5
from kho_agent.abi.formats import memblock_v1 as memblock
from kho_agent.abi.formats.records import LuoVersion
from kho_agent.abi.kho_root import encode_root
from kho_agent.abi.kho_state import KhoInput, KhoState, ScratchArea
from kho_agent.abi.luo_common import SESSION_SER_SIZE, LuoFile, LuoSession, LuoState
from kho_agent.abi.memmap_chunks import BITMAP_512_BYTES, encode_chunks
from kho_agent.abi.memory import PageAllocator, SparseMemory
from kho_agent.abi.radix import RadixGeometry, radix_encode

DATA_START = 0x1000_0000  # preserved allocations
META_START = 0x6000_0000  # preserved-memory map pages (chunks, bitmaps, radix nodes)


class TrackingAllocator(PageAllocator):
    """A PageAllocator that remembers every allocation as preserved memory."""

    def __init__(self, start: int, page_size: int) -> None:
        super().__init__(start, page_size)
        self.preserved: list[tuple[int, int]] = []  # (phys, bytes), whole pages

    def alloc(self, nbytes: int = 0, *, align: int | None = None) -> int:
        phys = super().alloc(nbytes, align=align)
        self.preserved.append((phys, self.next - phys))
        return phys


def split_blocks(phys: int, size: int, page_shift: int) -> list[tuple[int, int, int]]:
    """kho_preserve_pages(): the largest naturally aligned blocks that tile [phys, phys+size)."""
    out: list[tuple[int, int, int]] = []
    pfn, end = phys >> page_shift, (phys + size) >> page_shift
    while pfn < end:
        order = min((pfn & -pfn).bit_length() - 1 if pfn else 63, (end - pfn).bit_length() - 1)
        out.append((pfn << page_shift, 1 << (page_shift + order), order))
        pfn += 1 << order
    return out


def block_set(extents: ExtentMap | list[Extent] | list[tuple[int, int, int]],
              page_shift: int = 12) -> set[tuple[int, int]]:
    """Every (phys, order) block the extents describe: compare maps independent of coalescing."""
    out: set[tuple[int, int]] = set()
    for item in extents:
        phys, size, order = ((item.phys, item.size, item.order) if isinstance(item, Extent)
                             else item)
        block = 1 << (page_shift + order)
        out.update((phys + i * block, order) for i in range(size // block))
    return out


@dataclass
class Synth:
    page_shift: int = 12
    memory: SparseMemory = field(init=False)
    alloc: TrackingAllocator = field(init=False)
    meta_alloc: PageAllocator = field(init=False)
    subtrees: list[tuple[str, int, int | None]] = field(default_factory=list)
    unpreserved: set[int] = field(default_factory=set)  # allocations to leave out of the map

    def __post_init__(self) -> None:
        ps = 1 << self.page_shift
        self.memory = SparseMemory(ps)
        self.alloc = TrackingAllocator(DATA_START, ps)
        self.meta_alloc = PageAllocator(META_START, ps)

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    def place(self, name: str, blob: bytes, *, sized: bool = True,
              preserved: bool = True) -> int:
        """Put a subtree blob in its own pages and list it in the root (with blob-size when
        `sized`)."""
        phys = self.alloc.alloc(len(blob))
        self.memory.write(phys, blob)
        if not preserved:
            self.unpreserved.add(phys)
        self.subtrees.append((name, phys, len(blob) if sized else None))
        return phys

    def blocks(self) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        for phys, size in self.alloc.preserved:
            if phys not in self.unpreserved:
                out.extend(split_blocks(phys, size, self.page_shift))
        return out

    def write_map(self, memmap: str) -> int:
        blocks = self.blocks()
        if memmap.startswith("chunks"):  # "chunks": page-sized bitmaps, as 6.19 .. 7.0 wrote
            return encode_chunks(blocks, self.memory, self.meta_alloc, page_shift=self.page_shift,
                                 bitmap_bytes=BITMAP_512_BYTES if memmap == "chunks-512" else None)
        geom = RadixGeometry(self.page_shift, depth_plus_one=memmap == "radix")
        return radix_encode(blocks, self.memory, self.meta_alloc, geom)

    def finish(self, compatible: str, memmap: str, *, scratch: list[ScratchArea] | None = None,
               side: Side = Side.OUT) -> KhoInput:
        root = encode_root(compatible, self.write_map(memmap), self.subtrees)
        return KhoInput(root_fdt=root, scratch=scratch or [], memory=self.memory, side=side,
                        page_shift=self.page_shift)

    # --- subsystem helpers --------------------------------------------------------------------
    def memfd_file(self, compatible: str, token: int, content: bytes, *, size: int | None = None,
                   pos: int = 0, seals: int = 0x1) -> LuoFile:
        data = registry.encode_memfd(compatible, content, self.memory, self.alloc, size=size,
                                     pos=pos, seals=seals)
        return LuoFile(0, compatible, token, data)

    def luo(self, fmt: LuoVersion, sessions: dict[str, list[LuoFile]], *, number: int = 3,
            sized: bool = True) -> LuoState:
        """A LUO subtree of any version, with every session serialized."""
        state = luo_state(fmt.compatible, number, sessions)
        self.place("LUO", fmt.encode(state, self.memory, self.alloc), sized=sized)
        return state

    def luo_v1(self, sessions: dict[str, list[LuoFile]], *, number: int = 3,
               sized: bool = True) -> LuoState:
        state = luo_state(luo_v1.COMPATIBLE, number, sessions)
        self.place("LUO", luo_v1.encode(state, self.memory, self.alloc), sized=sized)
        return state

    def luo_v5(self, sessions: dict[str, list[LuoFile]] | list[tuple[str, list[LuoFile]]], *,
               number: int = 3, serialize: bool = True) -> LuoState:
        state = luo_state(luo_v5.COMPATIBLE, number, sessions)
        self.place("LUO", luo_v5.encode(state, self.memory, self.alloc,
                                        serialize_sessions=serialize))
        return state

    def memblock(self, regions: dict[str, int], *, align: int | None = None,
                 sized: bool = True) -> memblock.MemblockState:
        """reserve_mem regions of the given sizes (reserve_mem=size:align:name), allocated and
        preserved here."""
        state = memblock.MemblockState(memblock.COMPATIBLE, [
            memblock.ReserveMemRegion(name, memblock.REGION_COMPATIBLE,
                                      self.alloc.alloc(size, align=align), size)
            for name, size in regions.items()])
        self.place(memblock.SUBTREE_NAME, memblock.encode(state), sized=sized)
        return state

    def kexec_metadata(self, release: str, count: int, *, sized: bool = True) -> None:
        meta = kexec_metadata.KexecMetadata(kexec_metadata.VERSION, release, count)
        self.place(kexec_metadata.SUBTREE_NAME, kexec_metadata.encode(meta), sized=sized)

    def write_u64(self, phys: int, value: int) -> None:
        self.memory.write(phys, struct.pack("<Q", value))

    def session_entry(self, state: LuoState, index: int) -> int:
        """Address of session `index` in a luo-v5 session chain's first block."""
        return state.sessions_phys + 16 + index * SESSION_SER_SIZE


def luo_state(compatible: str, number: int,
              sessions: dict[str, list[LuoFile]] | list[tuple[str, list[LuoFile]]]) -> LuoState:
    items = list(sessions.items()) if isinstance(sessions, dict) else sessions
    state = LuoState(compatible, number, 0, 0, sessions_serialized=True)
    for name, files in items:
        for i, f in enumerate(files):
            f.index = i
        state.sessions.append(LuoSession(name, len(files), 0, list(files)))
    return state


def subtree_record(state: KhoState, name: str) -> object | None:
    for sub in state.subtrees:
        if sub.name == name:
            return sub.decoded
    raise KeyError(name)


def codes(state: KhoState) -> list[tuple[str, str, str]]:
    """(code, severity, path) of every finding, for exact assertions."""
    return [(f.code, f.severity.value, f.path) for f in state.findings]
