"""`struct kho_vmalloc` chunk chains (include/linux/kho/abi/kexec_handover.h, 7.0+; versioned by
the KHO root compatible).

    struct kho_vmalloc { u64 first; u32 total_pages; u16 flags; u16 order; };  // 16 bytes
    struct kho_vmalloc_chunk { u64 next; u64 phys[(PAGE_SIZE - 8) / 8]; };    // one page

`phys[]` lists blocks of 2^order pages; it is zero-terminated unless the chunk is full, and a new
chunk is allocated as soon as one fills, so the last chunk may be empty. The kernel's restore fails
unless the blocks add up to exactly `total_pages`.
"""

from __future__ import annotations

import functools
import struct
from array import array
from dataclasses import dataclass, field

from .context import DecodeContext, MemRef
from .errors import AbiError
from .memory import PageAllocator, SparseMemory

DESC_SIZE = 16
FLAG_ALLOC = 0x0001      # VM_ALLOC
FLAG_HUGE_VMAP = 0x0002  # VM_ALLOW_HUGE_VMAP
KNOWN_FLAGS = FLAG_ALLOC | FLAG_HUGE_VMAP
MAX_CHUNKS = 1 << 20     # 2 GiB of area data at 4 KiB: far beyond any real use; bounds a bad chain
MAX_ORDER = 10           # MAX_PAGE_ORDER (x86-64, arm64 4K): no kernel allocates a larger block


@dataclass(slots=True)
class VmallocDesc:
    first: int
    total_pages: int
    flags: int
    order: int

    @classmethod
    def unpack(cls, raw: bytes) -> VmallocDesc:
        if len(raw) < DESC_SIZE:
            raise AbiError(f"kho_vmalloc descriptor is {len(raw)} bytes, needs {DESC_SIZE}")
        return cls(*struct.unpack_from("<QIHH", raw, 0))

    def pack(self) -> bytes:
        return struct.pack("<QIHH", self.first, self.total_pages, self.flags, self.order)


@dataclass(slots=True)
class VmallocArea:
    desc: VmallocDesc
    chunk_pages: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)  # physical address of each 2^order block
    complete: bool = True

    def pages(self, page_size: int) -> list[int]:
        step = page_size
        n = 1 << self.desc.order
        return [b + i * step for b in self.blocks for i in range(n)]


@functools.cache
def labels(what: str) -> tuple[str, str, str]:
    """The labels for one caller's chunks and data; cached because a LUO state with 100k memfds
    reads 100k folio arrays under the same `what`."""
    return f"{what} vmalloc chunk", f"{what}: kho_vmalloc chunk", f"{what} vmalloc data"


