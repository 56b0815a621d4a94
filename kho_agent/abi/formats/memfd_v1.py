"""memfd file handler `memfd-v1` (6.19 .. 7.0; include/linux/kho/abi/memfd.h).

    struct memfd_luo_ser { u64 pos; u64 size; u64 nr_folios; struct kho_vmalloc folios; };  // 40

Decoded and encoded by the shared memfd code (memfd.py) with this layout.
"""

from __future__ import annotations

import functools

from .. import memfd
from ..structs import layout
from .records import MemfdVersion

LAYOUT = memfd.MemfdLayout("memfd-v1", layout("<QQQQIHH", 40), has_seals=False)

MEMFD_V1 = MemfdVersion(
    layout=LAYOUT,
    releases="6.19 .. 7.0",
    shipped_with_kho=frozenset({"kho-v1", "kho-v2"}),
    # which release carried kho-v3 is unconfirmed (docs/kernel-abi.md §0); rehearsing an older memfd
    # handler against it is useful, so the simulator allows the pair
    simulated_with_kho=frozenset({"kho-v3"}),
    decode=functools.partial(memfd.decode, LAYOUT),
    encode=functools.partial(memfd.encode, LAYOUT),
)
