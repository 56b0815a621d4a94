"""Radix-tree preserved-memory map (`kho-v2` and later; include/linux/kho/abi/kexec_handover.h).

Every node is one page. Interior nodes hold PAGE_SIZE/8 physical addresses of the next level down
(0 = empty); level-0 nodes are bitmaps of PAGE_SIZE*8 bits. A preserved block (pa, order) is the key

    key = (1 << (64 - PAGE_SHIFT - order)) | (pa >> (PAGE_SHIFT + order))

i.e. one "order bit" above the order-shifted PFN. Within one leaf every key has the same order (the
order bit lies above the leaf's 15 index bits for all realistic orders), so a run of set bits in a
leaf is a run of contiguous blocks: the walk turns runs into extents and never visits single pages.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import AbiError, MemoryUnavailable
from .extents import ExtentMap
from .memmap import MapIssue, MemoryMapWalk
from .memory import PageAllocator, PhysicalMemory, SparseMemory

U64_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class RadixGeometry:
    page_shift: int = 12
    # True for kho-v3/v4 (and 7.3's KHO_RADIX_KEY_WIDTH form); False for the first kho-v2
    depth_plus_one: bool = True

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    @property
    def order0_log2(self) -> int:
        return 64 - self.page_shift

    @property
    def table_log2(self) -> int:
        return self.page_shift - 3

    @property
    def bitmap_log2(self) -> int:
        return self.page_shift + 3

    @property
    def depth(self) -> int:
        span = self.order0_log2 - self.bitmap_log2 + (1 if self.depth_plus_one else 0)
        return -(-span // self.table_log2) + 1

    @property
    def key_bits(self) -> int:
        """Key bits the tree can index: (depth-1) table levels plus the leaf bitmap."""
        return (self.depth - 1) * self.table_log2 + self.bitmap_log2

    def encode_key(self, pa: int, order: int) -> int:
        return (1 << (self.order0_log2 - order)) | (pa >> (self.page_shift + order))

    def decode_key(self, key: int) -> tuple[int, int]:
        order = self.order0_log2 - key.bit_length() + 1
        return (key << (self.page_shift + order)) & U64_MASK, order


def _bit_runs(leaf: bytes) -> Iterable[tuple[int, int]]:
    """Yield [start, end) runs of set bits of a little-endian bitmap, a 64-bit word at a time, so
    that the cost follows the number of runs and words, not the number of bits."""
    nbits = len(leaf) * 8
    whole = int.from_bytes(leaf, "little")
    if whole == 0:
        return
    if whole == (1 << nbits) - 1:
        yield 0, nbits
        return
    start = -1
    for i, word in enumerate(array("Q", leaf)):
        base = i * 64
        if word == 0:
            if start >= 0:
                yield start, base
                start = -1
            continue
        if word == U64_MASK:
            if start < 0:
                start = base
            continue
        bit = 0
        while bit < 64:
            rest = word >> bit
            if rest == 0:
                if start >= 0:
                    yield start, base + bit
                    start = -1
                break
            if rest & 1:
                if start < 0:
                    start = base + bit
                bit += (~rest & (rest + 1)).bit_length() - 1  # trailing ones
            else:
                if start >= 0:
                    yield start, base + bit
                    start = -1
                bit += (rest & -rest).bit_length() - 1  # trailing zeros
        # a run still open at bit 64 carries on into the next word
    if start >= 0:
        yield start, nbits


def _one_length_runs(runs: Iterable[tuple[int, int]]) -> Iterable[tuple[int, int]]:
    """Split runs of the leaf under key prefix 0 where the keys' bit length changes: only there do
    keys of several lengths, i.e. of several orders (the largest: 38 and up at 4 KiB pages),
    share a leaf."""
    for start, end in runs:
        while start < end:
            stop = min(end, 1 << start.bit_length())
            yield start, stop
            start = stop


def radix_walk(memory: PhysicalMemory, root: int, geom: RadixGeometry | None = None, *,
               max_nodes: int = 1 << 20) -> MemoryMapWalk:
    """Walk the tree under `root` and return its preserved blocks as coalesced extents.

    Structural defects (a node page reached twice, misaligned or out-of-range entries) are
    reported as issues and that branch is skipped; pages the memory source lacks are listed in
    `missing_pages`. Only an unusable root raises.
    """
    geom = geom or RadixGeometry()
    ps = geom.page_size
    if root == 0 or root % ps:
        raise AbiError(f"radix root {root:#x} is not a page-aligned physical address")
    fmt = "radix" if geom.depth_plus_one else "radix-v2-early"
    result = MemoryMapWalk(fmt, root, ExtentMap(geom.page_shift))
    seen: set[int] = set()
    table_log2, bitmap_log2, page_shift = geom.table_log2, geom.bitmap_log2, geom.page_shift
    # Depth-first in ascending key order, so the extents come out sorted by key.
    stack: list[tuple[int, int, int]] = [(geom.depth - 1, root, 0)]
    while stack:
        level, phys, prefix = stack.pop()
        if phys in seen:
            result.issues.append(MapIssue("chain-cycle", phys,
                                            f"radix node page {phys:#x} is referenced twice"))
            continue
        if len(seen) >= max_nodes:
            result.issues.append(MapIssue("chain-too-long", phys,
                                            f"radix tree has more than {max_nodes} node pages"))
            break
        seen.add(phys)
        result.meta_pages.append(phys)
        try:
            page = memory.read(phys, ps)
        except MemoryUnavailable:
            result.missing_pages.append(phys)
            continue
        if level == 0:
            runs = _bit_runs(page) if prefix else _one_length_runs(_bit_runs(page))
            for start, end in runs:
                pa, order = geom.decode_key(prefix | start)
                size = (end - start) << (page_shift + order) if order >= 0 else 0
                if order < 0 or pa + size > U64_MASK:  # an extent must end at a u64 address
                    result.issues.append(MapIssue(
                        "property-malformed", phys,
                        f"radix leaf {phys:#x} holds key {prefix | start:#x} with no valid order, "
                        "or with blocks that do not fit below 2^64"))
                    continue
                result.extents.add(pa, size, order)
            continue
        shift = (level - 1) * table_log2 + bitmap_log2
        children: list[tuple[int, int, int]] = []
        for slot, child in enumerate(array("Q", page)):
            if child == 0:
                continue
            key_prefix = prefix | (slot << shift)
            if key_prefix >> geom.key_bits or (level == geom.depth - 1 and
                                               key_prefix >> (64 - geom.page_shift + 1)):
                result.issues.append(MapIssue(
                    "property-malformed", phys,
                    f"radix node {phys:#x} slot {slot} lies beyond the key width"))
                continue
            if child % ps:
                result.issues.append(MapIssue(
                    "misaligned", phys,
                    f"radix node {phys:#x} slot {slot} points at unaligned {child:#x}"))
                continue
            children.append((level - 1, child, key_prefix))
        stack.extend(reversed(children))
    return result


def walk_radix(memory: PhysicalMemory, root: int, page_shift: int) -> MemoryMapWalk:
    return radix_walk(memory, root, RadixGeometry(page_shift, depth_plus_one=True))


def walk_radix_early(memory: PhysicalMemory, root: int, page_shift: int) -> MemoryMapWalk:
    """The first kho-v2 header computed the depth without the `+ 1` (differs at 16 KiB pages)."""
    return radix_walk(memory, root, RadixGeometry(page_shift, depth_plus_one=False))


def encode_radix_map(blocks: Iterable[tuple[int, int, int]], memory: SparseMemory,
                     alloc: PageAllocator, page_shift: int = 12, *,
                     depth_plus_one: bool = True) -> int:
    """radix_encode() with the depth formula of one root version (a KHO root record's map
    encoder)."""
    return radix_encode(blocks, memory, alloc, RadixGeometry(page_shift,
                                                             depth_plus_one=depth_plus_one))


def radix_encode(blocks: Iterable[tuple[int, int, int]], memory: SparseMemory,
                 alloc: PageAllocator, geom: RadixGeometry | None = None) -> int:
    """Write a radix tree for `blocks` = (phys, size, order) extents; return the root address.

    Each extent must be aligned to its order and a whole number of blocks. Pages for nodes come
    from `alloc`, the root first, as the kernel allocates the root at boot.
    """
    geom = geom or RadixGeometry()
    ps = geom.page_size
    bitmap_log2 = geom.bitmap_log2
    leaves: dict[int, int] = {}  # leaf prefix (key >> bitmap_log2) -> bitmap as an int
    for phys, size, order in blocks:
        block = 1 << (geom.page_shift + order)
        if phys % block or size % block or size == 0:
            raise AbiError(f"extent {phys:#x}+{size:#x} is not whole order-{order} blocks")
        first = geom.encode_key(phys, order)
        last = first + size // block  # exclusive
        if (last - 1) >> geom.key_bits:
            raise AbiError(f"order-{order} block at {phys:#x} does not fit the radix key width "
                           "(-ERANGE)")
        key = first
        while key < last:
            leaf = key >> bitmap_log2
            lo = key & ((1 << bitmap_log2) - 1)
            hi = min(last - (leaf << bitmap_log2), 1 << bitmap_log2)
            leaves[leaf] = leaves.get(leaf, 0) | (((1 << (hi - lo)) - 1) << lo)
            key = (leaf << bitmap_log2) + hi
    # Insert leaf by leaf from the root down, allocating missing nodes top-down as
    # kho_radix_add_key() does, so node pages sit where the kernel would put them.
    root = alloc.alloc(ps)
    tables: dict[int, dict[int, int]] = {root: {}}
    mask = (1 << geom.table_log2) - 1
    for leaf_prefix in sorted(leaves):
        key = leaf_prefix << bitmap_log2
        node = root
        for level in range(geom.depth - 1, 0, -1):
            slot = (key >> ((level - 1) * geom.table_log2 + bitmap_log2)) & mask
            child = tables[node].get(slot)
            if child is None:
                child = alloc.alloc(ps)
                tables[node][slot] = child
                if level > 1:
                    tables[child] = {}
            node = child
        memory.write(node, leaves[leaf_prefix].to_bytes(ps, "little"))
    for phys, table in tables.items():
        page = bytearray(ps)
        for slot, child in table.items():
            struct.pack_into("<Q", page, slot * 8, child)
        memory.write(phys, bytes(page))
    return root
