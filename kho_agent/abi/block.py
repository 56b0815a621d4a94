"""KHO serialization blocks (`kho-v4`; include/linux/kho/abi/block.h, kho_block.c).

Each block is one page headed by

    struct kho_block_header_ser { u64 next; u64 count; } __packed;   // 16 bytes

followed by `count` fixed-size entries; capacity = (PAGE_SIZE - 16) / entry_size. The kernel's
restore side rejects a block with count 0 or above capacity, a cycle, and chains longer than
KHO_MAX_BLOCKS = 10000; so do we, as findings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .context import DecodeContext
from .errors import AbiError
from .memory import PageAllocator, SparseMemory

HEADER_SIZE = 16
MAX_BLOCKS = 10_000


def capacity(entry_size: int, page_size: int = 4096) -> int:
    return (page_size - HEADER_SIZE) // entry_size


@dataclass
class BlockChain:
    blocks: list[tuple[int, int]] = field(default_factory=list)  # (phys, count)
    entries: list[bytes] = field(default_factory=list)
    complete: bool = True  # False when a block could not be read or the chain was cut


def walk_blocks(ctx: DecodeContext, first: int, entry_size: int, path: str,
                what: str) -> BlockChain:
    """Read a block chain; every defect the kernel would refuse becomes an error finding."""
    chain = BlockChain()
    cap = capacity(entry_size, ctx.page_size)
    seen: set[int] = set()
    phys = first
    while phys:
        bpath = f"{path}/{what}-block[{len(chain.blocks)}]"
        if phys in seen:
            ctx.add("chain-cycle", bpath, f"{what} block chain loops back to {phys:#x}; the next "
                    "kernel rejects it (LUO panics at boot for the session chain)")
            chain.complete = False
            break
        if len(chain.blocks) >= MAX_BLOCKS:
            ctx.add("chain-too-long", bpath, f"{what} block chain is longer than {MAX_BLOCKS} "
                    "blocks; the next kernel rejects it")
            chain.complete = False
            break
        if phys % ctx.page_size:
            ctx.add("misaligned", bpath, f"{what} block at {phys:#x} is not page aligned")
            chain.complete = False
            break
        seen.add(phys)
        if not ctx.claim(phys, bpath, f"{what} block"):
            chain.complete = False
            break
        ctx.ref(phys, ctx.page_size, bpath, f"{what} block")
        page = ctx.read(phys, ctx.page_size, bpath, f"{what} block")
        if page is None:
            chain.complete = False
            break
        nxt, count = struct.unpack_from("<QQ", page, 0)
        chain.blocks.append((phys, count))
        if count == 0 or count > cap:
            hint = (" (an empty session block: the next kernel logs 'Block contains invalid "
                    "entry count: 0' and panics; only a cold reboot is safe)"
                    if count == 0 and what == "sessions" else "")
            ctx.add("block-count-invalid", bpath, f"{what} block at {phys:#x} has count {count}, "
                    f"valid is 1..{cap}{hint}")
            count = min(count, cap)
        for i in range(count):
            off = HEADER_SIZE + i * entry_size
            chain.entries.append(page[off:off + entry_size])
        phys = nxt
    return chain


def encode_blocks(entries: list[bytes], entry_size: int, memory: SparseMemory,
                  alloc: PageAllocator) -> int:
    """Write entries into a fresh chain (full blocks, last one partial); return the first block's
    address, or 0 for no entries (as the kernel leaves the pointer 0)."""
    if not entries:
        return 0
    ps = memory.page_size
    cap = capacity(entry_size, ps)
    groups = [entries[i:i + cap] for i in range(0, len(entries), cap)]
    addrs = [alloc.alloc(ps) for _ in groups]
    for n, (phys, group) in enumerate(zip(addrs, groups, strict=True)):
        nxt = addrs[n + 1] if n + 1 < len(addrs) else 0
        page = bytearray(ps)
        struct.pack_into("<QQ", page, 0, nxt, len(group))
        for i, entry in enumerate(group):
            if len(entry) != entry_size:
                raise AbiError(f"block entry is {len(entry)} bytes, expected {entry_size}")
            page[HEADER_SIZE + i * entry_size:HEADER_SIZE + (i + 1) * entry_size] = entry
        memory.write(phys, bytes(page))
    return addrs[0]
