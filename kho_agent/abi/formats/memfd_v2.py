"""memfd file handler `memfd-v2` (7.1 ..; include/linux/kho/abi/memfd.h): memfd-v1 plus seals.

    struct memfd_luo_ser { u64 pos; u64 size; u32 seals; u32 flags; u64 nr_folios;
                           struct kho_vmalloc folios; };                                  // 48

Decoded and encoded by the shared memfd code (memfd.py) with this layout.
"""

from __future__ import annotations

import functools

from .. import memfd
from ..structs import layout
from .records import MemfdVersion

LAYOUT = memfd.MemfdLayout("memfd-v2", layout("<QQIIQQIHH", 48), has_seals=True)

MEMFD_V2 = MemfdVersion(
    layout=LAYOUT,
    releases="7.1 ..",
    shipped_with_kho=frozenset({"kho-v2", "kho-v3", "kho-v4"}),
    simulated_with_kho=frozenset(),
    decode=functools.partial(memfd.decode, LAYOUT),
    encode=functools.partial(memfd.encode, LAYOUT),
)
