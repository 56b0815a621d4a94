"""The preserved-memory map, whatever its format: what a walk found, and the walker's shape.

`kho-v1` roots point at a linked list of `khoser_mem_chunk` pages (two bitmap sizes under one
compatible string); `kho-v2` and later point at a radix tree. Each walker returns a MemoryMapWalk;
the walkers are listed by name in registry.MEMMAP_FORMATS, and each KHO root record names its own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .extents import ExtentMap
from .memory import PhysicalMemory


@dataclass
class MapIssue:
    """A structural problem met during a walk; checks turn it into a finding."""
    code: str
    phys: int
    message: str


@dataclass
class MemoryMapWalk:
    format: str
    root: int
    extents: ExtentMap
    meta_pages: list[int] = field(default_factory=list)  # pages holding the map itself
    issues: list[MapIssue] = field(default_factory=list)
    missing_pages: list[int] = field(default_factory=list)  # map pages the source lacked


# walker(memory, root, page_shift)
MapWalker = Callable[[PhysicalMemory, int, int], MemoryMapWalk]
