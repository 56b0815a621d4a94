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
from dataclasses import dataclass, field

from .context import DecodeContext, MemRef
from .memory import PageAllocator, SparseMemory
from .vmalloc import VmallocDesc, encode_vmalloc, read_vmalloc

FOLIO_DIRTY = 0x1
FOLIO_UPTODATE = 0x2
ALL_SEALS = 0x3F  # F_SEAL_SEAL|SHRINK|GROW|WRITE|FUTURE_WRITE|EXEC
FOLIO_SER = struct.Struct("<QQ")  # memfd_luo_folio_ser: pfn:52 + flags:12, index
FOLIO_SER_SIZE = FOLIO_SER.size
PFN_MASK = (1 << 52) - 1
MAX_FOLIO_PAGES = 1 << 10  # a folio spans at most 2^MAX_PAGE_ORDER pages (x86-64, 4 KiB)


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


def decode(fmt: MemfdLayout, ctx: DecodeContext, phys: int, path: str) -> MemfdState | None:
    compatible = fmt.compatible
    if phys == 0 or phys % 8:
        ctx.add("misaligned", path, f"{compatible}: memfd_luo_ser address {phys:#x} is invalid")
        return None
    ctx.refs.append(MemRef(phys, fmt.ser_size, path, "memfd_luo_ser"))
    raw = ctx.read(phys, fmt.ser_size, path, "memfd_luo_ser")
    if raw is None:
        return None
    # one unpack for the header and its kho_vmalloc descriptor (this runs for every memfd)
    if fmt.has_seals:
        pos, size, seals, flags, nr_folios, first, total, vflags, order = fmt.ser.unpack_from(
            raw, 0)
    else:
        pos, size, nr_folios, first, total, vflags, order = fmt.ser.unpack_from(raw, 0)
        seals = flags = None
    desc = VmallocDesc(first, total, vflags, order)
    state = MemfdState(compatible, pos, size, seals, flags, nr_folios, desc)
    if seals is not None and seals & ~ALL_SEALS:
        ctx.add("memfd-seals-invalid", path, f"seals {seals:#x} include bits outside "
                f"{ALL_SEALS:#x}; the next kernel refuses to retrieve this file (EOPNOTSUPP)")
    if flags:
        ctx.add("property-malformed", path, f"memfd_luo_ser flags {flags:#x} must be 0")
    _decode_folios(ctx, state, path)
    return state


def _decode_folios(ctx: DecodeContext, state: MemfdState, path: str) -> None:
    shift = ctx.page_shift
    ps = 1 << shift
    nr_folios = state.nr_folios
    npages = -(-state.size // ps)
    if nr_folios == 0:
        if state.size:
            ctx.add("memfd-short", path, f"memfd of {state.size} bytes has no folios; its data "
                    "would come back as zeros")
        return
    if state.folio_array.total_pages * ps < nr_folios * FOLIO_SER_SIZE:
        ctx.add("count-mismatch", path, f"nr_folios {nr_folios} needs "
                f"{nr_folios * FOLIO_SER_SIZE} bytes but the folio array has "
                f"{state.folio_array.total_pages} page(s)")
    area = read_vmalloc(ctx, state.folio_array, path, "memfd folio array")
    if not area.complete:
        state.complete = False
        return
    remaining = nr_folios
    # Folio sizes are not in the array (the kernel takes them from the preserved-memory map), so
    # a hole is provable only where two indices lie farther apart than the largest folio can
    # span, where the first folio does not start at index 0, or where the tail is out of reach.
    gap: tuple[int, int] | None = None
    prev_index = -1
    reach = 1  # the first folio must be at index 0; later ones within a folio's span
    ascending = True
    block = ps << area.desc.order
    folio_flags = state.folio_flags
    runs = state.data_runs
    run_start = run_end = -1  # the run being grown; folios are coalesced as they come
    for blk in area.blocks:
        if remaining <= 0:
            break
        # Read only the part of the block that holds the remaining entries.
        raw = ctx.read(blk, min(block, remaining * FOLIO_SER_SIZE), path,
                       "memfd folio array page")
        if raw is None:
            state.complete = False
            return
        n = min(remaining, len(raw) // FOLIO_SER_SIZE)
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
            page = pfn << shift
            if page != run_end:
                if run_end >= 0:
                    runs.append((run_start, run_end - run_start))
                run_start = page
            run_end = page + ps
            if index == 0:
                state.first_page = page
        state.folios_read += n
        remaining -= n
    if run_end >= 0:
        runs.append((run_start, run_end - run_start))
    refs_append = ctx.refs.append  # ctx.ref() inlined: this runs for every memfd
    for phys, size in runs:  # one reference per physically contiguous run, not per page
        refs_append(MemRef(phys, size, path, "memfd data folio"))
    if not ascending:
        ctx.add("blob-malformed", path, "memfd folio indices are not strictly increasing")
    if state.folios_read < state.nr_folios:
        ctx.add("count-mismatch", path, f"nr_folios is {state.nr_folios} but the folio array "
                f"holds only {state.folios_read}")
    if gap is not None:
        ctx.add("memfd-short", path, f"no folio can cover pages {gap[0]}..{gap[1] - 1} of the "
                "file; that data would be lost")
    elif npages - prev_index > MAX_FOLIO_PAGES:
        ctx.add("memfd-short", path, f"the last folio starts at page {prev_index} but the file "
                f"has {npages} pages ({state.size} bytes); the tail would be lost")


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
