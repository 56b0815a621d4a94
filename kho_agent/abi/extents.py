"""Preserved memory as coalesced extents `(phys, size, order)`, stored compactly.

A memory map describing 64 GiB of order-0 pages is one extent here, not 16M objects; a map of 1M
scattered pages is three flat arrays, not a million Python objects. Lookups (`covers`,
`overlapping`) go through a lazily built union of all extents, sorted by address.
"""

from __future__ import annotations

import bisect
from array import array
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extent:
    phys: int
    size: int
    order: int


class ExtentMap:
    """Extents in the order they were added (a radix walk adds them in key order)."""

    def __init__(self, page_shift: int = 12) -> None:
        self.page_shift = page_shift
        self._phys = array("Q")
        self._size = array("Q")
        self._order = array("B")
        self._union: tuple[array[int], array[int]] | None = None

    def add(self, phys: int, size: int, order: int) -> None:
        """Append, merging with the last extent when it continues it at the same order."""
        n = len(self._phys)
        if n and self._order[n - 1] == order and self._phys[n - 1] + self._size[n - 1] == phys:
            self._size[n - 1] += size
        else:
            self._phys.append(phys)
            self._size.append(size)
            self._order.append(order)
        self._union = None

    def __len__(self) -> int:
        return len(self._phys)

    def __iter__(self) -> Iterator[Extent]:
        for phys, size, order in zip(self._phys, self._size, self._order, strict=True):
            yield Extent(phys, size, order)

    def spans(self) -> Iterator[tuple[int, int, int]]:
        """(phys, size, order) tuples: like iterating, without building Extent objects."""
        return zip(self._phys, self._size, self._order, strict=True)

    @property
    def total_bytes(self) -> int:
        return sum(self._size)

    def block_count(self) -> int:
        """Number of (phys, order) blocks, i.e. of keys in a radix tree or bits in a bitmap."""
        shift = self.page_shift
        return sum(size >> (shift + order) for size, order in zip(self._size, self._order,
                                                                   strict=True))

    def blocks_by_order(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for size, order in zip(self._size, self._order, strict=True):
            out[order] = out.get(order, 0) + (size >> (self.page_shift + order))
        return dict(sorted(out.items()))

    def _build_union(self) -> tuple[array[int], array[int]]:
        if self._union is None:
            pairs = sorted(zip(self._phys, self._size, strict=True))
            starts: array[int] = array("Q")
            ends: array[int] = array("Q")
            for phys, size in pairs:
                if ends and phys <= ends[-1]:
                    if phys + size > ends[-1]:
                        ends[-1] = phys + size
                else:
                    starts.append(phys)
                    ends.append(phys + size)
            self._union = (starts, ends)
        return self._union

    def union(self) -> tuple[array[int], array[int]]:
        """The merged extents as sorted (starts, ends) arrays; built once, cached until add()."""
        return self._build_union()

    def covers(self, phys: int, length: int) -> bool:
        """True when every byte of [phys, phys+length) lies in preserved memory."""
        starts, ends = self._build_union()
        i = bisect.bisect_right(starts, phys) - 1
        return i >= 0 and ends[i] >= phys + max(length, 1)

    def uncovered(self, phys: int, length: int) -> list[tuple[int, int]]:
        """The parts of [phys, phys+length) that no extent covers."""
        starts, ends = self._build_union()
        out: list[tuple[int, int]] = []
        pos, stop = phys, phys + length
        i = max(bisect.bisect_right(starts, phys) - 1, 0)
        while pos < stop:
            if i < len(starts) and starts[i] <= pos < ends[i]:
                pos = ends[i]
                i += 1
                continue
            nxt = starts[i] if i < len(starts) and starts[i] > pos else None
            if nxt is None and i + 1 < len(starts) and starts[i] <= pos:
                i += 1
                continue
            gap_end = min(stop, nxt) if nxt is not None else stop
            out.append((pos, gap_end - pos))
            pos = gap_end
        return out

    def overlapping(self, phys: int, length: int) -> list[Extent]:
        """Extents intersecting [phys, phys+length)."""
        stop = phys + length
        starts, ends = self._build_union()
        i = bisect.bisect_left(starts, stop) - 1  # the last merged run that starts before stop
        if i < 0 or ends[i] <= phys:
            return []  # the common case (a scratch area clear of the map) without a scan
        return [e for e in self if e.phys < stop and phys < e.phys + e.size]

    def self_overlaps(self) -> list[tuple[Extent, Extent]]:
        """Pairs of extents that overlap each other (at most 16 reported)."""
        items = sorted(self, key=lambda e: e.phys)
        out: list[tuple[Extent, Extent]] = []
        reach: Extent | None = None
        for ext in items:
            if reach is not None and ext.phys < reach.phys + reach.size:
                out.append((reach, ext))
                if len(out) >= 16:
                    break
            if reach is None or ext.phys + ext.size > reach.phys + reach.size:
                reach = ext
        return out

    def order_of(self, phys: int) -> int | None:
        """Order of the extent holding `phys` (linear in the number of extents of that address's
        neighbourhood: intended for spot checks, not loops over millions of folios)."""
        for ext in self.overlapping(phys, 1):
            return ext.order
        return None