def read_vmalloc(ctx: DecodeContext, desc: VmallocDesc, path: str, what: str) -> VmallocArea:
    area = VmallocArea(desc)
    shift = ctx.page_shift
    ps = 1 << shift
    order = desc.order
    if desc.flags & ~KNOWN_FLAGS:
        ctx.add("vmalloc-flags-unknown", path, f"{what}: kho_vmalloc flags {desc.flags:#x} carry "
                f"bits outside {KNOWN_FLAGS:#x}; the next kernel silently drops them")
    if order > MAX_ORDER:
        ctx.add("property-malformed", path, f"{what}: kho_vmalloc order {order} is above "
                f"the largest page block ({MAX_ORDER}); no kernel writes it and its blocks were "
                "not read")
        area.complete = False
        return area
    if desc.first == 0:
        if desc.total_pages:
            ctx.add("count-mismatch", path, f"{what}: kho_vmalloc has total_pages "
                    f"{desc.total_pages} but no chunk")
            area.complete = False
        return area
    per_chunk = (ps - 8) // 8
    chunk_what, claim_what, data_what = labels(what)
    blocks = area.blocks
    chunk_pages = area.chunk_pages
    refs_append = ctx.refs.append  # ctx.ref() inlined: this runs for every memfd
    owners = ctx.owners
    seen: set[int] = set()  # chunks of this chain; filled from the second chunk on
    phys = desc.first
    while phys:
        if chunk_pages and not seen:
            seen.update(chunk_pages)
        if phys in seen:
            ctx.add("chain-cycle", path, f"{what}: kho_vmalloc chunk chain loops back to "
                    f"{phys:#x}")
            area.complete = False
            break
        if len(chunk_pages) >= MAX_CHUNKS:
            ctx.add("chain-too-long", path, f"{what}: kho_vmalloc chain exceeds {MAX_CHUNKS} "
                    "chunks")
            area.complete = False
            break
        if phys % ps:
            ctx.add("misaligned", path, f"{what}: kho_vmalloc chunk {phys:#x} is not page aligned")
            area.complete = False
            break
        if seen:
            seen.add(phys)
        if phys >> shift in owners:  # ctx.claim() with its common case inlined
            ctx.claim(phys, path, claim_what)
            area.complete = False
            break
        owners[phys >> shift] = path
        chunk_pages.append(phys)
        refs_append(MemRef(phys, ps, path, chunk_what))
        # Most areas are small (a one-page memfd has one block), so read only the words that
        # total_pages says are used, plus the terminator; a prefix without a terminator (a
        # total_pages that lies) is read again whole, so the result does not depend on it.
        expect = (desc.total_pages >> order) - len(blocks)
        page = ctx.read(phys, 16 + 8 * expect if 0 <= expect < per_chunk else ps, path,
                        chunk_what)
        if page is None:
            area.complete = False
            break
        words = array("Q", page)
        try:  # phys[] is zero-terminated unless the chunk is full
            end = words.index(0, 1)
        except ValueError:
            end = len(words)
            if end <= per_chunk:
                page = ctx.read(phys, ps, path, chunk_what)
                if page is None:
                    area.complete = False
                    break
                words = array("Q", page)
                try:
                    end = words.index(0, 1)
                except ValueError:
                    end = 1 + per_chunk
        nxt = words[0]
        blocks.extend(words[1:end])
        if end <= per_chunk and nxt:
            # A chunk that is not full ends the list in the kernel's writer; a link after it is
            # ignored by the reader too, but it means the structure is not what the kernel wrote.
            ctx.add("blob-malformed", path, f"{what}: kho_vmalloc chunk {phys:#x} is not full "
                    "but links to another chunk")
            break
        phys = nxt
    block = ps << order
    misaligned = False
    for b in blocks:
        if b % block and not misaligned:
            ctx.add("misaligned", path, f"{what}: vmalloc block {b:#x} is not aligned to its "
                    f"order {order}")
            misaligned = True
        refs_append(MemRef(b, block, path, data_what))
    if area.complete and len(blocks) << order != desc.total_pages:
        listed = len(blocks) << order
        ctx.add("count-mismatch", path, f"{what}: kho_vmalloc lists {listed}"
                f" pages but total_pages is {desc.total_pages}; the next kernel refuses to "
                "restore it")
    return area


def read_area_bytes(ctx: DecodeContext, area: VmallocArea, length: int, path: str,
                    what: str) -> bytes | None:
    """Concatenate the area's data up to `length` bytes (None if any page is unavailable)."""
    block = ctx.page_size << area.desc.order
    out = bytearray()
    for b in area.blocks:
        if len(out) >= length:
            break
        data = ctx.read(b, min(block, length - len(out)), path, what)
        if data is None:
            return None
        out += data
    return bytes(out) if len(out) >= length else None


def encode_vmalloc(data: bytes, memory: SparseMemory, alloc: PageAllocator, *,
                   flags: int = FLAG_ALLOC, order: int = 0) -> VmallocDesc:
    """Preserve `data` as a vmalloc area the way kho_preserve_vmalloc() lays it out."""
    ps = memory.page_size
    block = ps << order
    nblocks = max(1, -(-len(data) // block)) if data else 0
    if nblocks == 0:
        return VmallocDesc(0, 0, 0, 0)
    per_chunk = (ps - 8) // 8
    chunks: list[list[int]] = [[]]
    for i in range(nblocks):
        phys = alloc.alloc(block, align=block)
        memory.write(phys, data[i * block:(i + 1) * block].ljust(block, b"\0"))
        chunks[-1].append(phys)
        if len(chunks[-1]) == per_chunk:
            chunks.append([])  # the kernel starts a new chunk as soon as one fills
    addrs = [alloc.alloc(ps) for _ in chunks]
    for n, (phys, entries) in enumerate(zip(addrs, chunks, strict=True)):
        page = bytearray(ps)
        struct.pack_into("<Q", page, 0, addrs[n + 1] if n + 1 < len(addrs) else 0)
        for i, entry in enumerate(entries):
            struct.pack_into("<Q", page, 8 + 8 * i, entry)
        memory.write(phys, bytes(page))
    return VmallocDesc(addrs[0], nblocks << order, flags, order)
