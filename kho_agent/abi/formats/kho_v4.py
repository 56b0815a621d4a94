"""KHO root `kho-v4` (7.2-rc1 .. 7.3; include/linux/kho/abi/kexec_handover.h, block.h).

The kho-v3 layout; the string also governs the KHO serialization blocks (block.py) and
`struct kho_vmalloc`. debugfs `kho/out/fdt` of these kernels is fixed at the root FDT's size
when KHO starts (later subtrees are cut off) and absent on a kernel that booted through KHO.
"""

from __future__ import annotations

import functools

from ..radix import encode_radix_map, walk_radix
from .records import KhoRootVersion

KHO_V4 = KhoRootVersion(
    compatible="kho-v4",
    releases="7.2 .. 7.3",
    subtree_prop="preserved-data",
    size_prop="blob-size",
    size_required=True,
    memmap="radix",
    walk_memmap=walk_radix,
    encode_memmap=functools.partial(encode_radix_map, depth_plus_one=True),
    memmap_at_finalize=False,
    radix_plus_one=True,
    writes_kexec_metadata=True,
    debugfs_fdt_truncated=True,
)
