"""KHO root `kho-v1` (6.16 .. 7.0; include/linux/kho/abi/kexec_handover.h from 7.0).

    / { compatible = "kho-v1"; preserved-memory-map = <u64 phys>;
        <subtree> { fdt = <u64 phys>; }; };

The memory map is a linked list of `khoser_mem_chunk` pages (memmap_chunks.py; the bitmaps grew
from 512 bytes to a page between 6.16 and 6.19 under the same string). The map is written only
by finalize, which LUO runs inside reboot(): before that `preserved-memory-map` is 0.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..memmap_chunks import encode_chunks, walk_chunks
from ..memory import PageAllocator, SparseMemory
from .records import KhoRootVersion


def encode_memmap(blocks: Iterable[tuple[int, int, int]], memory: SparseMemory,
                  alloc: PageAllocator, page_shift: int = 12) -> int:
    """The chunk list with page-sized bitmaps (6.19 .. 7.0)."""
    return encode_chunks(blocks, memory, alloc, page_shift=page_shift)


KHO_V1 = KhoRootVersion(
    compatible="kho-v1",
    releases="6.16 .. 7.0",
    subtree_prop="fdt",
    size_prop=None,
    size_required=False,
    memmap="chunks",
    walk_memmap=walk_chunks,
    encode_memmap=encode_memmap,
    memmap_at_finalize=True,
    radix_plus_one=False,
    writes_kexec_metadata=False,
    debugfs_fdt_truncated=False,
    same_string_caveat=("kho-v1 changed its preserved-memory bitmaps from 512 bytes to a page "
                        "between 6.16 and 6.19 without a new string (docs/kernel-abi.md "
                        "§1.3); the same string proves nothing across those releases"),
)
