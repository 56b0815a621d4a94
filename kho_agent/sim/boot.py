"""What a simulated kernel decides at boot: its command line (kstrtobool, `kho_scratch=`,
`reserve_mem=`), its memblock reservations, and the KHO scratch areas (docs/kernel-abi.md
§5.1-§5.5).

Physical memory is one contiguous range per NUMA node starting at 0. Reservations follow the
x86 shape: firmware below 1 MiB, the kernel image at 16 MiB, memmap and per-node kernel data at
the top of each node (all RSRV_KERN), `reserve_mem=` regions top-down; then the scratch areas,
sized by the default algorithm (§5.4) or `kho_scratch=` and allocated top-down (§5.5).

The kernel's rules come from the kernel seams the engine uses too: the command line is split by
kernel/params.py, `kho_scratch=` parsed and the areas sized by kernel/kho_scratch.py. What is
the simulator's own is the machine: its memory, its reservations, where the areas land.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidArgument
from ..kernel import kho_scratch
from ..kernel.kho_scratch import (
    ARCH_LOW_ADDRESS_LIMIT,
    DEFAULT_SCALE,
    SCRATCH_ALIGNMENT_BYTES,
    KernReserved,
    ScratchParam,
    kernel_scratch_sizes,
    round_up,
)
from ..kernel.params import kstrtobool, memparse, split

MiB = 1 << 20
PAGE_SIZE = 4096
KERNEL_BASE = 16 * MiB
KERNEL_SIZE = 40 * MiB           # text, data and bss of a distribution-sized kernel
NODE_KERNEL_DATA = 4 * MiB       # page tables, per-cpu areas and friends, per node
FIRMWARE_SIZE = 1 * MiB

# memblock region flags (include/linux/memblock.h) and the names memblock_debug_show() prints
# for the lowest set bit
FLAG_NONE = 0
FLAG_RSRV_NOINIT = 0x10
FLAG_RSRV_KERN = 0x20
FLAG_NAMES = {0x1: "HOTPLUG", 0x2: "MIRROR", 0x4: "NOMAP", 0x8: "DRV_MNG",
              0x10: "RSV_NIT", 0x20: "RSV_KERN", 0x40: "KHO_SCRATCH"}


def parse_kho_scratch(value: str | None) -> ScratchParam | None:
    """kho_parse_scratch_size() (kernel/kho_scratch.py); None for a malformed value (the kernel
    logs it and keeps its defaults)."""
    if not value:
        return None
    try:
        return kho_scratch.parse_kho_scratch(value)
    except InvalidArgument:
        return None


@dataclass(frozen=True)
class ReserveMem:
    name: str
    size: int
    align: int


@dataclass(frozen=True)
class Cmdline:
    text: str
    kho: bool
    liveupdate: bool
    scratch: ScratchParam
    reserve_mem: tuple[ReserveMem, ...]
    malformed: tuple[str, ...]  # early options the kernel would log as malformed

    @property
    def luo(self) -> bool:
        """LUO runs only with KHO on (it disables itself otherwise)."""
        return self.kho and self.liveupdate


def parse_cmdline(text: str) -> Cmdline:
    """The early parameters this kernel reads, word by word as next_arg() splits the line."""
    kho = liveupdate = False
    scratch = ScratchParam(scale=DEFAULT_SCALE)
    regions: list[ReserveMem] = []
    malformed: list[str] = []
    for w in split(text).words:
        key, raw, word = w.name, w.value, w.raw
        if key == "kho":
            parsed = kstrtobool(raw)
            if parsed is None:
                malformed.append(word)
            else:
                kho = parsed
        elif key == "liveupdate":
            parsed = kstrtobool(raw)
            if parsed is None:
                malformed.append(word)
            else:
                liveupdate = parsed
        elif key == "kho_scratch":
            spec = parse_kho_scratch(raw)
            if spec is None:
                malformed.append(word)
            else:
                scratch = spec
        elif key == "reserve_mem":
            region = _parse_reserve_mem(raw or "")
            if region is None or any(r.name == region.name for r in regions):
                malformed.append(word)
            else:
                regions.append(region)
    return Cmdline(text, kho, liveupdate, scratch, tuple(regions), tuple(malformed))


def _parse_reserve_mem(value: str) -> ReserveMem | None:
    """reserve_mem=SIZE:ALIGN:NAME."""
    parts = value.split(":")
    if len(parts) != 3 or not parts[2]:
        return None
    size, align = memparse(parts[0]), memparse(parts[1])
    if not size or align is None or (align and align & (align - 1)):
        return None
    return ReserveMem(parts[2], round_up(size, PAGE_SIZE), max(align, PAGE_SIZE))


@dataclass(frozen=True)
class Region:
    base: int
    size: int
    nid: int
    flags: int

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True)
class Scratch:
    phys: int
    size: int


class Memblock:
    """memblock.memory (one range per node) and memblock.reserved, with top-down allocation."""

    def __init__(self, memory_mib: int, nodes: int) -> None:
        if nodes < 1:
            raise InvalidArgument("a simulated machine needs at least one NUMA node")
        per_node = (memory_mib * MiB // nodes) // (128 * MiB) * (128 * MiB)
        if per_node < 256 * MiB:
            raise InvalidArgument(f"{memory_mib} MiB over {nodes} node(s) leaves less than "
                                  "256 MiB per node; give more memory_mib or fewer nodes")
        self.nodes = [(i * per_node, per_node) for i in range(nodes)]
        self.reserved: list[Region] = []

    @property
    def total(self) -> int:
        return sum(size for _, size in self.nodes)

    def node_of(self, phys: int) -> int:
        for nid, (base, size) in enumerate(self.nodes):
            if base <= phys < base + size:
                return nid
        return 0

    def reserve(self, base: int, size: int, flags: int, nid: int | None = None) -> None:
        if size:
            self.reserved.append(Region(base, size, self.node_of(base) if nid is None else nid,
                                        flags))

    def _free_gaps(self, lo: int, hi: int, avoid: list[tuple[int, int]]) -> list[tuple[int, int]]:
        busy = sorted([(r.base, r.end) for r in self.reserved]
                      + [(b, b + s) for b, s in avoid if s])
        gaps: list[tuple[int, int]] = []
        pos = lo
        for start, end in busy:
            if end <= pos:
                continue
            if start >= hi:
                break
            if start > pos:
                gaps.append((pos, min(start, hi)))
            pos = max(pos, end)
        if pos < hi:
            gaps.append((pos, hi))
        return gaps

    def alloc(self, size: int, align: int, *, lo: int = 0, hi: int | None = None,
              nid: int | None = None, flags: int = FLAG_RSRV_KERN,
              within: list[tuple[int, int]] | None = None) -> int | None:
        """memblock_alloc_range_nid(), top-down: the highest aligned fit, or None. `within`
        restricts the search to those ranges (scratch-only mode on a KHO boot)."""
        ranges = [self.nodes[nid]] if nid is not None else self.nodes
        windows: list[tuple[int, int]] = []
        for base, length in ranges:
            w_lo, w_hi = max(base, lo), min(base + length, hi if hi is not None else 1 << 64)
            if within is None:
                windows.append((w_lo, w_hi))
            else:
                windows += [(max(w_lo, a), min(w_hi, a + s)) for a, s in within
                            if max(w_lo, a) < min(w_hi, a + s)]
        candidates: list[int] = []
        for w_lo, w_hi in windows:
            for g_lo, g_hi in self._free_gaps(w_lo, w_hi, []):
                base = (g_hi - size) // align * align
                if base >= g_lo:
                    candidates.append(base)
        if not candidates:
            return None
        base = max(candidates)
        self.reserve(base, size, flags, nid)
        return base

    def free_ranges(self, avoid: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """Memory neither reserved nor in `avoid`, bottom-up."""
        out: list[tuple[int, int]] = []
        for base, size in self.nodes:
            out += self._free_gaps(base, base + size, avoid)
        return out

    def merged(self) -> list[Region]:
        """The reserved array as memblock keeps it: sorted, adjacent same-flag regions merged."""
        out: list[Region] = []
        for r in sorted(self.reserved, key=lambda r: r.base):
            if out and out[-1].end == r.base and out[-1].flags == r.flags \
                    and out[-1].nid == r.nid:
                last = out.pop()
                r = Region(last.base, last.size + r.size, r.nid, r.flags)
            out.append(r)
        return out

    def kern_size(self, limit: int | None = None, nid: int | None = None) -> int:
        """memblock_reserved_kern_size(): RSRV_KERN regions starting at or below `limit`, of node
        `nid` (any node when None). A region reaching past `limit` counts `limit - base`: the
        byte at the limit itself is left out, so one ending exactly at 4 GiB loses a byte and
        the global area, computed from the difference, becomes one alignment unit."""
        total = 0
        for r in self.reserved:
            if not r.flags & FLAG_RSRV_KERN or (nid is not None and r.nid != nid):
                continue
            if limit is None:
                total += r.size
            elif r.base <= limit:
                total += (limit - r.base) if r.end > limit else r.size
        return total


def scratch_sizes(mb: Memblock, param: ScratchParam) -> tuple[int, int, list[int]]:
    """(lowmem, global, per-node) sizes by the kernel's algorithm (§5.4,
    kernel/kho_scratch.py)."""
    nodes = range(len(mb.nodes))
    kern = KernReserved(mb.kern_size(ARCH_LOW_ADDRESS_LIMIT), mb.kern_size(),
                        {n: mb.kern_size(nid=n) for n in nodes})
    sizes = kernel_scratch_sizes(kern, param, nodes=nodes, align=SCRATCH_ALIGNMENT_BYTES)
    return sizes.lowmem, sizes.global_, [sizes.per_node[n] for n in nodes]


def _area(mb: Memblock, size: int, *, hi: int | None = None, nid: int | None = None) -> Scratch:
    if size == 0:
        # a zero-sized area is "allocated" as such: an address, nothing reserved
        gaps = [g for base, length in ([mb.nodes[nid]] if nid is not None else mb.nodes)
                for g in mb._free_gaps(base, min(base + length, hi or 1 << 64), [])]
        top = max((g_hi for _, g_hi in gaps), default=0)
        return Scratch(top // SCRATCH_ALIGNMENT_BYTES * SCRATCH_ALIGNMENT_BYTES, 0)
    phys = mb.alloc(size, SCRATCH_ALIGNMENT_BYTES, hi=hi, nid=nid)
    if phys is None:
        where = "below 4 GiB" if hi is not None else (f"on node {nid}" if nid is not None
                                                       else "anywhere")
        raise InvalidArgument(f"cannot place a {size >> 20} MiB KHO scratch area {where}: "
                              "the kernel would disable KHO ('Failed to reserve scratch area'); "
                              "give more memory_mib or a smaller kho_scratch=")
    return Scratch(phys, size)


def cold_layout(memory_mib: int, nodes: int,
                cmd: Cmdline) -> tuple[Memblock, list[Scratch], dict[str, int]]:
    """memblock reservations, scratch areas (only with KHO on) and reserve_mem region addresses
    of a cold boot."""
    mb = Memblock(memory_mib, nodes)
    mb.reserve(0, FIRMWARE_SIZE, FLAG_NONE, 0)
    mb.reserve(KERNEL_BASE, KERNEL_SIZE, FLAG_RSRV_KERN, 0)
    _node_data(mb, None)
    regions: dict[str, int] = {}
    for region in cmd.reserve_mem:
        phys = mb.alloc(region.size, region.align)
        if phys is None:
            raise InvalidArgument(f"reserve_mem region {region.name!r} ({region.size} bytes) "
                                  "does not fit in the simulated memory")
        regions[region.name] = phys
    if not cmd.kho:
        return mb, [], regions
    lowmem, glob, per = scratch_sizes(mb, cmd.scratch)
    areas = [_area(mb, lowmem, hi=ARCH_LOW_ADDRESS_LIMIT + 1), _area(mb, glob)]
    areas += [_area(mb, size, nid=n) for n, size in enumerate(per)]
    return mb, areas, regions


def _node_data(mb: Memblock, within: list[tuple[int, int]] | None) -> bool:
    """memmap (64 bytes per page) and per-node kernel data, top-down; False if they do not fit
    (on a KHO boot: in scratch)."""
    for nid, (_, size) in enumerate(mb.nodes):
        for chunk in (size // 64, NODE_KERNEL_DATA):
            if mb.alloc(chunk, PAGE_SIZE, nid=nid if within is None else None,
                        within=within) is None:
                return False
    return True


def kho_layout(memory_mib: int, nodes: int, cmd: Cmdline, scratch: list[Scratch],
               preserved: list[tuple[int, int]],
               revived: dict[str, int]) -> tuple[Memblock, dict[str, int]] | str:
    """memblock of a KHO boot: early allocations confined to the inherited scratch (§5.5),
    preserved ranges reserved as RSV_NIT, reserve_mem regions revived at their old address when
    `revived` has them. Returns the layout and the region addresses, or a panic message when the
    kernel's own early allocations do not fit in scratch."""
    mb = Memblock(memory_mib, nodes)
    mb.reserve(0, FIRMWARE_SIZE, FLAG_NONE, 0)
    for base, size in preserved:
        mb.reserve(base, size, FLAG_RSRV_NOINIT)
    within = [(s.phys, s.size) for s in scratch if s.size]
    if mb.alloc(KERNEL_SIZE, 2 * MiB, within=within) is None or not _node_data(mb, within):
        return ("Kernel panic - not syncing: early memory allocation failed: the KHO scratch "
                "areas are too small for this kernel's boot allocations (kho_scratch=)")
    regions: dict[str, int] = {}
    for region in cmd.reserve_mem:
        if region.name in revived:
            regions[region.name] = revived[region.name]  # already reserved as preserved
            continue
        # reserve_mem_init() allocates in scratch-only mode on a KHO boot (a TODO in the
        # kernel source); the region then lands inside a scratch area.
        phys = mb.alloc(region.size, region.align, within=within)
        if phys is None:
            return (f"Kernel panic - not syncing: reserve_mem {region.name!r} cannot be "
                    "allocated in the KHO scratch areas")
        regions[region.name] = phys
    return mb, regions


def memblock_debugfs(mb: Memblock) -> str:
    """sys/kernel/debug/memblock/reserved as memblock_debug_show() prints it."""
    lines = []
    for i, r in enumerate(mb.merged()):
        flag = next((name for bit, name in sorted(FLAG_NAMES.items()) if r.flags & bit),
                    "UNKNOWN" if r.flags else "NONE")
        lines.append(f"{i:4d}: 0x{r.base:016x}..0x{r.end - 1:016x} {r.nid:4d} {flag}\n")
    return "".join(lines)
