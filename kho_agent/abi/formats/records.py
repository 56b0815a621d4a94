"""The record each format version exports: everything known about one version of one contract.

A record is data plus the version's own decode and encode functions; the decoder (kho_state.py,
luo.py), the simulator (sim/versions.py), preflight's limits and the errno advice read these
records through registry.py, never a version string of their own. One record per version, one
module per record (formats/<family>_v<N>.py); shared code stays in the family modules
(kho_root.py, luo_common.py, memfd.py, radix.py, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from ..context import DecodeContext
from ..luo_common import LuoState
from ..memfd import MemfdLayout, MemfdState
from ..memmap import MapWalker
from ..memory import PageAllocator, SparseMemory

# Families, named as the simulator's SimAbi fields and the KHO contract they version.
KHO = "kho"
LUO = "luo"
MEMFD = "memfd"
MEMBLOCK = "memblock"
KEXEC_METADATA = "kexec-metadata"
KHO_TEST = "kho-test"


# (phys, size, order) blocks -> root address of the map written for them
class MapEncoder(Protocol):
    def __call__(self, blocks: Iterable[tuple[int, int, int]], memory: SparseMemory,
                 alloc: PageAllocator, page_shift: int = 12) -> int: ...


@dataclass(frozen=True)
class KhoRootVersion:
    """A KHO root FDT version (include/linux/kho/abi/kexec_handover.h)."""

    compatible: str
    releases: str
    subtree_prop: str             # property holding a subtree's physical address
    size_prop: str | None         # property holding its size, when the version has one
    size_required: bool           # a subtree without size_prop is skipped by the kernel
    memmap: str                   # its memory-map format's name (registry.MEMMAP_FORMATS)
    walk_memmap: MapWalker
    encode_memmap: MapEncoder
    # quirks
    memmap_at_finalize: bool      # preserved-memory-map is 0 until finalize (inside reboot())
    radix_plus_one: bool          # KHO_TREE_MAX_DEPTH with the `+ 1`
    writes_kexec_metadata: bool   # its kernels add the kexec-metadata subtree (7.1+)
    debugfs_fdt_truncated: bool   # debugfs out/fdt frozen at its early size (absent on KHO boot)
    # why an equal string on both kernels does not prove an equal layout (None: it does)
    same_string_caveat: str | None = None
    family: str = KHO


# luo_early_startup() of this version: the incoming liveupdate number, or why the kernel panics
EarlyStartup = Callable[[bytes, DecodeContext], int | str]
LuoDecoder = Callable[[bytes, DecodeContext, str], LuoState | None]


class LuoEncoder(Protocol):
    def __call__(self, state: LuoState, memory: SparseMemory, alloc: PageAllocator, *,
                 serialize_sessions: bool = True) -> bytes: ...


@dataclass(frozen=True)
class LuoLimits:
    """What one kernel of a LUO version holds at most (4 KiB pages), and how it refuses more."""

    sessions: int
    files_per_session: int
    sessions_errno: str           # what CREATE_SESSION answers past the cap
    files_errno: str              # what PRESERVE_FD answers past the cap
    sessions_why: str             # where the cap comes from, for messages
    files_why: str

    @property
    def errno_name(self) -> str:
        """Both errnos, as preflight names them ("ENOMEM/ENOSPC", or one when they agree)."""
        if self.sessions_errno == self.files_errno:
            return self.sessions_errno
        return f"{self.sessions_errno}/{self.files_errno}"


@dataclass(frozen=True)
class LuoVersion:
    """A LUO subtree version (include/linux/kho/abi/luo.h)."""

    compatible: str
    releases: str
    blob_is_fdt: bool             # the subtree is an FDT (else a raw struct luo_ser)
    sessions_in_blocks: bool      # sessions and files in KHO block chains (else fixed arrays)
    limits: LuoLimits
    shipped_with_kho: frozenset[str]   # KHO root versions whose kernels wrote this version
    image_strings: tuple[str, ...]     # further contract strings its kernels carry in .rodata
    decode: LuoDecoder
    encode: LuoEncoder
    early_startup: EarlyStartup
    family: str = LUO


MemfdDecoder = Callable[[DecodeContext, int, str], MemfdState | None]


class MemfdEncoder(Protocol):
    def __call__(self, content: bytes, memory: SparseMemory, alloc: PageAllocator, *,
                 size: int | None = None, pos: int = 0, seals: int = 0x1) -> int: ...


@dataclass(frozen=True)
class MemfdVersion:
    """A memfd file-handler version (include/linux/kho/abi/memfd.h)."""

    layout: MemfdLayout           # struct memfd_luo_ser, declared once
    releases: str
    shipped_with_kho: frozenset[str]
    # KHO roots the simulator also rehearses it with, though no kernel is known to have shipped
    # the pair (the decoder still reports such a state as compatible-mismatch)
    simulated_with_kho: frozenset[str]
    decode: MemfdDecoder
    encode: MemfdEncoder
    family: str = MEMFD

    @property
    def compatible(self) -> str:
        return self.layout.compatible

    @property
    def has_seals(self) -> bool:
        return self.layout.has_seals


SubtreeDecoder = Callable[[bytes, DecodeContext, str], object | None]


@dataclass(frozen=True)
class SubtreeVersion:
    """A KHO subtree of its own with one version: memblock, kexec-metadata, kho_test."""

    family: str
    compatible: str               # its compatible string (kexec-metadata: "v<version>")
    subtree_name: str             # the root FDT node it hangs under
    releases: str
    decode: SubtreeDecoder
    image_strings: tuple[str, ...] = ()  # further contract strings its kernels carry


FormatVersion = KhoRootVersion | LuoVersion | MemfdVersion | SubtreeVersion
