"""KHO scratch sizing: what the kernel reserves, what the next boot needs, what to put on the
command line (like `kdumpctl estimate` for kdump). Pure: SysInfo and sizes in, a plan out.

Background (reference §5.3-5.5). A KHO boot allocates early memory only from the scratch areas it
inherits: one below 4 GiB (lowmem), one anywhere (global), one per NUMA node with memory. The
previous kernel reserved them at its cold boot, sized by `kho_scratch=` or by default at 200% of its
own kernel-flagged memblock reservations (MEMBLOCK_RSRV_KERN: memmap, page tables, kernel image,
initrd, swiotlb, crashkernel...). kexec_file_load also places every segment of the next kernel
(image, initrd, boot data, purgatory, the scratch array) inside the areas, each in the first area
with room, and fails with EADDRNOTAVAIL when one does not fit.

The plan works per area:

    required     one copy of this kernel's reservations in that area (the next kernel's early
                 allocations mirror them); below it the next boot is expected to run out of
                 scratch, so the plan is not sufficient
    recommended  the kernel's own 200% of the reservations, plus the next kernel's segments in
                 the lowmem area (where kexec places them first), plus the margin, rounded up to
                 SCRATCH_ALIGNMENT_BYTES

and checks that the segments fit into the current areas the way the kernel places them.
"""

from __future__ import annotations

import dataclasses
import string
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .abi.kho_state import ScratchArea
from .errors import InvalidArgument
from .kernel.sysinfo import MemblockRegion, SysInfo, kho_enabled, param_values

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

U64_MASK = (1 << 64) - 1
UINT_MAX = (1 << 32) - 1
MAX_PAGE_ORDER = 10                       # default on x86-64 and 4K-page arm64
SCRATCH_ALIGNMENT_BYTES = 4096 << MAX_PAGE_ORDER   # PAGE_SIZE << MAX_PAGE_ORDER: 4 MiB on x86-64
ARCH_LOW_ADDRESS_LIMIT = 0xFFFFFFFF       # x86 (generic default); arm64 uses its DMA limit - 1
DEFAULT_SCALE = 200                       # the kernel's scratch_scale
# The margin on top of the kernel's own 200%: the next kernel may be larger than the one measured
# here (new features, a bigger initrd), memory may have been added by the next boot, and the
# count cannot see everything (memory freed since boot, an IMA measurement-list segment, the
# copy KASLR makes when it moves the decompressed kernel inside scratch). A quarter more keeps
# the kernel's designed 2x headroom intact after those, at a cost of a few percent of RAM.
DEFAULT_MARGIN = 0.25
DEFAULT_MARGIN_PERCENT = 25
MARGIN_PPM = 1_000_000
SCRATCH_ENTRY_BYTES = 16                  # struct kho_scratch { phys_addr_t addr, size; }
STRUCT_PAGE_BYTES = 64                    # sizeof(struct page) on 64-bit without debug options

# memblock flags that mark kernel use. RSV_NIT is counted too: debugfs names only the lowest set
# flag, and RSRV_NOINIT regions are memblock allocations (so also RSRV_KERN) whose struct pages
# are initialised late, e.g. boot-time HugeTLB pages with HVO.
KERN_FLAGS = frozenset({"RSV_KERN", "RSV_NIT"})

# --- the kexec segments of the next kernel (x86-64 bzImage64 loader; arm64 is close) ----------
# Purgatory: the x86-64 purgatory object (text, data, bss with its stack and the SHA-256 region
# table) is about 20-30 KiB; 64 KiB bounds it. arm64 loads none, so this overcounts there.
PURGATORY_ALLOWANCE = 64 * KiB
# Boot data: struct boot_params (4 KiB) + the command line (2 KiB on x86) + setup_data: the EFI
# runtime memory map (tens of KiB on large servers), e820 entries beyond 128, RNG seed, IMA
# pointer, and the 32-byte struct kho_data. On arm64 this segment is the copied device tree
# (typically under 100 KiB). 256 KiB covers the largest of these with room to spare.
BOOT_DATA_ALLOWANCE = 256 * KiB
# The kernel segment is aligned to the image's kernel_alignment: CONFIG_PHYSICAL_ALIGN, 2 MiB by
# default on x86-64; arm64 images need 2 MiB (MIN_KIMG_ALIGN) as well.
KERNEL_ALIGN = 2 * MiB
# Lowest addresses the x86 loader accepts (kexec-bzimage64.c); scratch areas sit far above them
# except on tiny machines, but the placement honours them anyway.
MIN_PURGATORY_ADDR = 0x3000
MIN_BOOTPARAM_ADDR = 0x10000
MIN_KERNEL_LOAD_ADDR = 0x100000
MIN_INITRD_LOAD_ADDR = 0x1000000
SCRATCH_ARRAY_ALIGN = 64 * KiB            # kho_fill_kimage(): "makes it easier to map"
# Page tables need no allowance here: the identity map kexec jumps through lives in control
# pages, which are ordinary allocations outside the segments, and the next kernel's decompressor
# builds its page tables inside the image's init_size (already the kernel segment's size).

