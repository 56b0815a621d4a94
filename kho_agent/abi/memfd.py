"""memfd file handler: `memfd-v1` and `memfd-v2` (include/linux/kho/abi/memfd.h).

`luo_file_ser.data` is the physical address of a packed `struct memfd_luo_ser`:

    memfd-v1 (6.19 .. 7.0), 40 bytes: u64 pos; u64 size; u64 nr_folios; struct kho_vmalloc folios;
    memfd-v2 (7.1 ..),      48 bytes: u64 pos; u64 size; u32 seals; u32 flags; u64 nr_folios;
                                      struct kho_vmalloc folios;

`folios` is a vmalloc'ed array of 16-byte `memfd_luo_folio_ser { u64 pfn:52, flags:12; u64 index; }`
(pfn in bits 0..51, flags in 52..63 on little-endian). Preservation pins every page of the file,
holes included, so a healthy array covers the whole size.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field

from .context import DecodeContext, MemRef
from .errors import MemoryUnavailable
from .memory import PageAllocator, SparseMemory
from .vmalloc import KNOWN_FLAGS, MAX_ORDER, VmallocDesc, encode_vmalloc, labels, read_vmalloc

FOLIO_DIRTY = 0x1
FOLIO_UPTODATE = 0x2
ALL_SEALS = 0x3F  # F_SEAL_SEAL|SHRINK|GROW|WRITE|FUTURE_WRITE|EXEC
FOLIO_SER = struct.Struct("<QQ")  # memfd_luo_folio_ser: pfn:52 + flags:12, index
FOLIO_SER_SIZE = FOLIO_SER.size
PFN_MASK = (1 << 52) - 1
MAX_FOLIO_PAGES = 1 << 10  # a folio spans at most 2^MAX_PAGE_ORDER pages (x86-64, 4 KiB)
_CHUNK_WHAT, _, _DATA_WHAT = labels("memfd folio array")
_ONE_BLOCK_CHUNK = struct.Struct("<QQQ")  # kho_vmalloc_chunk read up to one block's terminator


@dataclass(frozen=True)
class MemfdLayout:
    """One memfd_luo_ser version's layout (its record is formats/memfd_vN.py)."""

    compatible: str
    ser: struct.Struct  # the whole memfd_luo_ser, its kho_vmalloc descriptor included
    has_seals: bool     # u32 seals; u32 flags after size

    @property
    def ser_size(self) -> int:
        return self.ser.size


@dataclass(slots=True)
class MemfdState:
    compatible: str
    pos: int
    size: int
    seals: int | None
    flags: int | None
    nr_folios: int
    folio_array: VmallocDesc
    folios_read: int = 0
    folio_flags: dict[int, int] = field(default_factory=dict)  # flags value -> folio count
    # Physically contiguous runs (phys, bytes) of the file's data pages, in folio-index order.
    data_runs: list[tuple[int, int]] = field(default_factory=list)
    first_page: int | None = None  # physical address of the folio at index 0
    complete: bool = True


