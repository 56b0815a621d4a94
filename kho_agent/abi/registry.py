"""Every format version the decoder, the simulator, preflight and the errno advice know: one line
per version in FORMATS, nothing registered anywhere else.

Adding a version is a module in formats/ that exports its record (formats/records.py says what a
record holds) and one line here; the tables below are views over FORMATS, and the tests take
their matrices (round trips, fuzz seeds, simulator eras) from it.
"""

from __future__ import annotations

from collections.abc import Mapping

from .context import DecodeContext
from .errors import AbiError
from .formats import (
    kexec_metadata_v1,
    kho_selftest_v1,
    kho_v1,
    kho_v2,
    kho_v3,
    kho_v4,
    luo_v1,
    luo_v5,
    memblock_v1,
    memfd_v1,
    memfd_v2,
)
from .formats.records import (
    KEXEC_METADATA,
    FormatVersion,
    KhoRootVersion,
    LuoVersion,
    MemfdVersion,
    SubtreeVersion,
)
from .luo_common import FileDecoder
from .memfd import MemfdState
from .memmap import MapWalker
from .memmap_chunks import FORMAT_512, FORMAT_PAGE, walk_chunks_512, walk_chunks_page
from .memory import PageAllocator, SparseMemory

FORMATS: tuple[FormatVersion, ...] = (
    kho_v1.KHO_V1,
    kho_v2.KHO_V2,
    kho_v3.KHO_V3,
    kho_v4.KHO_V4,
    luo_v1.LUO_V1,
    luo_v5.LUO_V5,
    memfd_v1.MEMFD_V1,
    memfd_v2.MEMFD_V2,
    memblock_v1.MEMBLOCK_V1,
    kexec_metadata_v1.KEXEC_METADATA_V1,
    kho_selftest_v1.KHO_TEST_V1,
)

# --- views, oldest version first within a family -------------------------------------------

KHO_ROOTS: tuple[KhoRootVersion, ...] = tuple(f for f in FORMATS if isinstance(f, KhoRootVersion))
LUO_FORMATS: tuple[LuoVersion, ...] = tuple(f for f in FORMATS if isinstance(f, LuoVersion))
MEMFD_FORMATS: tuple[MemfdVersion, ...] = tuple(f for f in FORMATS if isinstance(f, MemfdVersion))
SUBTREES: tuple[SubtreeVersion, ...] = tuple(f for f in FORMATS if isinstance(f, SubtreeVersion))

ROOT_FORMATS: Mapping[str, KhoRootVersion] = {f.compatible: f for f in KHO_ROOTS}
LUO_BY_COMPATIBLE: Mapping[str, LuoVersion] = {f.compatible: f for f in LUO_FORMATS}
MEMFD_BY_COMPATIBLE: Mapping[str, MemfdVersion] = {f.compatible: f for f in MEMFD_FORMATS}
# luo_file_ser.compatible -> its handler's decoder (only memfd is in mainline)
FILE_HANDLERS: Mapping[str, FileDecoder] = {f.compatible: f.decode for f in MEMFD_FORMATS}
# memory-map format name -> walker: each root's own, and kho-v1's walker held to one bitmap size
MEMMAP_FORMATS: Mapping[str, MapWalker] = {
    **{f.memmap: f.walk_memmap for f in KHO_ROOTS},
    FORMAT_512: walk_chunks_512,
    FORMAT_PAGE: walk_chunks_page,
}


def find(family: str, compatible: str) -> FormatVersion | None:
    """The record of `compatible` in `family` ("kho", "luo", "memfd", ...), or None."""
    return next((f for f in FORMATS if f.family == family and f.compatible == compatible), None)


def by_compatible(compatible: str) -> FormatVersion | None:
    """The record of `compatible` in whatever family, or None (kexec-metadata's "v1" is a
    number, not a string a kernel compares: it is not matched here)."""
    return next((f for f in FORMATS
                 if f.compatible == compatible and f.family != KEXEC_METADATA), None)


def versions(family: str) -> tuple[str, ...]:
    """The compatible strings of one family, oldest first."""
    return tuple(f.compatible for f in FORMATS if f.family == family)


def kho_root(compatible: str) -> KhoRootVersion | None:
    return ROOT_FORMATS.get(compatible)


def luo(compatible: str) -> LuoVersion | None:
    return LUO_BY_COMPATIBLE.get(compatible)


def memfd(compatible: str) -> MemfdVersion | None:
    return MEMFD_BY_COMPATIBLE.get(compatible)


def shipped_with(kho: str) -> tuple[frozenset[str], frozenset[str]]:
    """The LUO and memfd versions kernels of one KHO root version wrote (docs/kernel-abi.md §0): a
    combination outside these was not written by any one kernel."""
    return (frozenset(f.compatible for f in LUO_FORMATS if kho in f.shipped_with_kho),
            frozenset(f.compatible for f in MEMFD_FORMATS if kho in f.shipped_with_kho))


def simulated_with(kho: str) -> tuple[frozenset[str], frozenset[str]]:
    """shipped_with() widened by the pairs the simulator also rehearses (MemfdVersion's
    simulated_with_kho)."""
    luos, memfds = shipped_with(kho)
    return luos, memfds | {f.compatible for f in MEMFD_FORMATS if kho in f.simulated_with_kho}


def encode_memfd(compatible: str, content: bytes, memory: SparseMemory, alloc: PageAllocator, *,
                 size: int | None = None, pos: int = 0, seals: int = 0x1) -> int:
    """Preserve a memfd in the layout of `compatible` (MemfdVersion.encode); AbiError for a
    version no record has."""
    return _memfd(compatible).encode(content, memory, alloc, size=size, pos=pos, seals=seals)


def decode_memfd(compatible: str, ctx: DecodeContext, phys: int, path: str) -> MemfdState | None:
    """Decode a memfd_luo_ser of `compatible` (MemfdVersion.decode)."""
    return _memfd(compatible).decode(ctx, phys, path)


def _memfd(compatible: str) -> MemfdVersion:
    found = MEMFD_BY_COMPATIBLE.get(compatible)
    if found is None:
        raise AbiError(f"no memfd format {compatible!r}")
    return found