# --- estimating kernel-reserved memory without memblock debugfs -------------------------------
# Early allocations other than memmap, kernel image, initrd, swiotlb and crashkernel: page tables
# of the direct map, per-CPU areas, NODE_DATA, the dentry/inode hash tables (RAM/1024 + RAM/2048
# on one-node machines). Measured on the 2 GiB 7.3-rc7 VM of tests/data/kho-samples: 79 MiB
# counted below 4 GiB (lowmem area 160 MiB at 200%) against 71 MiB of memmap + image + initrd,
# so 8 MiB other, of which 3 MiB hash tables: a fixed 6 MiB plus RAM/1024 reproduces it and
# grows with the hash tables on big machines.
OTHER_FIXED = 6 * MiB
OTHER_PER_RAM_DIVISOR = 1024
SWIOTLB_DEFAULT = 64 * MiB                # IO_TLB_DEFAULT_SIZE
IO_TLB_SLAB_BYTES = 2 * KiB               # swiotlb=<slabs> counts 2 KiB slabs (1 << IO_TLB_SHIFT)
CRASH_LOW_DEFAULT = 256 * MiB             # DEFAULT_CRASH_KERNEL_LOW_SIZE floor for ",high"
ALL_LOW_MAX_RAM = 3 * GiB                 # below this a PC has (nearly) no RAM above 4 GiB

_SUFFIX_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_MALFORMED = ("the kernel logs \"Malformed early option 'kho_scratch'\" and keeps the default "
              "200% scale")


# === kho_scratch= ==============================================================================

@dataclass(frozen=True)
class ScratchSizes:
    lowmem: int
    global_: int
    pernode: int

    def total(self, node_count: int) -> int:
        return self.lowmem + self.global_ + self.pernode * node_count


@dataclass(frozen=True)
class ScratchParam:
    """A parsed kho_scratch= value: a percent scale, or three absolute sizes."""

    scale: int | None = None
    sizes: ScratchSizes | None = None

    def form(self) -> str:
        if self.sizes is not None:
            s = self.sizes
            return (f"kho_scratch={size_text(s.lowmem)},{size_text(s.global_)},"
                    f"{size_text(s.pernode)}")
        return f"kho_scratch={self.scale}%"


def _strtoull(text: str, pos: int) -> tuple[int, int]:
    """simple_strtoull(s, &end, 0): base from the prefix (0x hex, 0 octal), no sign, no spaces,
    wrapping at 64 bits; returns (value, end)."""
    base = 10
    if text.startswith("0", pos):
        after_x = text[pos + 2:pos + 3]
        if text[pos + 1:pos + 2].lower() == "x" and after_x and after_x in string.hexdigits:
            base, pos = 16, pos + 2
        else:
            base = 8
    digits = "0123456789abcdef"[:base]
    value = 0
    while pos < len(text) and text[pos].lower() in digits:
        value = (value * base + int(text[pos], 16)) & U64_MASK
        pos += 1
    return value, pos


def _memparse(text: str, pos: int) -> tuple[int, int]:
    """memparse(): a number with an optional K/M/G/T/P/E suffix, any case."""
    value, end = _strtoull(text, pos)
    if end < len(text) and text[end].lower() in _SUFFIX_SHIFT:
        value = (value << _SUFFIX_SHIFT[text[end].lower()]) & U64_MASK
        end += 1
    return value, end


def parse_kho_scratch(value: str | None) -> ScratchParam:
    """Parse kho_scratch= exactly as kho_parse_scratch_size() does (7.2 / 7.3).

    `N%`: at most 10 characters before the %, kstrtouint base 10 (optional leading +, value at
    most 4294967295). Otherwise exactly three memparse() sizes `lowmem,global,pernode`: every field
    holds a number, nothing follows the third, and the sum (64-bit, wrapping) is not zero. Raises
    InvalidArgument saying what the kernel does with the bad value.
    """
    if value is None:
        raise InvalidArgument(f"kho_scratch has no value: {_MALFORMED}")
    if not value:
        raise InvalidArgument(f"kho_scratch= is empty: {_MALFORMED}")
    if value.endswith("%"):
        digits = value[:-1]
        if len(value) > 11:
            raise InvalidArgument(f"kho_scratch={value}: a percentage has at most 10 digits: "
                                  f"{_MALFORMED}")
        number = digits[1:] if digits.startswith("+") else digits
        if not number or not number.isascii() or not number.isdigit():
            raise InvalidArgument(f"kho_scratch={value}: {digits!r} is not a decimal number: "
                                  f"{_MALFORMED}")
        scale = int(number)
        if scale > UINT_MAX:
            raise InvalidArgument(f"kho_scratch={value}: {scale} is larger than 4294967295: "
                                  f"{_MALFORMED}")
        return ScratchParam(scale=scale)
    sizes: list[int] = []
    pos = 0
    for i in range(3):
        if i > 0:
            if pos >= len(value) or value[pos] != ",":
                raise InvalidArgument(
                    f"kho_scratch={value}: expected three sizes lowmem,global,pernode (e.g. "
                    f"16M,512M,256M) but found {len(sizes)}: {_MALFORMED}")
            pos += 1
        size, end = _memparse(value, pos)
        if end == pos:
            raise InvalidArgument(f"kho_scratch={value}: field {i + 1} has no number: "
                                  f"{_MALFORMED}")
        sizes.append(size)
        pos = end
    if sum(sizes) & U64_MASK == 0:
        raise InvalidArgument(f"kho_scratch={value}: all three sizes are zero: {_MALFORMED}")
    if pos != len(value):
        raise InvalidArgument(f"kho_scratch={value}: {value[pos:]!r} follows the third size: "
                              f"{_MALFORMED}")
    return ScratchParam(sizes=ScratchSizes(*sizes))


