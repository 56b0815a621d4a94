"""Cross-checks of a decoded state against its preserved-memory map and scratch areas.

Run on the outgoing side, before the kexec: after it the map's pages are no longer reserved and a
check would read whatever reused them.
"""

from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

from .context import DecodeContext, Side

if TYPE_CHECKING:
    from .kho_state import ScratchArea
    from .memmap import MemoryMapWalk

MAX_REPORTED = 32  # per check; the rest is summarised so a broken state stays readable
MAP_PATH = "/preserved-memory-map"


def check_state(ctx: DecodeContext, walk: MemoryMapWalk | None,
                scratch: list[ScratchArea]) -> None:
    if walk is None:
        return
    for issue in walk.issues:
        ctx.add(issue.code, MAP_PATH, issue.message)
    if walk.missing_pages:
        ctx.add("memory-unavailable", MAP_PATH,
                f"{len(walk.missing_pages)} page(s) of the map (first {walk.missing_pages[0]:#x}) "
                "are not in the memory source; what they describe was not checked")
    for a, b in walk.extents.self_overlaps():
        ctx.add("memmap-overlap", MAP_PATH,
                f"order-{a.order} range {a.phys:#x}+{a.size:#x} overlaps order-{b.order} range "
                f"{b.phys:#x}+{b.size:#x}")
    if ctx.side is Side.OUT:
        _check_refs(ctx, walk)
        _check_scratch(ctx, walk, scratch)


def _check_refs(ctx: DecodeContext, walk: MemoryMapWalk) -> None:
    if walk.missing_pages:
        return  # an incomplete map would turn every miss into a false alarm
    bad = 0
    starts, ends = walk.extents.union()
    bisect_right = bisect.bisect_right
    lo = hi = 0  # the union interval that covered the last reference: neighbours share it
    for ref in ctx.refs:
        # ExtentMap.covers() inlined: this loop runs once per structure (400k for 100k memfds)
        phys = ref.phys
        end = phys + (ref.length or 1)
        if lo <= phys and end <= hi:
            continue
        i = bisect_right(starts, phys) - 1
        if i >= 0 and ends[i] >= end:
            lo, hi = starts[i], ends[i]
            continue
        gaps = walk.extents.uncovered(ref.phys, ref.length)
        if not gaps:
            continue
        bad += 1
        if bad <= MAX_REPORTED:
            start, length = gaps[0]
            ctx.add("not-preserved", ref.path,
                    f"{ref.what} at {ref.phys:#x}+{ref.length:#x} is not preserved "
                    f"({start:#x}+{length:#x} is missing from the preserved-memory map); the "
                    "next kernel may reuse that memory before reading it")
    if bad > MAX_REPORTED:
        ctx.add("not-preserved", "/", f"{bad - MAX_REPORTED} more structures are not preserved")


def _check_scratch(ctx: DecodeContext, walk: MemoryMapWalk,
                   scratch: list[ScratchArea]) -> None:
    for area in scratch:
        if area.size == 0:
            continue
        hits = walk.extents.overlapping(area.phys, area.size)
        for ext in hits[:MAX_REPORTED]:
            ctx.add("scratch-overlap", MAP_PATH,
                    f"preserved order-{ext.order} range {ext.phys:#x}+{ext.size:#x} overlaps the "
                    f"{area.role} scratch area {area.phys:#x}+{area.size:#x}; the next kernel "
                    "boots into scratch and would overwrite it")
        stop = area.phys + area.size
        meta = [p for p in walk.meta_pages if area.phys <= p < stop]
        if meta:
            ctx.add("scratch-overlap", MAP_PATH,
                    f"{len(meta)} page(s) of the map itself (first {meta[0]:#x}) lie in the "
                    f"{area.role} scratch area; the next kernel may overwrite them before it "
                    "reads the map")