def decode(fmt: MemfdLayout, ctx: DecodeContext, phys: int, path: str, *,
           fast: bool = True) -> MemfdState | None:
    """Decode one memfd_luo_ser and its folio array.

    This runs for every memfd (100k in a large LUO state), so context methods are inlined, and
    two common cases take a fast path: a folio array of one vmalloc chunk (read_vmalloc()'s
    work done here) and a one-folio file. Their results, findings and references are those of
    the general code, in the same order; `fast=False` runs the general code only, and
    tests/test_memfd_fast_path.py holds the two to each other."""
    compatible = fmt.compatible
    if phys == 0 or phys % 8:
        ctx.add("misaligned", path, f"{compatible}: memfd_luo_ser address {phys:#x} is invalid")
        return None
    ser = fmt.ser
    ser_size = ser.size
    refs = ctx.refs
    refs.append(MemRef(phys, ser_size, path, "memfd_luo_ser"))
    memory = ctx.memory
    if memory is None:
        ctx.read(phys, ser_size, path, "memfd_luo_ser")  # reports that nothing could be read
        return None
    try:
        raw = memory.read(phys, ser_size)
    except MemoryUnavailable:
        ctx.unavailable(phys, ser_size, path, "memfd_luo_ser")
        return None
    # one unpack for the header and its kho_vmalloc descriptor
    if fmt.has_seals:
        pos, size, seals, flags, nr_folios, first, total, vflags, order = ser.unpack_from(raw, 0)
    else:
        pos, size, nr_folios, first, total, vflags, order = ser.unpack_from(raw, 0)
        seals = flags = None
    desc = VmallocDesc(first, total, vflags, order)
    # the defaults given, not made by the dataclass's factories
    state = MemfdState(compatible, pos, size, seals, flags, nr_folios, desc, 0, {}, [])
    if seals is not None and seals & ~ALL_SEALS:
        ctx.add("memfd-seals-invalid", path, f"seals {seals:#x} include bits outside "
                f"{ALL_SEALS:#x}; the next kernel refuses to retrieve this file (EOPNOTSUPP)")
    if flags:
        ctx.add("property-malformed", path, f"memfd_luo_ser flags {flags:#x} must be 0")

    # The folio array.
    shift = ctx.page_shift
    ps = 1 << shift
    if nr_folios == 0:
        if size:
            ctx.add("memfd-short", path, f"memfd of {size} bytes has no folios; its data "
                    "would come back as zeros")
        return state
    if total * ps < nr_folios * FOLIO_SER_SIZE:
        ctx.add("count-mismatch", path, f"nr_folios {nr_folios} needs "
                f"{nr_folios * FOLIO_SER_SIZE} bytes but the folio array has {total} page(s)")
    blocks: Sequence[int] | None = None
    block = ps << order
    owners = ctx.owners
    expect = total >> order
    if (fast and not vflags & ~KNOWN_FLAGS and order <= MAX_ORDER and first and not first % ps
            and first >> shift not in owners and expect < (ps - 8) // 8):
        # read_vmalloc()'s common case: one chunk, read as far as total_pages says it is used
        # (a one-page memfd: one block). Its list ends there unless total_pages lies; then
        # read_vmalloc() below walks the chain (and reads that prefix again).
        length = 16 + 8 * expect
        try:
            page = memory.read(first, length)
        except MemoryUnavailable:
            owners[first >> shift] = path
            refs.append(MemRef(first, ps, path, _CHUNK_WHAT))
            ctx.unavailable(first, length, path, _CHUNK_WHAT)
            state.complete = False
            return state
        if expect == 1:  # next, one block, terminator: a struct is cheaper than an array here
            nxt, blk, term = _ONE_BLOCK_CHUNK.unpack(page)
            if not blk:
                blocks = ()
            elif not term:
                blocks = (blk,)
        else:
            words = array("Q", page)
            nxt = words[0]
            try:
                end = words.index(0, 1)
            except ValueError:
                end = 0  # not terminated within total_pages: read_vmalloc() below
            if end:
                blocks = words[1:end]
        if blocks is not None:
            owners[first >> shift] = path
            refs.append(MemRef(first, ps, path, _CHUNK_WHAT))
            if nxt:  # a chunk that is not full links nowhere in the kernel's writer
                ctx.add("blob-malformed", path, f"memfd folio array: kho_vmalloc chunk "
                        f"{first:#x} is not full but links to another chunk")
            misaligned = False
            for b in blocks:
                if b % block and not misaligned:
                    ctx.add("misaligned", path, f"memfd folio array: vmalloc block {b:#x} is "
                            f"not aligned to its order {order}")
                    misaligned = True
                refs.append(MemRef(b, block, path, _DATA_WHAT))
            if len(blocks) << order != total:
                ctx.add("count-mismatch", path, f"memfd folio array: kho_vmalloc lists "
                        f"{len(blocks) << order} pages but total_pages is {total}; the next "
                        "kernel refuses to restore it")
    if blocks is None:
        area = read_vmalloc(ctx, desc, path, "memfd folio array")
        if not area.complete:
            state.complete = False
            return state
        blocks = area.blocks

    if fast and nr_folios == 1 and blocks:
        # A one-page memfd, the usual file: its one entry is read and checked alone, with the
        # outcome of the loop below for one entry (indices ascend, the first folio is the last).
        blk = blocks[0]
        try:
            raw = memory.read(blk, FOLIO_SER_SIZE)
        except MemoryUnavailable:
            ctx.unavailable(blk, FOLIO_SER_SIZE, path, "memfd folio array page")
            state.complete = False
            return state
        word, index = FOLIO_SER.unpack(raw)
        state.folio_flags[word >> 52] = 1
        state.folios_read = 1
        pfn = word & PFN_MASK
        if pfn:  # the kernel skips a zero pfn on restore
            page_phys = pfn << shift
            state.data_runs.append((page_phys, ps))
            if index == 0:
                state.first_page = page_phys
            refs.append(MemRef(page_phys, ps, path, "memfd data folio"))
        if index:
            ctx.add("memfd-short", path, f"no folio can cover pages 0..{index - 1} of the "
                    "file; that data would be lost")
        else:
            npages = -(-size // ps)
            if npages > MAX_FOLIO_PAGES:
                ctx.add("memfd-short", path, f"the last folio starts at page 0 but the "
                        f"file has {npages} pages ({size} bytes); the tail would be lost")
        return state

    remaining = nr_folios
    # Folio sizes are not in the array (the kernel takes them from the preserved-memory map), so
    # a hole is provable only where two indices lie farther apart than the largest folio can
    # span, where the first folio does not start at index 0, or where the tail is out of reach.
    gap: tuple[int, int] | None = None
    prev_index = -1
    reach = 1  # the first folio must be at index 0; later ones within a folio's span
    ascending = True
    folio_flags = state.folio_flags
    runs = state.data_runs
    run_start = run_end = -1  # the run being grown; folios are coalesced as they come
    for blk in blocks:
        if remaining <= 0:
            break
        # Read only the part of the block that holds the remaining entries.
        length = remaining * FOLIO_SER_SIZE
        if length > block:
            length = block
        try:
            raw = memory.read(blk, length)
        except MemoryUnavailable:
            ctx.unavailable(blk, length, path, "memfd folio array page")
            state.complete = False
            return state
        n = len(raw) // FOLIO_SER_SIZE
        if n > remaining:
            n = remaining
        # one C-level unpack per entry (an array and two strided slices cost more for the
        # usual one-folio file)
        for word, index in FOLIO_SER.iter_unpack(raw[:n * FOLIO_SER_SIZE]):
            fflags = word >> 52
            folio_flags[fflags] = folio_flags.get(fflags, 0) + 1
            if index <= prev_index:
                ascending = False
            else:
                if gap is None and index - prev_index > reach:
                    gap = (prev_index + 1, index)
                prev_index = index
                reach = MAX_FOLIO_PAGES
            pfn = word & PFN_MASK
            if not pfn:
                continue  # the kernel skips a zero pfn on restore
            page_phys = pfn << shift
            if page_phys != run_end:
                if run_end >= 0:
                    runs.append((run_start, run_end - run_start))
                run_start = page_phys
            run_end = page_phys + ps
            if index == 0:
                state.first_page = page_phys
        state.folios_read += n
        remaining -= n
    if run_end >= 0:
        runs.append((run_start, run_end - run_start))
    for run_phys, run_size in runs:  # one reference per physically contiguous run, not per page
        refs.append(MemRef(run_phys, run_size, path, "memfd data folio"))
    if not ascending:
        ctx.add("blob-malformed", path, "memfd folio indices are not strictly increasing")
    if state.folios_read < nr_folios:
        ctx.add("count-mismatch", path, f"nr_folios is {nr_folios} but the folio array "
                f"holds only {state.folios_read}")
    if gap is not None:
        ctx.add("memfd-short", path, f"no folio can cover pages {gap[0]}..{gap[1] - 1} of the "
                "file; that data would be lost")
    else:
        npages = -(-size // ps)
        if npages - prev_index > MAX_FOLIO_PAGES:
            ctx.add("memfd-short", path, f"the last folio starts at page {prev_index} but the "
                    f"file has {npages} pages ({size} bytes); the tail would be lost")
    return state


def encode(fmt: MemfdLayout, content: bytes, memory: SparseMemory, alloc: PageAllocator, *,
           size: int | None = None, pos: int = 0, seals: int = 0x1) -> int:
    """Preserve a memfd holding `content` (zero-filled up to `size`), as memfd_luo_preserve()
    does: every page gets an order-0 folio, holes included. Returns the memfd_luo_ser address."""
    ps = memory.page_size
    size = len(content) if size is None else size
    npages = -(-size // ps)
    folios = bytearray()
    for index in range(npages):
        phys = alloc.alloc(ps)
        memory.write(phys, content[index * ps:(index + 1) * ps].ljust(ps, b"\0"))
        word = (phys >> (ps.bit_length() - 1)) | ((FOLIO_DIRTY | FOLIO_UPTODATE) << 52)
        folios += struct.pack("<QQ", word, index)
    desc = encode_vmalloc(bytes(folios), memory, alloc) if npages else VmallocDesc(0, 0, 0, 0)
    ser_phys = alloc.alloc(fmt.ser_size)
    vmalloc = (desc.first, desc.total_pages, desc.flags, desc.order)
    if fmt.has_seals:
        raw = fmt.ser.pack(pos, size, seals, 0, npages, *vmalloc)
    else:
        raw = fmt.ser.pack(pos, size, npages, *vmalloc)
    memory.write(ser_phys, raw)
    return ser_phys