def size_text(n: int) -> str:
    """A size with the largest binary suffix that divides it exactly (memparse syntax)."""
    if n == 0:
        return "0"
    for suffix, shift in (("E", 60), ("P", 50), ("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n % (1 << shift) == 0:
            return f"{n >> shift}{suffix}"
    return str(n)


def human(n: int) -> str:
    """A size for people: MiB with one decimal (KiB below 1 MiB, GiB from 10 GiB)."""
    if abs(n) >= 10 * GiB:
        return f"{n / GiB:.1f} GiB"
    if 0 < abs(n) < MiB:
        return f"{n / KiB:.0f} KiB"
    return f"{n / MiB:.1f} MiB"


# === the kernel's default sizing ===============================================================

def scratch_alignment(page_size: int = 4096, max_page_order: int = MAX_PAGE_ORDER) -> int:
    """SCRATCH_ALIGNMENT_BYTES = PAGE_SIZE << MAX_PAGE_ORDER (4 MiB for 4 KiB pages)."""
    return page_size << max_page_order


def round_up(n: int, align: int) -> int:
    return -(-n // align) * align


@dataclass
class KernReserved:
    """Kernel-flagged reserved memory as the kernel counts it (memblock_reserved_kern_size())."""

    low: int                  # below ARCH_LOW_ADDRESS_LIMIT, any node
    total: int                # anywhere, any node
    per_node: dict[int, int] = field(default_factory=dict)

    def minus(self, other: KernReserved) -> KernReserved:
        """Subtract, never below zero (the subtracted amounts may be estimates)."""
        return KernReserved(
            max(self.low - other.low, 0), max(self.total - other.total, 0),
            {n: max(v - other.per_node.get(n, 0), 0) for n, v in self.per_node.items()})


def _overlap(start: int, end: int, ranges: Sequence[tuple[int, int]]) -> int:
    return sum(max(0, min(end, r_start + r_size) - max(start, r_start))
               for r_start, r_size in ranges)


def count_reserved(regions: Sequence[MemblockRegion], *, limit: int = ARCH_LOW_ADDRESS_LIMIT,
                   flags: frozenset[str] = KERN_FLAGS,
                   exclude: Sequence[tuple[int, int]] = ()) -> KernReserved:
    """Count reserved regions carrying one of `flags` the way memblock_reserved_kern_size() does.

    Below the limit a region starting at or below it counts up to `limit - base` (the kernel's
    own arithmetic: one byte short of the limit when a region crosses it). Per node only regions
    with a valid node count. `exclude` (base, size) ranges are not counted: on a cold boot the
    scratch areas themselves are memblock allocations, still listed as reserved after boot.
    """
    kern = KernReserved(0, 0, {})
    for r in regions:
        if not flags.intersection(r.flags):
            continue
        size = r.size - _overlap(r.base, r.end, exclude)
        kern.total += size
        if r.nid is not None:
            kern.per_node[r.nid] = kern.per_node.get(r.nid, 0) + size
        if r.base <= limit:
            low_end = r.end if r.end <= limit else limit
            kern.low += low_end - r.base - _overlap(r.base, low_end, exclude)
    return kern


@dataclass
class AreaSizes:
    """Sizes of every scratch area of one layout: per node by node id."""

    lowmem: int
    global_: int
    per_node: dict[int, int]

    def as_sizes(self) -> ScratchSizes:
        return ScratchSizes(self.lowmem, self.global_, max(self.per_node.values(), default=0))

    def total(self) -> int:
        return self.lowmem + self.global_ + sum(self.per_node.values())


def kernel_scratch_sizes(kern: KernReserved, param: ScratchParam | None = None, *,
                         nodes: Sequence[int], align: int = SCRATCH_ALIGNMENT_BYTES,
                         hugetlb: KernReserved | None = None) -> AreaSizes:
    """The areas a cold boot reserves: scratch_size_update() and scratch_size_node().

    Percent scale s (default 200): lowmem = s% of the low count, global = s% of the total count
    minus the unrounded lowmem, per node = s% of that node's count, each rounded up to `align`.
    Absolute sizes are rounded up the same way. `hugetlb` is 7.3's subtraction of boot-time
    HugeTLB pages (MEMBLOCK_RSRV_HUGETLB) before scaling. Arithmetic wraps at 64 bits like the
    kernel's phys_addr_t.
    """
    if param is not None and param.sizes is not None:
        s = param.sizes
        return AreaSizes(round_up(s.lowmem, align) & U64_MASK,
                         round_up(s.global_, align) & U64_MASK,
                         {n: round_up(s.pernode, align) & U64_MASK for n in nodes})
    scale = DEFAULT_SCALE if param is None or param.scale is None else param.scale
    base = kern.minus(hugetlb) if hugetlb is not None else kern
    low = (base.low * scale & U64_MASK) // 100
    global_ = ((base.total * scale & U64_MASK) // 100 - low) & U64_MASK
    per_node = {n: (base.per_node.get(n, 0) * scale & U64_MASK) // 100 for n in nodes}
    return AreaSizes(round_up(low, align) & U64_MASK, round_up(global_, align) & U64_MASK,
                     {n: round_up(v, align) & U64_MASK for n, v in per_node.items()})


# === kexec segments ============================================================================

@dataclass(frozen=True)
class KexecSegment:
    label: str
    memsz: int                # bytes, page aligned (kexec_add_buffer rounds it)
    align: int
    min_addr: int = 0
    top_down: bool = True

    def worst_case(self, page_size: int) -> int:
        """Bytes it can take from an area: its size plus the worst alignment padding."""
        return self.memsz + max(self.align - page_size, 0)


def kexec_segments(image_size: int, initrd_size: int | None, node_count: int,
                   page_size: int = 4096) -> list[KexecSegment]:
    """The segments kexec_file_load() places for the next kernel, in the kernel's order:
    kho_fill_kimage() adds the scratch array first, then the x86 bzImage64 loader adds
    purgatory, boot params, kernel and initrd."""
    def page(n: int) -> int:
        return round_up(n, page_size)

    segments = [
        KexecSegment("scratch array", page(SCRATCH_ENTRY_BYTES * (node_count + 2)),
                     SCRATCH_ARRAY_ALIGN),
        KexecSegment("purgatory", page(PURGATORY_ALLOWANCE), page_size, MIN_PURGATORY_ADDR,
                     top_down=False),
        KexecSegment("boot params and setup data", page(BOOT_DATA_ALLOWANCE), page_size,
                     MIN_BOOTPARAM_ADDR),
        KexecSegment("kernel image", page(image_size), max(KERNEL_ALIGN, page_size),
                     MIN_KERNEL_LOAD_ADDR),
    ]
    if initrd_size:
        segments.append(KexecSegment("initrd", page(initrd_size), page_size,
                                     MIN_INITRD_LOAD_ADDR))
    return segments


# x86 boot protocol setup header (Documentation/arch/x86/boot.rst) and the arm64 Image header
_SETUP_SECTS = 0x1F1
_HDRS_OFFSET = 0x202
_PROTOCOL_VERSION = 0x206
_INIT_SIZE = 0x260              # u32, protocol 2.10+: memory the kernel needs to boot in place
_INIT_SIZE_PROTOCOL = 0x020A
_ARM64_IMAGE_SIZE = 16          # u64 image_size
_ARM64_MAGIC_OFFSET = 56
_ARM64_MAGIC = b"ARM\x64"
IMAGE_HEADER_BYTES = 4096       # enough of a file for image_memory_size()


def image_memory_size(head: bytes, file_size: int) -> tuple[int, str] | None:
    """The memory a kernel takes once kexec loads it, from the start of its file (or of its
    decompressed payload), as (bytes, where from); None when the header is neither form.

    x86 bzImage: init_size (kexec_file_load sizes the kernel segment by it; it covers the
    in-place decompression), at least the protected-mode part of the file. arm64 Image:
    image_size, at least the given size.
    """
    if len(head) >= _INIT_SIZE + 4 and head[_HDRS_OFFSET:_HDRS_OFFSET + 4] == b"HdrS":
        protocol = struct.unpack_from("<H", head, _PROTOCOL_VERSION)[0]
        setup = ((head[_SETUP_SECTS] or 4) + 1) * 512
        if protocol >= _INIT_SIZE_PROTOCOL:
            init_size = struct.unpack_from("<I", head, _INIT_SIZE)[0]
            return max(init_size, file_size - setup), "bzImage init_size"
        return file_size - setup, "bzImage protected-mode part (boot protocol without init_size)"
    if (head[_ARM64_MAGIC_OFFSET:_ARM64_MAGIC_OFFSET + 4] == _ARM64_MAGIC
            and len(head) >= _ARM64_IMAGE_SIZE + 8):
        size = struct.unpack_from("<Q", head, _ARM64_IMAGE_SIZE)[0]
        return (max(size, file_size), "arm64 Image image_size") if size else (
            file_size, "arm64 Image size")
    return None


@dataclass
class Placement:
    segment: KexecSegment
    area: str | None          # the role of the area it landed in; None: no room anywhere
    phys: int | None


def place_segments(segments: Sequence[KexecSegment],
                   areas: Sequence[ScratchArea]) -> list[Placement]:
    """Place segments like kho_locate_mem_hole(): each goes into the first area, in kho_scratch[]
    order, that has an aligned hole for it among the segments placed before (top-down or
    bottom-up as the segment asks)."""
    free: list[list[tuple[int, int]]] = [[(a.phys, a.phys + a.size)] for a in areas]
    out = []
    for seg in segments:
        placed: Placement | None = None
        for i, area in enumerate(areas):
            spot = _find_hole(free[i], seg)
            if spot is not None:
                free[i] = _take(free[i], spot, spot + seg.memsz)
                placed = Placement(seg, area.role, spot)
                break
        out.append(placed or Placement(seg, None, None))
    return out


def _find_hole(free: list[tuple[int, int]], seg: KexecSegment) -> int | None:
    holes = sorted(free, reverse=seg.top_down)
    for start, end in holes:
        start = max(start, seg.min_addr)
        if seg.top_down:
            cand = (end - seg.memsz) // seg.align * seg.align
            if end >= seg.memsz and cand >= start:
                return cand
        else:
            cand = round_up(start, seg.align)
            if cand + seg.memsz <= end:
                return cand
    return None


def _take(free: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    out = []
    for a, b in free:
        if b <= start or a >= end:
            out.append((a, b))
            continue
        if a < start:
            out.append((a, start))
        if end < b:
            out.append((end, b))
    return out


# === estimating kernel-reserved memory =========================================================

@dataclass
class ScratchItem:
    label: str
    bytes: int
    note: str = ""


def _crashkernel(values: Sequence[str | None], ram: int) -> tuple[int, int]:
    """(low, high) bytes reserved by crashkernel= (plain, `,high`, `,low`, range list)."""
    low = high = 0
    low_given = False
    wants_high = False
    for value in values:
        if not value:
            continue
        body, _, offset = value.partition("@")
        if body.endswith(",low"):
            low, low_given = _memparse_all(body[:-4]), True
            continue
        if body.endswith(",high"):
            high, wants_high = _memparse_all(body[:-5]), True
            continue
        if body.endswith(",cma"):
            continue  # a CMA area: movable pages, not an early kernel reservation
        size = _crash_range(body, ram) if ":" in body else _memparse_all(body)
        fixed_high = bool(offset) and _memparse_all(offset) > ARCH_LOW_ADDRESS_LIMIT
        if fixed_high:
            high = size
        else:
            low = size
    if wants_high and not low_given:
        low = max(low, CRASH_LOW_DEFAULT)
    return low, high


def memparse(text: str) -> int | None:
    """memparse() over the whole string (reserve_mem=, kho_scratch= fields); None when it does
    not consume all of it."""
    if not text:
        return None
    value, end = _memparse(text, 0)
    return value if end == len(text) else None


def _memparse_all(text: str) -> int:
    value, end = _memparse(text, 0)
    return value if end == len(text) and end > 0 else 0


def _crash_range(body: str, ram: int) -> int:
    """`start-[end]:size[,...]`: the size of the range that holds the RAM size."""
    for part in body.split(","):
        span, _, size = part.partition(":")
        start_text, _, end_text = span.partition("-")
        start = _memparse_all(start_text)
        end = _memparse_all(end_text) if end_text else None
        if ram >= start and (end is None or ram < end):
            return _memparse_all(size)
    return 0


def _swiotlb(info: SysInfo) -> int:
    """swiotlb is set up at boot when RAM reaches above the 32-bit DMA limit."""
    if info.mem_total <= ALL_LOW_MAX_RAM or info.machine not in ("x86_64", "aarch64", "arm64"):
        return 0
    value = info.params.get("swiotlb")
    if value:
        first = value.split(",")[0]
        if first == "noforce":
            return 0
        if first.isdigit() and int(first) > 0:
            return round_up(int(first) * IO_TLB_SLAB_BYTES, 256 * KiB)
    return SWIOTLB_DEFAULT


def _node_shares(info: SysInfo) -> list[tuple[int, int]]:
    """MemTotal split over the nodes with memory in proportion to their own MemTotal (the node
    files can disagree with /proc/meminfo, e.g. under memory ballooning)."""
    if not info.nodes:
        return [(0, info.mem_total)]
    listed = sum(n.mem_total for n in info.nodes)
    if listed == 0:
        return [(n.nid, info.mem_total // len(info.nodes)) for n in info.nodes]
    return [(n.nid, info.mem_total * n.mem_total // listed) for n in info.nodes]


def estimate_reserved(info: SysInfo, running_image: int | None,
                      running_initrd: int | None) -> tuple[KernReserved, list[ScratchItem]]:
    """Estimate what the kernel counted without memblock debugfs: memmap (64 bytes of struct
    page per page of MemTotal), the running kernel image and initrd, swiotlb, crashkernel and the
    other early allocations (see OTHER_FIXED). Returns the counts and their parts."""
    page = info.page_size
    nodes = _node_shares(info)
    first = nodes[0][0]
    all_low = info.mem_total <= ALL_LOW_MAX_RAM
    items: list[ScratchItem] = []
    kern = KernReserved(0, 0, {nid: 0 for nid, _ in nodes})

    def add(label: str, size: int, note: str, nid: int | None, low: bool) -> None:
        if size <= 0:
            return
        items.append(ScratchItem(label, size, note))
        kern.total += size
        if nid is not None:
            kern.per_node[nid] = kern.per_node.get(nid, 0) + size
        if low or all_low:
            kern.low += size

    for nid, mem in nodes:
        add(f"memmap node {nid}", -(-mem // page) * STRUCT_PAGE_BYTES,
            f"{STRUCT_PAGE_BYTES}-byte struct page per {page // KiB} KiB page of {human(mem)}",
            nid, False)
        add(f"other early allocations node {nid}", mem // OTHER_PER_RAM_DIVISOR,
            "hash tables, page tables, per-CPU areas: RAM/1024", nid, False)
    add("other early allocations (fixed)", OTHER_FIXED, "measured on a 2 GiB VM", first, True)
    add("running kernel image", running_image or 0, "in memory (init_size)", first, True)
    add("running initrd", running_initrd or 0, "freed after boot, counted at boot", first, True)
    add("swiotlb bounce buffer", _swiotlb(info), "RAM above 4 GiB needs it below 4 GiB", first,
        True)
    crash_low, crash_high = _crashkernel(param_values(info.cmdline, "crashkernel"),
                                         info.mem_total)
    add("crashkernel (low)", crash_low, "crashkernel= below 4 GiB", first, True)
    add("crashkernel (high)", crash_high, "crashkernel=,high", first, False)
    return kern, items


def derive_from_areas(areas: Sequence[ScratchArea], scale: int,
                      nodes: Sequence[int]) -> KernReserved | None:
    """Invert the kernel's percent sizing: the areas of a cold boot are scale% of what it counted
    (rounded up), so area * 100 / scale is the count, to within the rounding."""
    if scale <= 0 or len(areas) < 2:
        return None
    low = areas[0].size * 100 // scale
    total = (areas[0].size + areas[1].size) * 100 // scale
    per_node = {nid: areas[2 + i].size * 100 // scale
                for i, nid in enumerate(nodes) if 2 + i < len(areas)}
    return KernReserved(low, total, per_node)


# === the plan ==================================================================================

@dataclass
class ScratchPlan:
    reserved: list[ScratchArea]           # the current areas (debugfs); [] when unknown
    reserved_total: int
    recommended: ScratchSizes              # aligned; pernode = the largest node's
    percent: int | None                    # smallest kho_scratch=N% giving >= recommended;
                                           # None when no scale can (an area counts nothing)
    breakdown: list[ScratchItem]           # sums to the recommended total
    warnings: list[str]
    notes: list[str]
    sufficient: bool
    required: ScratchSizes = ScratchSizes(0, 0, 0)
    kernel_default: ScratchSizes = ScratchSizes(0, 0, 0)   # 200% of the counts, as now
    kern: KernReserved = field(default_factory=lambda: KernReserved(0, 0, {}))
    kern_source: str = "memblock"          # "memblock", "areas" (derived) or "estimate"
    estimated: bool = False
    estimate: list[ScratchItem] = field(default_factory=list)
    segments: list[Placement] = field(default_factory=list)
    node_ids: list[int] = field(default_factory=list)
    alignment: int = SCRATCH_ALIGNMENT_BYTES
    margin: float = DEFAULT_MARGIN
    kho_boot: bool = False

    def absolute_form(self) -> str:
        return ScratchParam(sizes=self.recommended).form()

    def percent_form(self) -> str:
        if self.percent is None:
            raise InvalidArgument("no kho_scratch=N% gives the recommended sizes (an area has no "
                                  f"kernel reservations to scale); use {self.absolute_form()}")
        return ScratchParam(scale=self.percent).form()

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["absolute_form"] = self.absolute_form()
        out["percent_form"] = None if self.percent is None else self.percent_form()
        return out


def _margin_of(n: int, margin_ppm: int) -> int:
    return n * margin_ppm // MARGIN_PPM


def smallest_scale(kern: KernReserved, target: AreaSizes, nodes: Sequence[int], align: int,
                   hugetlb: KernReserved | None = None) -> int | None:
    """The smallest kho_scratch=N% whose areas are all at least `target`'s, or None.

    A binary search: every area grows with the scale, except that the global area (s% of the
    total minus s% of the low count, each floored) can shrink by a byte from one scale to the
    next when less than 200 bytes lie above 4 GiB; real hosts have megabytes there or none.
    """
    def enough(scale: int) -> bool:
        got = kernel_scratch_sizes(kern, ScratchParam(scale=scale), nodes=nodes, align=align,
                                   hugetlb=hugetlb)
        return (got.lowmem >= target.lowmem and got.global_ >= target.global_
                and all(got.per_node[n] >= target.per_node.get(n, 0) for n in nodes))

    # Beyond this the kernel's 64-bit products wrap and larger scales give smaller areas.
    hi = min(UINT_MAX, U64_MASK // max(kern.total, 1))
    if not enough(hi):
        return None
    lo = 0
    while lo < hi:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def hugetlb_reserved(info: SysInfo) -> KernReserved:
    """Boot-time HugeTLB memory as 7.3 subtracts it. debugfs cannot show it (the regions print as
    RSV_KERN), so it comes from meminfo; none of it is assumed below 4 GiB."""
    return KernReserved(0, info.hugepages_total, {n.nid: n.hugetlb for n in info.nodes})


def plan_scratch(info: SysInfo, areas: Sequence[ScratchArea], *, kho_boot: bool = False,
                 image_bytes: int | None = None, initrd_bytes: int | None = None,
                 running_image_bytes: int | None = None,
                 running_initrd_bytes: int | None = None,
                 margin: float = DEFAULT_MARGIN,
                 exclude_hugetlb: bool = False) -> ScratchPlan:
    """Plan the scratch areas for the next live update.

    `areas`: the current kho_scratch[] (debugfs out/scratch_phys + scratch_len), [] if unknown.
    `kho_boot`: this boot came through KHO, so the areas were inherited. `image_bytes`: the next
    kernel's in-memory size (bzImage init_size, see image_memory_size()); `initrd_bytes` its
    initrd (0 or None: none). None for the image means the next kernel is unknown.
    `running_*`: the running kernel's, for the estimate (the next kernel's stand in).
    `margin`: a fraction (0.25 = 25%). `exclude_hugetlb`: the next kernel is 7.3 or later and
    leaves boot-time HugeTLB pages out of scratch.
    """
    if margin < 0:
        raise InvalidArgument(f"margin {margin * 100:g}% is negative; give 0 or more")
    margin_ppm = round(margin * MARGIN_PPM)
    image_size, initrd_size = image_bytes, initrd_bytes
    areas = list(areas)
    align = scratch_alignment(info.page_size)
    nids = [n.nid for n in info.nodes] or [0]
    warnings: list[str] = []
    notes: list[str] = list(info.warnings)

    current_param = _current_param(info, warnings)
    kern, source, estimate = _kernel_reserved(info, areas, kho_boot, current_param, nids,
                                              running_image_bytes, running_initrd_bytes,
                                              image_size, initrd_size, notes)
    hugetlb = None
    if exclude_hugetlb:
        hugetlb = hugetlb_reserved(info)
        if hugetlb.total:
            notes.append(f"{human(hugetlb.total)} of HugeTLB pages left out (7.3+ allocates "
                         "boot-time HugeTLB pages outside scratch); this assumes all of them "
                         "were allocated at boot")
    eff = kern.minus(hugetlb) if hugetlb is not None else kern

    segments = (kexec_segments(image_size, initrd_size, len(nids), info.page_size)
                if image_size is not None else [])
    seg_bytes = sum(s.worst_case(info.page_size) for s in segments)
    if image_size is None:
        notes.append("the next kernel is not known (give --kernel and --initrd): its kexec "
                     "segments are neither counted nor checked")

    high = eff.total - eff.low
    required = AreaSizes(round_up(eff.low, align), round_up(high, align),
                         {n: round_up(eff.per_node.get(n, 0), align) for n in nids})
    raw = AreaSizes(2 * eff.low + seg_bytes, 2 * high,
                    {n: 2 * eff.per_node.get(n, 0) for n in nids})
    target = AreaSizes(round_up(raw.lowmem + _margin_of(raw.lowmem, margin_ppm), align),
                       round_up(raw.global_ + _margin_of(raw.global_, margin_ppm), align),
                       {n: round_up(v + _margin_of(v, margin_ppm), align)
                        for n, v in raw.per_node.items()})
    recommended = target.as_sizes()
    percent = smallest_scale(eff, target, nids, align)
    if percent is None:
        warnings.append("no kho_scratch=N% gives the recommended sizes: an area has no kernel "
                        "reservations to scale; use the absolute form "
                        f"{ScratchParam(sizes=recommended).form()}")
    kernel_default = kernel_scratch_sizes(kern, None, nodes=nids, align=align,
                                          hugetlb=hugetlb).as_sizes()
    breakdown = _breakdown(eff, raw, recommended, segments, seg_bytes, nids, margin_ppm,
                           align, source)

    placements = place_segments(segments, areas) if areas else []
    sufficient = bool(areas)
    if areas:
        sufficient &= _check_areas(areas, required, target, nids, warnings, notes)
        sufficient &= _check_fit(placements, warnings)
    else:
        if not kho_boot and not kho_enabled(info):
            notes.append("KHO is off on this boot (no kho=on on the command line), so there are "
                         "no scratch areas: boot with kho=on and the kho_scratch= below")
        warnings.append("the current scratch areas are unknown (no KHO debugfs), so their sizes "
                        "and the fit of the next kernel cannot be checked")
        if segments:
            check = place_segments(segments, _layout(recommended, nids))
            _check_fit(check, warnings)
    if kho_boot:
        notes.append("this boot came through KHO: the scratch areas were inherited from the "
                     "previous kernel and are handed on unchanged; a new kho_scratch= takes "
                     "effect only after a cold boot")
    return ScratchPlan(
        reserved=areas, reserved_total=sum(a.size for a in areas), recommended=recommended,
        percent=percent, breakdown=breakdown, warnings=warnings, notes=notes,
        sufficient=sufficient, required=required.as_sizes(), kernel_default=kernel_default,
        kern=kern, kern_source=source, estimated=source != "memblock", estimate=estimate,
        segments=placements, node_ids=nids, alignment=align, margin=margin_ppm / MARGIN_PPM,
        kho_boot=kho_boot)


def _current_param(info: SysInfo, warnings: list[str]) -> ScratchParam | None:
    if "kho_scratch" not in info.params:
        return None
    try:
        return parse_kho_scratch(info.params["kho_scratch"])
    except InvalidArgument as exc:
        warnings.append(f"the current command line's {exc.message}")
        return None


def _kernel_reserved(info: SysInfo, areas: list[ScratchArea], kho_boot: bool,
                     param: ScratchParam | None, nids: list[int], running_image: int | None,
                     running_initrd: int | None, next_image: int | None, next_initrd: int | None,
                     notes: list[str]) -> tuple[KernReserved, str, list[ScratchItem]]:
    regions = info.memblock_reserved
    if regions and any(KERN_FLAGS.intersection(r.flags) for r in regions):
        kern = count_reserved(regions, exclude=[(a.phys, a.size) for a in areas])
        notes.append("kernel-reserved memory counted from memblock/reserved as it is now, after "
                     "boot (memory freed since scratch was sized, such as the initrd, is not in "
                     "it; the next kernel's image and initrd are added separately)")
        return kern, "memblock", []
    if regions is not None:
        notes.append("memblock/reserved shows no RSV_KERN regions (a kernel before KHO): "
                     "kernel-reserved memory is estimated")
    scale = DEFAULT_SCALE if param is None or param.scale is None else param.scale
    if (areas and not kho_boot and (param is None or param.sizes is None)
            and len(areas) == len(nids) + 2):
        derived = derive_from_areas(areas, scale, nids)
        if derived is not None:
            notes.append(f"kernel-reserved memory derived from the scratch areas this kernel "
                         f"sized at boot with scale {scale}% (area x 100 / {scale}, to within "
                         "the alignment); estimated, memblock debugfs is not available")
            return derived, "areas", []
    notes.append("kernel-reserved memory estimated from MemTotal (memblock debugfs is not "
                 "available, as on x86 without CONFIG_ARCH_KEEP_MEMBLOCK); see the estimate")
    for what, running, proxy in (("image", running_image, next_image),
                                 ("initrd", running_initrd, next_initrd)):
        if running is None and proxy is not None:
            notes.append(f"the running kernel's {what} is not known: the next kernel's stands in "
                         "for it in the estimate")
        elif running is None:
            notes.append(f"the running kernel's {what} is not known and not in the estimate")
    kern, items = estimate_reserved(info, running_image if running_image is not None
                                    else next_image,
                                    running_initrd if running_initrd is not None
                                    else next_initrd)
    return kern, "estimate", items


def _layout(sizes: ScratchSizes, nids: Sequence[int]) -> list[ScratchArea]:
    """Recommended areas at made-up, aligned addresses, to check that the segments fit."""
    out = []
    phys = 1 << 32  # any aligned address above the loaders' minimums
    roles = ["lowmem", "global", *(f"node {i}" for i in range(len(nids)))]
    for role, size in zip(roles, [sizes.lowmem, sizes.global_] + [sizes.pernode] * len(nids),
                          strict=True):
        out.append(ScratchArea(phys, size, role))
        phys += size + (1 << 30)
    return out


def _breakdown(eff: KernReserved, raw: AreaSizes, rec: ScratchSizes,
               segments: list[KexecSegment], seg_bytes: int, nids: list[int],
               margin_ppm: int, align: int, source: str) -> list[ScratchItem]:
    how = {"memblock": "counted in memblock/reserved", "areas": "derived from the areas",
           "estimate": "estimated"}[source]
    items = [ScratchItem("lowmem: kernel-reserved below 4 GiB x2", 2 * eff.low,
                         f"{human(eff.low)} {how}; the kernel's default scale is 200%")]
    if segments:
        parts = ", ".join(f"{s.label} {human(s.memsz)}" for s in segments)
        items.append(ScratchItem("lowmem: next kernel's kexec segments", seg_bytes,
                                 f"{parts}, with alignment padding; kexec places them in the "
                                 "lowmem area first"))
    items.append(ScratchItem("global: kernel-reserved above 4 GiB x2", raw.global_,
                             f"{human(raw.global_ // 2)} {how}"))
    for n in nids:
        items.append(ScratchItem(f"node {n}: kernel-reserved on node {n} x2", raw.per_node[n],
                                 f"{human(raw.per_node[n] // 2)} {how}"))
    largest = max(raw.per_node.values(), default=0)
    equalise = largest * len(nids) - sum(raw.per_node.values())
    if equalise:
        items.append(ScratchItem("pernode: every node gets the largest node's size", equalise,
                                 "kho_scratch= has a single per-node size"))
    margined = [raw.lowmem, raw.global_] + [largest] * len(nids)
    margin = sum(_margin_of(n, margin_ppm) for n in margined)
    items.append(ScratchItem(f"margin {margin_ppm * 100 / MARGIN_PPM:g}%", margin,
                             "headroom for a larger next kernel, more memory by then, and what "
                             "this count cannot see"))
    total = rec.total(len(nids))
    items.append(ScratchItem(f"alignment: each area rounded up to {human(align)}",
                             total - sum(i.bytes for i in items),
                             "SCRATCH_ALIGNMENT_BYTES = PAGE_SIZE << MAX_PAGE_ORDER"))
    return items


def _check_areas(areas: list[ScratchArea], required: AreaSizes, target: AreaSizes,
                 nids: list[int], warnings: list[str], notes: list[str]) -> bool:
    ok = True
    if len(areas) != len(nids) + 2:
        notes.append(f"{len(areas)} scratch areas for {len(nids)} NUMA node(s) with memory "
                     f"(expected {len(nids) + 2}); node areas are compared with the largest "
                     "node's needs")
    for i, area in enumerate(areas):
        if i == 0:
            need, want = required.lowmem, target.lowmem
        elif i == 1:
            need, want = required.global_, target.global_
        elif len(areas) == len(nids) + 2:
            nid = nids[i - 2]
            need, want = required.per_node[nid], target.per_node[nid]
        else:
            need = max(required.per_node.values(), default=0)
            want = max(target.per_node.values(), default=0)
        if area.size < need:
            ok = False
            warnings.append(f"{area.role} scratch area is {human(area.size)}, "
                            f"{human(need - area.size)} smaller than the {human(need)} this "
                            "kernel's own reservations take there: the next boot may run out of "
                            "scratch memory")
        elif area.size < want:
            notes.append(f"{area.role} scratch area is {human(area.size)}, "
                         f"{human(want - area.size)} below the recommended {human(want)}: enough "
                         "for one copy of this kernel's reservations, with less headroom")
    return ok


def _check_fit(placements: list[Placement], warnings: list[str]) -> bool:
    ok = True
    for p in placements:
        if p.area is None:
            ok = False
            warnings.append(f"the next kernel's {p.segment.label} ({human(p.segment.memsz)}) "
                            "does not fit into any scratch area next to the other segments: "
                            "kexec_file_load would fail with EADDRNOTAVAIL")
    return ok
