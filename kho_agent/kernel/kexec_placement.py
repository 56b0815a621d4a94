"""Where kexec_file_load() puts the next kernel when KHO is on (docs/kernel-abi.md §5.5). Pure:
no I/O.

With KHO enabled, every segment of a normal (non-crash) image goes inside the scratch areas:
kho_locate_mem_hole() walks kho_scratch[] and takes the first area with an aligned hole, and the
load fails with EADDRNOTAVAIL when a segment fits nowhere. The segments, in the kernel's order:
the scratch array (kho_fill_kimage()), then the x86 bzImage64 loader's purgatory, boot params,
kernel and initrd (arm64 is close). The engine predicts the fit with this module
(kho_agent/engine/scratch_plan.py) and the simulated kernel decides its loads by it (sim/kexec.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..abi.kho_state import ScratchArea
from .kho_scratch import SCRATCH_ENTRY_BYTES, round_up

KiB = 1 << 10
MiB = 1 << 20

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
                   page_size: int = 4096, *, boot_data: int = BOOT_DATA_ALLOWANCE,
                   purgatory: int = PURGATORY_ALLOWANCE) -> list[KexecSegment]:
    """The segments kexec_file_load() places for the next kernel, in the kernel's order:
    kho_fill_kimage() adds the scratch array first, then the x86 bzImage64 loader adds
    purgatory, boot params, kernel and initrd. `image_size` is the kernel segment's memory size
    (kernel/image.py image_memory_size()); `boot_data` and `purgatory` default to allowances
    that bound them on real hosts."""
    def page(n: int) -> int:
        return round_up(n, page_size)

    segments = [
        KexecSegment("scratch array", page(SCRATCH_ENTRY_BYTES * (node_count + 2)),
                     SCRATCH_ARRAY_ALIGN),
        KexecSegment("purgatory", page(purgatory), page_size, MIN_PURGATORY_ADDR,
                     top_down=False),
        KexecSegment("boot params and setup data", page(boot_data), page_size,
                     MIN_BOOTPARAM_ADDR),
        KexecSegment("kernel image", page(image_size), max(KERNEL_ALIGN, page_size),
                     MIN_KERNEL_LOAD_ADDR),
    ]
    if initrd_size:
        segments.append(KexecSegment("initrd", page(initrd_size), page_size,
                                     MIN_INITRD_LOAD_ADDR))
    return segments


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
