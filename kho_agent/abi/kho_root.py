"""The KHO root FDT, read and written per the root version's record (formats/kho_vN.py;
include/linux/kho/abi/kexec_handover.h).

    / { compatible = "kho-vN"; preserved-memory-map = <u64 phys>;
        <subtree> { fdt = <u64 phys>; };                                   // kho-v1
        <subtree> { preserved-data = <u64 phys>; [blob-size = <u64>;] };   // kho-v2 .. kho-v4
    };

All integer properties are native-endian (little-endian on x86-64 and arm64), not FDT cells.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import registry
from .errors import AbiError
from .fdt import FDT_BEGIN_NODE, FDT_NOP, FDT_PROP, FdtTree, FdtWriter, check_header, parse_fdt

MEMMAP_PROP = "preserved-memory-map"


@dataclass
class SubtreeRef:
    name: str
    phys: int | None
    size: int | None
    problems: list[tuple[str, str]]  # (finding code, message) about its properties


@dataclass
class KhoRoot:
    compatible: str
    memmap_phys: int | None
    subtrees: list[SubtreeRef]
    fdt_size: int
    problems: list[tuple[str, str, str]]  # (code, path, message)
    recovered: bool = False  # decoded from a truncated prefix: subtrees are not listed


def _u64(raw: bytes | None) -> int | None:
    return struct.unpack("<Q", raw)[0] if raw is not None and len(raw) == 8 else None


def decode_root(blob: bytes) -> KhoRoot:
    """Parse a root FDT. Raises AbiError (FdtTruncated for a cut-off blob) if it is not an FDT;
    property-level defects are returned as problems."""
    fdt = parse_fdt(blob)
    compat_raw = fdt.root.prop("compatible")
    problems: list[tuple[str, str, str]] = []
    if compat_raw is None:
        problems.append(("property-missing", "/", "root FDT has no 'compatible'; the next kernel "
                         "disables KHO revival and every preserved page is lost"))
        compatible = ""
    else:
        compatible = compat_raw.split(b"\0")[0].decode("ascii", errors="backslashreplace")
    fmt = registry.kho_root(compatible)
    memmap_raw = fdt.root.prop(MEMMAP_PROP)
    memmap = _u64(memmap_raw)
    if memmap_raw is None:
        problems.append(("property-missing", "/", f"root FDT has no '{MEMMAP_PROP}'; the next "
                         "kernel disables KHO revival"))
    elif memmap is None:
        problems.append(("property-malformed", "/", f"'{MEMMAP_PROP}' is {len(memmap_raw)} "
                         "bytes, must be 8; the next kernel disables KHO revival"))
    subtrees: list[SubtreeRef] = []
    names: set[str] = set()
    for node in fdt.root.children:
        path = f"/{node.name}"
        if node.name in names:
            problems.append(("fdt-duplicate", path, f"subtree {node.name!r} appears twice"))
        names.add(node.name)
        ref = SubtreeRef(node.name, None, None, [])
        if fmt is not None:
            raw = node.prop(fmt.subtree_prop)
            ref.phys = _u64(raw)
            if raw is None:
                ref.problems.append(("property-missing", f"subtree lacks '{fmt.subtree_prop}'; "
                                     "the next kernel cannot find its data"))
            elif ref.phys is None:
                ref.problems.append(("property-malformed", f"'{fmt.subtree_prop}' is {len(raw)} "
                                     "bytes, must be 8"))
            if fmt.size_prop:
                sraw = node.prop(fmt.size_prop)
                ref.size = _u64(sraw)
                if sraw is None and fmt.size_required:
                    ref.problems.append(("property-missing", f"subtree lacks '{fmt.size_prop}'; "
                                         f"a {compatible} kernel skips it"))
                elif sraw is not None and ref.size is None:
                    ref.problems.append(("property-malformed", f"'{fmt.size_prop}' is "
                                         f"{len(sraw)} bytes, must be 8"))
        subtrees.append(ref)
    return KhoRoot(compatible, memmap, subtrees, fdt.totalsize, problems)


def recover_truncated_root(prefix: bytes) -> KhoRoot | None:
    """Read the root's own properties from a cut-off root FDT (debugfs kho/out/fdt on 7.2/7.3).

    The strings block is missing from such a prefix, but every kernel writes the root's two
    properties first, sequentially, so their names sit at fixed offsets of the string table:
    "preserved-memory-map" at 0 and "compatible" at 21. Properties are accepted only when their
    name offsets and sizes match that layout; otherwise None.
    """
    try:
        check_header(prefix)
    except AbiError as exc:
        if not str(exc).startswith("FDT is truncated"):
            return None
    if len(prefix) < 64:
        return None
    off_struct = int.from_bytes(prefix[8:12], "big")
    totalsize = int.from_bytes(prefix[4:8], "big")
    pos = off_struct
    if pos + 8 > len(prefix) or int.from_bytes(prefix[pos:pos + 4], "big") != FDT_BEGIN_NODE:
        return None
    pos += 8  # BEGIN_NODE + empty root name padded to 4
    props: dict[int, bytes] = {}
    while pos + 12 <= len(prefix):
        tag = int.from_bytes(prefix[pos:pos + 4], "big")
        if tag == FDT_NOP:
            pos += 4
            continue
        if tag != FDT_PROP:
            break
        length = int.from_bytes(prefix[pos + 4:pos + 8], "big")
        nameoff = int.from_bytes(prefix[pos + 8:pos + 12], "big")
        if pos + 12 + length > len(prefix):
            break
        props[nameoff] = prefix[pos + 12:pos + 12 + length]
        pos = (pos + 12 + length + 3) & ~3
    compat = props.get(21)
    memmap = props.get(0)
    if compat is None or not compat.endswith(b"\0") or memmap is None or len(memmap) != 8:
        return None
    compatible = compat[:-1].decode("ascii", errors="backslashreplace")
    if registry.kho_root(compatible) is None:
        return None
    return KhoRoot(compatible, _u64(memmap), [], totalsize, [], recovered=True)


def encode_root(compatible: str, memmap_phys: int,
                subtrees: list[tuple[str, int, int | None]]) -> bytes:
    """The root FDT as the kernel leaves it: written sequentially at boot, then one
    fdt_open_into/fdt_add_subnode/fdt_setprop/fdt_pack round per kho_add_subtree() call, in the
    order given (the kernel inserts each new subnode first, so the last added is listed first)."""
    fmt = registry.kho_root(compatible)
    if fmt is None:
        raise AbiError(f"no KHO root format {compatible!r}")
    w = FdtWriter().begin_node("").property_string("compatible", compatible)
    w.property(MEMMAP_PROP, struct.pack("<Q", 0)).end_node()
    tree = FdtTree.open(w.finish())
    tree.setprop("/", MEMMAP_PROP, struct.pack("<Q", memmap_phys))
    blob = tree.pack()
    for name, phys, size in subtrees:
        tree = FdtTree.open(blob)
        tree.add_subnode("/", name)
        tree.setprop(f"/{name}", fmt.subtree_prop, struct.pack("<Q", phys))
        if fmt.size_prop and size is not None:
            tree.setprop(f"/{name}", fmt.size_prop, struct.pack("<Q", size))
        blob = tree.pack()
    return blob
