"""KHO root `kho-v3` (between 7.1 and 7.2-rc1, which release is unconfirmed).

The kho-v2 layout with `blob-size` required, and the radix depth formula with its `+ 1`.
"""

from __future__ import annotations

import functools

from ..radix import encode_radix_map, walk_radix
from .records import KhoRootVersion

KHO_V3 = KhoRootVersion(
    compatible="kho-v3",
    releases="7.1 .. 7.2-rc1",
    subtree_prop="preserved-data",
    size_prop="blob-size",
    size_required=True,
    memmap="radix",
    walk_memmap=walk_radix,
    encode_memmap=functools.partial(encode_radix_map, depth_plus_one=True),
    memmap_at_finalize=False,
    radix_plus_one=True,
    writes_kexec_metadata=True,
    debugfs_fdt_truncated=False,
)
