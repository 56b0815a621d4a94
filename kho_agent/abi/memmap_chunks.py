"""Chunk-list preserved-memory map (`kho-v1`, 6.16 .. 7.0; kernel/kexec_handover.c).

`preserved-memory-map` points at the first of a linked list of one-page chunks:

    struct khoser_mem_chunk_hdr { u64 next; u32 order; u32 num_elms; };            // 16 bytes
    struct khoser_mem_bitmap_ptr { u64 phys_start; u64 bitmap; };                  // 16 bytes
    struct khoser_mem_chunk { hdr; struct khoser_mem_bitmap_ptr bitmaps[(PAGE_SIZE - 16) / 16]; };

Every entry of a chunk describes blocks of the chunk's `order`: bit b of the bitmap at `bitmap`
set means the order-o block at `phys_start + (b << (PAGE_SHIFT + o))` is preserved, where
`phys_start = (xarray_index * PRESERVE_BITS) << (o + PAGE_SHIFT)`.

The bitmap size changed under the same compatible string: 512 bytes (PRESERVE_BITS = 4096,
kmalloc'd, so 512-byte aligned) in 6.16, one page (PRESERVE_BITS = PAGE_SIZE * 8) by 6.19.
"chunks-512" and "chunks-page" walk one variant; "chunks" tells them apart from the pointers.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from .errors import AbiError, MemoryUnavailable
from .extents import Extent, ExtentMap
from .memmap import MapIssue, MemoryMapWalk
from .memory import PageAllocator, PhysicalMemory, SparseMemory
from .radix import _bit_runs

HEADER_SIZE = 16
ENTRY_SIZE = 16
BITMAP_512_BYTES = 512  # 6.16: struct kho_mem_phys_bits { DECLARE_BITMAP(preserve, 512 * 8); }
# A bound on the chain for corrupt input: 2^20 chunks of 255 entries name 255M bitmaps, which
# even with 512-byte bitmaps (16 MiB of order-0 pages each) span 4 PiB. No real map comes close.
MAX_CHUNKS = 1 << 20
FORMAT_512 = "chunks-512"
FORMAT_PAGE = "chunks-page"


def capacity(page_size: int = 4096) -> int:
    """Entries per chunk: KHOSER_BITMAP_SIZE, 255 at 4 KiB pages."""
    return (page_size - HEADER_SIZE) // ENTRY_SIZE


@dataclass(frozen=True)
class ChunkEntry:
    phys_start: int
    bitmap: int


@dataclass
class MemChunk:
    phys: int
    order: int
    num_elms: int
    entries: list[ChunkEntry] = field(default_factory=list)


@dataclass
class ChunkChain:
    """The chunk pages as read, before any bitmap is looked at."""
    chunks: list[MemChunk] = field(default_factory=list)
    issues: list[MapIssue] = field(default_factory=list)
    missing_pages: list[int] = field(default_factory=list)


def _order_usable(order: int, page_shift: int) -> bool:
    # Block sizes of 2^64 bytes or more cannot be addressed; the kernel would shift garbage.
    return page_shift + order < 64


def read_chain(memory: PhysicalMemory, root: int, page_shift: int = 12, *,
               max_chunks: int | None = None) -> ChunkChain:
    """Follow `next` from `root`, collecting every chunk's header and entries.

    A cycle, an overlong chain, a misaligned `next` or a page the memory source lacks ends the
    chain (as an issue or a missing page); `num_elms` above capacity is reported and clamped.
    """
    ps = 1 << page_shift
    if root == 0 or root % ps:
        raise AbiError(f"kho-v1 memory map root {root:#x} is not a page-aligned physical address")
    cap = capacity(ps)
    max_chunks = MAX_CHUNKS if max_chunks is None else max_chunks  # read now: tests patch it
    chain = ChunkChain()
    seen: set[int] = set()
    phys = root
    while phys:
        if phys in seen:
            chain.issues.append(MapIssue("chain-cycle", phys, f"khoser_mem_chunk list loops back "
                                         f"to {phys:#x}; the next kernel would walk it forever"))
            break
        if len(seen) >= max_chunks:
            chain.issues.append(MapIssue("chain-too-long", phys, f"khoser_mem_chunk list is "
                                         f"longer than {max_chunks} chunks"))
            break
        if phys % ps:
            chain.issues.append(MapIssue("misaligned", phys, f"khoser_mem_chunk pointer "
                                         f"{phys:#x} is not page aligned"))
            break
        seen.add(phys)
        try:
            page = memory.read(phys, ps)
        except MemoryUnavailable:
            chain.missing_pages.append(phys)
            break
        nxt, order, num_elms = struct.unpack_from("<QII", page, 0)
        chunk = MemChunk(phys, order, num_elms)
        chain.chunks.append(chunk)
        count = num_elms
        if num_elms > cap:
            chain.issues.append(MapIssue(
                "block-count-invalid", phys,
                f"khoser_mem_chunk {phys:#x} has num_elms {num_elms}, capacity is {cap}; the next "
                "kernel would read bitmap pointers from beyond the chunk page"))
            count = cap
        if not _order_usable(order, page_shift):
            chain.issues.append(MapIssue("property-malformed", phys, f"khoser_mem_chunk "
                                         f"{phys:#x} has impossible order {order}"))
            count = 0
        for i in range(count):
            start, bitmap = struct.unpack_from("<QQ", page, HEADER_SIZE + i * ENTRY_SIZE)
            chunk.entries.append(ChunkEntry(start, bitmap))
        phys = nxt
    return chain


def _span(bitmap_bytes: int, order: int, page_shift: int) -> int:
    """Bytes of physical address space one bitmap covers at `order`."""
    return (bitmap_bytes * 8) << (page_shift + order)


def detect_bitmap_bytes(chain: ChunkChain, page_shift: int = 12) -> int:
    """512 when any pointer rules out page-sized bitmaps, else PAGE_SIZE.

    Page-sized bitmaps are whole pages and their phys_start is a multiple of the page variant's
    span; a 512-byte bitmap lives in a kmalloc-512 slot (page aligned one time in eight) and its
    phys_start is a multiple of an eighth of that span. Only a 6.16 map whose every bitmap sits
    in the first slot of its slab page, at such a phys_start, looks like the newer variant; it is
    then read as one (the page read also takes in the slab neighbours' bytes), which is why the
    chosen variant is recorded in the walk's format.
    """
    ps = 1 << page_shift
    for chunk in chain.chunks:
        if not chunk.entries:
            continue  # an impossible order keeps none, and its span would be 2^order bits long
        page_span = _span(ps, chunk.order, page_shift)
        for entry in chunk.entries:
            if entry.bitmap % ps or entry.phys_start % page_span:
                return BITMAP_512_BYTES
    return ps


class _EntryProblems:
    """Entry defects of one chunk, one issue per kind: a corrupt chunk holds up to 255 alike,
    and a line each would bury everything else."""

    def __init__(self) -> None:
        self._kinds: dict[tuple[str, str], tuple[MapIssue, int]] = {}  # (code, field)

    def note(self, code: str, field_name: str, chunk: MemChunk, index: int, what: str) -> None:
        kind = (code, field_name)
        if kind in self._kinds:
            issue, count = self._kinds[kind]
            self._kinds[kind] = (issue, count + 1)
            return
        issue = MapIssue(code, chunk.phys, f"khoser_mem_chunk {chunk.phys:#x} (order "
                         f"{chunk.order}) entry {index} {what}")
        self._kinds[kind] = (issue, 1)

    def flush(self, out: list[MapIssue]) -> None:
        for issue, count in self._kinds.values():
            if count > 1:
                issue.message += f" (and {count - 1} more entries of this chunk alike)"
            out.append(issue)
        self._kinds.clear()


def chunks_walk(memory: PhysicalMemory, root: int, page_shift: int = 12,
                bitmap_bytes: int | None = None, *,
                max_chunks: int | None = None) -> MemoryMapWalk:
    """Walk the chunk list under `root`; `bitmap_bytes` None detects the variant.

    Entries with a null, misaligned or unreadable bitmap are reported and skipped; the others
    still count, as the kernel would still reserve what they describe.
    """
    ps = 1 << page_shift
    chain = read_chain(memory, root, page_shift, max_chunks=max_chunks)
    if bitmap_bytes is None:
        bitmap_bytes = detect_bitmap_bytes(chain, page_shift)
    if bitmap_bytes not in (BITMAP_512_BYTES, ps):
        raise AbiError(f"kho-v1 bitmaps are {BITMAP_512_BYTES} bytes or one page, not "
                       f"{bitmap_bytes}")
    fmt = FORMAT_PAGE if bitmap_bytes == ps else FORMAT_512
    walk = MemoryMapWalk(fmt, root, ExtentMap(page_shift), issues=chain.issues,
                         missing_pages=chain.missing_pages)
    meta: dict[int, None] = {c.phys: None for c in chain.chunks}  # ordered set
    missing = set(chain.missing_pages)
    problems = _EntryProblems()
    for chunk in chain.chunks:
        if not chunk.entries:
            continue  # as in detect_bitmap_bytes: no span of an impossible order is computed
        shift = page_shift + chunk.order
        span = _span(bitmap_bytes, chunk.order, page_shift)
        for i, entry in enumerate(chunk.entries):
            if entry.bitmap == 0:
                problems.note("property-malformed", "bitmap", chunk, i,
                              "has a null bitmap pointer; the next kernel would dereference it")
                continue
            if entry.bitmap % bitmap_bytes:
                problems.note("misaligned", "bitmap", chunk, i,
                              f"has bitmap {entry.bitmap:#x}, not {bitmap_bytes}-byte aligned")
                continue
            if entry.phys_start % span:
                # The kernel only ever writes multiples of the span; it would still reserve
                # relative to this start, so the entry is decoded as written.
                problems.note("misaligned", "phys_start", chunk, i,
                              f"has phys_start {entry.phys_start:#x}, not a multiple of the "
                              f"{span:#x} bytes a bitmap covers")
            if entry.phys_start + span >= 1 << 64:  # an extent must end at a u64 address
                problems.note("property-malformed", "phys_start", chunk, i,
                              f"has an order-{chunk.order} bitmap at phys_start "
                              f"{entry.phys_start:#x} reaching the end of the 64-bit space")
                continue
            page = entry.bitmap - entry.bitmap % ps
            meta[page] = None
            try:
                bits = memory.read(entry.bitmap, bitmap_bytes)
            except MemoryUnavailable:
                if page not in missing:
                    missing.add(page)
                    walk.missing_pages.append(page)
                continue
            for start, end in _bit_runs(bits):
                walk.extents.add(entry.phys_start + (start << shift), (end - start) << shift,
                                 chunk.order)
        problems.flush(walk.issues)
    walk.meta_pages = list(meta)
    return walk


def walk_chunks(memory: PhysicalMemory, root: int, page_shift: int) -> MemoryMapWalk:
    return chunks_walk(memory, root, page_shift)


def walk_chunks_512(memory: PhysicalMemory, root: int, page_shift: int) -> MemoryMapWalk:
    return chunks_walk(memory, root, page_shift, BITMAP_512_BYTES)


def walk_chunks_page(memory: PhysicalMemory, root: int, page_shift: int) -> MemoryMapWalk:
    return chunks_walk(memory, root, page_shift, 1 << page_shift)


def encode_chunks(extents: Iterable[Extent | tuple[int, int, int]], memory: SparseMemory,
                  alloc: PageAllocator, *, page_shift: int = 12,
                  bitmap_bytes: int | None = None) -> int:
    """Lay out a chunk list for `extents` = (phys, size, order) as kho_mem_serialize() does;
    return the first chunk's address (0 when nothing is preserved, as the kernel leaves it).

    Bitmaps are allocated first, in (order, index) order, as the kernel allocates them while
    pages are preserved; 512-byte bitmaps are packed eight to a page like kmalloc-512 slots. Then
    one chunk per order (more when an order has over `capacity()` bitmaps), orders ascending.
    """
    ps = 1 << page_shift
    if memory.page_size != ps or alloc.page_size != ps:
        raise AbiError(f"memory and allocator pages must be {ps} bytes for page_shift "
                       f"{page_shift}")
    bitmap_bytes = ps if bitmap_bytes is None else bitmap_bytes
    if bitmap_bytes not in (BITMAP_512_BYTES, ps):
        raise AbiError(f"kho-v1 bitmaps are {BITMAP_512_BYTES} bytes or one page, not "
                       f"{bitmap_bytes}")
    nbits = bitmap_bytes * 8
    # order -> xarray index -> bitmap as an int
    bitmaps: dict[int, dict[int, int]] = {}
    for item in extents:
        phys, size, order = ((item.phys, item.size, item.order) if isinstance(item, Extent)
                             else item)
        if not _order_usable(order, page_shift):
            raise AbiError(f"order {order} is impossible with {ps}-byte pages")
        block = 1 << (page_shift + order)
        if phys % block or size % block or size == 0:
            raise AbiError(f"extent {phys:#x}+{size:#x} is not whole order-{order} blocks")
        per_order = bitmaps.setdefault(order, {})
        first = phys >> (page_shift + order)
        last = first + size // block  # exclusive
        pos = first
        while pos < last:
            index, lo = divmod(pos, nbits)
            hi = min(last - index * nbits, nbits)
            per_order[index] = per_order.get(index, 0) | (((1 << (hi - lo)) - 1) << lo)
            pos = index * nbits + hi
    if not bitmaps:
        return 0
    slots: list[int] = []  # free 512-byte slots of the current slab page
    entries_by_order: dict[int, list[ChunkEntry]] = {}
    for order in sorted(bitmaps):
        entries = entries_by_order[order] = []
        for index in sorted(bitmaps[order]):
            if bitmap_bytes == ps:
                addr = alloc.alloc(ps)
            else:
                if not slots:
                    page = alloc.alloc(ps)
                    slots = list(range(page + ps - BITMAP_512_BYTES, page - 1, -BITMAP_512_BYTES))
                addr = slots.pop()
            memory.write(addr, bitmaps[order][index].to_bytes(bitmap_bytes, "little"))
            entries.append(ChunkEntry((index * nbits) << (page_shift + order), addr))
    cap = capacity(ps)
    chunks: list[tuple[int, list[ChunkEntry]]] = []
    for order, entries in entries_by_order.items():
        for i in range(0, len(entries), cap):
            chunks.append((order, entries[i:i + cap]))
    addrs = [alloc.alloc(ps) for _ in chunks]
    for n, (addr, (order, group)) in enumerate(zip(addrs, chunks, strict=True)):
        raw = bytearray(ps)
        nxt = addrs[n + 1] if n + 1 < len(addrs) else 0
        struct.pack_into("<QII", raw, 0, nxt, order, len(group))
        for i, entry in enumerate(group):
            struct.pack_into("<QQ", raw, HEADER_SIZE + i * ENTRY_SIZE, entry.phys_start,
                             entry.bitmap)
        memory.write(addr, bytes(raw))
    return addrs[0]
