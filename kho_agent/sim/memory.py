"""Simulated physical memory: the page allocator the simulated kernel hands out (buddy pages
outside scratch and reservations), and loading/saving page sets as ELF cores."""

from __future__ import annotations

from ..abi.memory import PageAllocator, SparseMemory
from ..kernel.physmem import ElfCoreMemory, write_elf_core
from .boot import PAGE_SIZE


class OutOfMemory(Exception):
    """The simulated machine has no free range left for an allocation."""


class SimAllocator(PageAllocator):
    """Bottom-up allocation over free ranges with a single-page free list. Every live allocation
    is remembered, so a caller can free what one operation allocated."""

    def __init__(self, ranges: list[tuple[int, int]], cursor: int) -> None:
        super().__init__(0, PAGE_SIZE)
        self.ranges = sorted(ranges)
        self.next = cursor
        self.free_pages: list[int] = []
        self.live: dict[int, int] = {}
        self.log: list[int] = []  # allocation order, for callers that capture a span of it

    def alloc(self, nbytes: int = 0, *, align: int | None = None) -> int:
        ps = self.page_size
        size = max(1, -(-nbytes // ps)) * ps
        align = max(align or ps, ps)
        if size == ps and align == ps and self.free_pages:
            phys = self.free_pages.pop()
        else:
            phys = self._bump(size, align)
        self.live[phys] = size
        self.log.append(phys)
        return phys

    def _bump(self, size: int, align: int) -> int:
        for lo, hi in self.ranges:
            if hi <= self.next:
                continue
            pos = -(-max(self.next, lo) // align) * align
            if pos + size <= hi:
                self.next = pos + size
                return pos
        raise OutOfMemory(f"no free simulated memory for {size} bytes; create the simulation "
                          "with more memory_mib")

    def free(self, phys: int, memory: SparseMemory) -> None:
        size = self.live.pop(phys, 0)
        memory.drop(phys, size)
        self.free_pages.extend(range(phys, phys + size, self.page_size))


def load_core(path: str, into: SparseMemory) -> None:
    with ElfCoreMemory(path) as core:
        for seg in core.segments:
            into.write(seg.phys, core.read(seg.phys, seg.size))


def save_core(path: str, pages: dict[int, bytes]) -> None:
    write_elf_core(path, sorted(pages.items()))


def page_dict(memory: SparseMemory) -> dict[int, bytes]:
    return dict(memory.pages())
