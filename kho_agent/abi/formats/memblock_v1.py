"""memblock `reserve_mem` preservation: `memblock-v1` / `reserve-mem-v1` (abi/memblock.h).

The `memblock` subtree is an FDT written with libfdt's sequential-write API:

    / { compatible = "memblock-v1";
        <region name> { compatible = "reserve-mem-v1"; start = <u64>; size = <u64>; }; };

`start` and `size` are native-endian u64. A mismatch only makes the next kernel allocate the region
afresh (its contents are then lost), so findings are errors for the region, not for the handover.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ..context import DecodeContext
from ..errors import AbiError
from ..fdt import FdtWriter, parse_fdt
from .records import MEMBLOCK, SubtreeVersion

SUBTREE_NAME = "memblock"
COMPATIBLE = "memblock-v1"
REGION_COMPATIBLE = "reserve-mem-v1"


@dataclass
class ReserveMemRegion:
    name: str
    compatible: str
    start: int | None
    size: int | None


@dataclass
class MemblockState:
    compatible: str
    regions: list[ReserveMemRegion] = field(default_factory=list)


def _u64(raw: bytes | None) -> int | None:
    return struct.unpack("<Q", raw)[0] if raw is not None and len(raw) == 8 else None


def decode(blob: bytes, ctx: DecodeContext, path: str) -> MemblockState | None:
    try:
        fdt = parse_fdt(blob)
    except AbiError as exc:
        ctx.add("blob-malformed", path, f"memblock subtree is not a valid FDT: {exc}; the next "
                "kernel allocates reserve_mem regions afresh and their contents are lost")
        return None
    compat_raw = fdt.root.prop("compatible") or b""
    compatible = compat_raw.rstrip(b"\0").decode("ascii", errors="backslashreplace")
    state = MemblockState(compatible)
    if compatible != COMPATIBLE:
        ctx.add("compatible-unknown", path,
                f"memblock compatible {compatible!r} is not {COMPATIBLE!r}; reserve_mem regions "
                "will not be revived by a kernel that speaks memblock-v1")
        return state
    names: set[str] = set()
    for node in fdt.root.children:
        rpath = f"{path}/{node.name}"
        if node.name in names:
            ctx.add("fdt-duplicate", rpath, f"reserve_mem region {node.name!r} appears twice")
        names.add(node.name)
        rc = (node.prop("compatible") or b"").rstrip(b"\0").decode("ascii", "backslashreplace")
        region = ReserveMemRegion(node.name, rc, _u64(node.prop("start")),
                                  _u64(node.prop("size")))
        state.regions.append(region)
        if rc != REGION_COMPATIBLE:
            ctx.add("compatible-unknown", rpath, f"region compatible {rc!r} is not "
                    f"{REGION_COMPATIBLE!r}; the next kernel will not revive it")
        for prop in ("start", "size"):
            raw = node.prop(prop)
            if raw is None:
                ctx.add("property-missing", rpath, f"reserve_mem region lacks '{prop}'; the next "
                        "kernel will not revive it")
            elif len(raw) != 8:
                ctx.add("property-malformed", rpath, f"'{prop}' is {len(raw)} bytes, must be 8")
        if region.start is not None and region.size:
            if region.start % ctx.page_size:
                ctx.add("misaligned", rpath, f"region start {region.start:#x} is not page "
                        "aligned")
            ctx.ref(region.start, region.size, rpath, f"reserve_mem region {node.name!r}")
    return state


def encode(state: MemblockState) -> bytes:
    """Bytes as mm/memblock.c prepare_kho_fdt() writes them (sequential write)."""
    w = FdtWriter().begin_node("").property_string("compatible", state.compatible)
    for region in state.regions:
        w.begin_node(region.name).property_string("compatible", region.compatible)
        w.property_u64("start", region.start or 0).property_u64("size", region.size or 0)
        w.end_node()
    return w.end_node().finish()


MEMBLOCK_V1 = SubtreeVersion(
    family=MEMBLOCK,
    compatible=COMPATIBLE,
    subtree_name=SUBTREE_NAME,
    releases="6.16 ..",
    decode=decode,
    image_strings=(REGION_COMPATIBLE,),
)
