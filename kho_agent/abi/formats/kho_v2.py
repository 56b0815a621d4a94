"""KHO root `kho-v2` (7.1; include/linux/kho/abi/kexec_handover.h).

    / { compatible = "kho-v2"; preserved-memory-map = <u64 phys>;
        <subtree> { preserved-data = <u64 phys>; [blob-size = <u64>;] }; };

7.1 shipped it first without `blob-size`, then with it (2026-04-18): both decode. The memory map
is the radix tree, whose first header computed the depth without the `+ 1`.
"""

from __future__ import annotations

import functools

from ..radix import encode_radix_map, walk_radix_early
from .records import KhoRootVersion

KHO_V2 = KhoRootVersion(
    compatible="kho-v2",
    releases="7.1",
    subtree_prop="preserved-data",
    size_prop="blob-size",
    size_required=False,
    memmap="radix-v2-early",
    walk_memmap=walk_radix_early,
    encode_memmap=functools.partial(encode_radix_map, depth_plus_one=False),
    memmap_at_finalize=False,
    radix_plus_one=False,
    writes_kexec_metadata=True,
    debugfs_fdt_truncated=False,
)
