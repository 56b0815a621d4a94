"""The KHO scratch areas by the kernel's rules: the `kho_scratch=` grammar (docs/kernel-abi.md
§5.3) and the sizes a cold boot reserves (§5.4). Pure: no I/O.

A KHO boot allocates early memory only from the scratch areas it inherits: one below 4 GiB
(lowmem), one anywhere (global), one per NUMA node with memory. A cold boot with KHO on reserves
them, sized by `kho_scratch=` or by default at 200% of its own kernel-flagged memblock
reservations (MEMBLOCK_RSRV_KERN: memmap, page tables, kernel image, initrd, swiotlb,
crashkernel...). The engine's recommendation (engine/scratch_plan.py) and the simulated kernel
(sim/boot.py) both size areas with this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import InvalidArgument
from .params import U64_MASK, memparse_prefix
from .sysinfo import MemblockRegion

UINT_MAX = (1 << 32) - 1
MAX_PAGE_ORDER = 10                       # default on x86-64 and 4K-page arm64
SCRATCH_ALIGNMENT_BYTES = 4096 << MAX_PAGE_ORDER   # PAGE_SIZE << MAX_PAGE_ORDER: 4 MiB on x86-64
ARCH_LOW_ADDRESS_LIMIT = 0xFFFFFFFF       # x86 (generic default); arm64 uses its DMA limit - 1
DEFAULT_SCALE = 200                       # the kernel's scratch_scale
SCRATCH_ENTRY_BYTES = 16                  # struct kho_scratch { phys_addr_t addr, size; }

# memblock flags that mark kernel use. RSV_NIT is counted too: debugfs names only the lowest set
# flag, and RSRV_NOINIT regions are memblock allocations (so also RSRV_KERN) whose struct pages
# are initialised late, e.g. boot-time HugeTLB pages with HVO.
KERN_FLAGS = frozenset({"RSV_KERN", "RSV_NIT"})

# What debugfs prints for the incoming preserved memory on a KHO boot:
# kho_preserved_memory_reserve() (kernel/liveupdate/kexec_handover.c) calls memblock_reserve(),
# which adds no flag (only memblock_reserve_kern() and memblock allocations set
# MEMBLOCK_RSRV_KERN), then memblock_reserved_mark_noinit(): the region's flags are
# MEMBLOCK_RSRV_NOINIT alone. So the kernel's own sizing (memblock_reserved_kern_size()) never
# counts preserved memory; debugfs cannot show that, as it names only the lowest set flag
# (HugeTLB pages with HVO, which are RSRV_KERN too, also print as RSV_NIT).
PRESERVED_FLAG = "RSV_NIT"

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
        size, end = memparse_prefix(value, pos)
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


def _outside(base: int, end: int, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """[base, end) minus `ranges`, as (base, size) pieces."""
    pieces = [(base, end)]
    for r_start, r_size in ranges:
        r_end = r_start + r_size
        pieces = [part for a, b in pieces
                  for part in ((a, min(b, r_start)), (max(a, r_end), b)) if part[0] < part[1]]
    return [(a, b - a) for a, b in pieces]


def incoming_preserved(regions: Sequence[MemblockRegion],
                       areas: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """On a KHO boot: the incoming preserved memory in memblock/reserved, as (base, size).

    The kernel reserves every preserved block as MEMBLOCK_RSRV_NOINIT without RSRV_KERN (see
    PRESERVED_FLAG), and preserved memory never lies in the scratch areas (they are CMA, which
    holds no pinned page; KEXEC_HANDOVER_DEBUG refuses to preserve there). So the RSV_NIT
    regions, outside the scratch areas `areas` (phys, size), are what the previous kernel handed
    over. An RSV_NIT region inside an area is this kernel's own allocation (HugeTLB with HVO,
    made in scratch-only mode) and is not taken. On 7.3, boot-time HugeTLB pages that the
    scratch extension (kho_extend_scratch()) let land outside the areas print the same way and
    are taken too; 7.3's own sizing leaves those pages out as well.
    """
    out: list[tuple[int, int]] = []
    for r in regions:
        if r.flags == (PRESERVED_FLAG,):
            out += _outside(r.base, r.end, areas)
    return out


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
