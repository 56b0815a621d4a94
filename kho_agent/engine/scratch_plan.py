"""The KHO scratch recommendation: what the next boot needs and what to put on the command line
(like `kdumpctl estimate` for kdump). Pure: SysInfo and sizes in, a plan out.

The kernel's rules it applies are the kernel seams' (docs/kernel-abi.md §5.3-5.5): the
`kho_scratch=` grammar and the sizes a cold boot reserves (kernel/kho_scratch.py), where
kexec_file_load puts the next kernel's segments, each in the first scratch area with room, failing
with EADDRNOTAVAIL when one does not fit (kernel/kexec_placement.py), crashkernel=
(kernel/crashkernel.py) and the memory a kernel image takes (kernel/image.py). This module adds
what the engine judges: how much the kernel reserves when memblock debugfs cannot say, the margin,
and the warnings.

The plan works per area:

    required     one copy of this kernel's reservations in that area (the next kernel's early
                 allocations mirror them); below it the next boot is expected to run out of
                 scratch, so the plan is not sufficient
    recommended  the kernel's own 200% of the reservations, plus the next kernel's segments in
                 the lowmem area (where kexec places them first), plus the margin, rounded up to
                 SCRATCH_ALIGNMENT_BYTES

and checks that the segments fit into the current areas the way the kernel places them.

On a KHO boot the areas were inherited (not reserved in memblock), so this kernel's own
allocations inside them count, and the memory the previous kernel preserved (RSV_NIT outside
the areas, never RSRV_KERN) does not: it is no early allocation of the next boot, and the
kernel never sizes scratch by it (docs/kernel-abi.md §5.5). As the areas stay until the next
cold boot, the plan also gives the largest initrd they take next to this kernel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..abi.kho_state import ScratchArea
from ..errors import InvalidArgument
from ..kernel.crashkernel import crashkernel_sizes
from ..kernel.kexec_placement import KexecSegment, Placement, kexec_segments, place_segments
from ..kernel.kho_scratch import (
    DEFAULT_SCALE,
    KERN_FLAGS,
    SCRATCH_ALIGNMENT_BYTES,
    UINT_MAX,
    AreaSizes,
    KernReserved,
    ScratchParam,
    ScratchSizes,
    count_reserved,
    incoming_preserved,
    kernel_scratch_sizes,
    parse_kho_scratch,
    round_up,
    scratch_alignment,
)
from ..kernel.params import U64_MASK, param_values
from ..kernel.sysinfo import SysInfo, kho_enabled

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

# The margin on top of the kernel's own 200%: the next kernel may be larger than the one measured
# here (new features, a bigger initrd), memory may have been added by the next boot, and the
# count cannot see everything (memory freed since boot, an IMA measurement-list segment, the
# copy KASLR makes when it moves the decompressed kernel inside scratch). A quarter more keeps
# the kernel's designed 2x headroom intact after those, at a cost of a few percent of RAM.
DEFAULT_MARGIN = 0.25
DEFAULT_MARGIN_PERCENT = 25
MARGIN_PPM = 1_000_000
STRUCT_PAGE_BYTES = 64                    # sizeof(struct page) on 64-bit without debug options

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
ALL_LOW_MAX_RAM = 3 * GiB                 # below this a PC has (nearly) no RAM above 4 GiB


def human(n: int) -> str:
    """A size for people: MiB with one decimal (KiB below 1 MiB, GiB from 10 GiB)."""
    if abs(n) >= 10 * GiB:
        return f"{n / GiB:.1f} GiB"
    if 0 < abs(n) < MiB:
        return f"{n / KiB:.0f} KiB"
    return f"{n / MiB:.1f} MiB"


# === estimating kernel-reserved memory =========================================================

@dataclass
class ScratchItem:
    label: str
    bytes: int
    note: str = ""


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
    crash_low, crash_high = crashkernel_sizes(param_values(info.cmdline, "crashkernel"),
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
    required: ScratchSizes = field(default_factory=lambda: ScratchSizes(0, 0, 0))
    kernel_default: ScratchSizes = field(                   # 200% of the counts, as now
        default_factory=lambda: ScratchSizes(0, 0, 0))
    kern: KernReserved = field(default_factory=lambda: KernReserved(0, 0, {}))
    kern_source: str = "memblock"          # "memblock", "areas" (derived) or "estimate"
    estimated: bool = False
    estimate: list[ScratchItem] = field(default_factory=list)
    segments: list[Placement] = field(default_factory=list)
    node_ids: list[int] = field(default_factory=list)
    alignment: int = SCRATCH_ALIGNMENT_BYTES
    margin: float = DEFAULT_MARGIN
    kho_boot: bool = False
    preserved_left_out: int = 0            # KHO boot: incoming preserved memory not counted
    initrd_limit: int | None = None        # the largest initrd that fits the current areas
                                           # next to this kernel; None: not known

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
    kernel's in-memory size (bzImage init_size, see kernel/image.py image_memory_size());
    `initrd_bytes` its initrd (0 or None: none). None for the image means the next kernel is
    unknown.
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
    kern, source, estimate, preserved = _kernel_reserved(
        info, areas, kho_boot, current_param, nids, running_image_bytes, running_initrd_bytes,
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
    initrd_limit = None
    if areas:
        sufficient &= _check_areas(areas, required, target, nids, warnings, notes)
        sufficient &= _check_fit(placements, warnings)
        if image_size is not None:
            initrd_limit = largest_initrd(areas, image_size, len(nids), info.page_size)
            if sufficient and initrd_limit is not None:
                _chain_headroom(image_size, initrd_size or 0, initrd_limit, margin_ppm,
                                kho_boot, ScratchParam(sizes=recommended).form(), warnings,
                                notes)
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
        kho_boot=kho_boot, preserved_left_out=preserved, initrd_limit=initrd_limit)


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
                     notes: list[str]) -> tuple[KernReserved, str, list[ScratchItem], int]:
    """What the next boot's early allocations take in scratch: its source, the estimate's
    items, and the bytes of incoming preserved memory left out (KHO boot, memblock only)."""
    regions = info.memblock_reserved
    if regions and any(KERN_FLAGS.intersection(r.flags) for r in regions):
        spans = [(a.phys, a.size) for a in areas]
        preserved = 0
        if kho_boot:
            # The areas were inherited, not allocated: they are not in memblock.reserved, and
            # what this kernel allocated inside them is what the next boot needs there. The
            # preserved memory that came in is reserved too but is no kernel allocation, never
            # lies in scratch and is not what the next kernel sizes or needs: leave it out.
            incoming = incoming_preserved(regions, spans)
            preserved = sum(size for _, size in incoming)
            kern = count_reserved(regions, exclude=incoming)
            if preserved:
                notes.append(f"{human(preserved)} of memory preserved by the previous kernel "
                             "(RSV_NIT outside the scratch areas in memblock/reserved) is not "
                             "counted: it is no kernel allocation, never lies in scratch, and "
                             "stays listed for the whole boot even after its sessions finish")
        else:
            kern = count_reserved(regions, exclude=spans)
        notes.append("kernel-reserved memory counted from memblock/reserved as it is now, after "
                     "boot (memory freed since scratch was sized, such as the initrd, is not in "
                     "it; the next kernel's image and initrd are added separately)")
        return kern, "memblock", [], preserved
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
            return derived, "areas", [], 0
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
    return kern, "estimate", items, 0


def largest_initrd(areas: Sequence[ScratchArea], image_size: int, node_count: int,
                   page_size: int) -> int | None:
    """The largest initrd that kexec_file_load() places in `areas` next to a kernel of
    `image_size` (a binary search over kernel/kexec_placement.py's placement), or None when
    the kernel alone does not fit."""
    def fits(initrd: int) -> bool:
        return all(p.area is not None for p in place_segments(
            kexec_segments(image_size, initrd, node_count, page_size), areas))

    if not fits(0):
        return None
    lo, hi = 0, sum(a.size for a in areas) // page_size + 1    # pages: lo fits, hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid * page_size):
            lo = mid
        else:
            hi = mid
    return lo * page_size


def _chain_headroom(image: int, initrd: int, limit: int, margin_ppm: int, kho_boot: bool,
                    form: str, warnings: list[str], notes: list[str]) -> None:
    """Every live update until the next cold boot inherits these areas unchanged, so a next
    kernel that outgrows them can only be reached by a cold boot: say how far they go, as a
    warning when a kernel and initrd larger by the margin would not fit."""
    since = "inherited since the last cold boot" if kho_boot else "sized at this cold boot"
    this = human(initrd) if initrd else "none"
    text = (f"the scratch areas ({since}) stay unchanged through every live update until the "
            f"next cold boot: with a {human(image)} kernel they take an initrd of at most "
            f"{human(limit)} (this one: {this}); a larger one will not load (EADDRNOTAVAIL) "
            "and then only a cold boot helps")
    if image + limit < image + initrd + _margin_of(image + initrd, margin_ppm):
        warnings.append(f"{text}; to leave room, boot cold with {form}")
    else:
        notes.append(text)


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
