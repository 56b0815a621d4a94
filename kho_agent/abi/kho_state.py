"""Decode a whole KHO state: root FDT, preserved-memory map, and every subtree.

Inputs are what a host can show: the root FDT as read (possibly cut short by the debugfs defect, or
absent on a kernel that itself booted through KHO), the debugfs copies of the subtree blobs, the
scratch areas, and optionally physical memory. Nothing here raises for bad input: every defect is a
finding and the rest is still decoded.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

from . import composite, luo, registry
from .checks import check_state
from .context import DecodeContext, MemRef, Side
from .errors import AbiError, FdtTruncated, MemoryUnavailable
from .fdt import FDT_MAGIC
from .findings import Finding
from .formats.records import KhoRootVersion, SubtreeDecoder
from .kho_root import KhoRoot, decode_root, recover_truncated_root
from .luo_common import LuoState
from .memmap import MemoryMapWalk
from .memory import PhysicalMemory

# subtree name -> decoder: LUO picks its version from the blob (luo.py), the others have one
SUBTREE_DECODERS: dict[str, SubtreeDecoder] = {
    luo.SUBTREE_NAME: luo.decode,
    **{f.subtree_name: f.decode for f in registry.SUBTREES},
}
MAX_UNSIZED_BLOB = 1 << 20  # kho-v1 subtree FDTs carry no size; bound what we read

# blob-size comes from the FDT: never turn an absurd value into a read of that size (on /proc/kcore
# it would copy all of RAM). Real subtree blobs are a page or less.
MAX_SIZED_BLOB = 16 << 20


@dataclass(frozen=True)
class ScratchArea:
    phys: int
    size: int
    role: str  # "lowmem", "global", "node N"


def scratch_roles(count: int) -> list[str]:
    """kho_scratch[] order: lowmem, global, then one area per NUMA node with memory."""
    return ["lowmem", "global", *(f"node {i}" for i in range(max(count - 2, 0)))][:count]


@dataclass
class KhoInput:
    root_fdt: bytes | None
    sub_blobs: dict[str, bytes] = field(default_factory=dict)
    scratch: list[ScratchArea] = field(default_factory=list)
    memory: PhysicalMemory | None = None
    side: Side = Side.OUT
    page_shift: int = 12


@dataclass
class Subtree:
    name: str
    phys: int | None
    size: int | None
    source: str  # where the bytes came from: "memory", "debugfs", or "none"
    decoded: object | None = None


@dataclass
class KhoState:
    side: Side
    compatible: str | None
    root_source: str  # "fdt", "truncated-fdt", "none"
    fdt_size: int | None
    memmap_phys: int | None
    memmap: MemoryMapWalk | None
    subtrees: list[Subtree]
    scratch: list[ScratchArea]
    findings: list[Finding]
    refs: list[MemRef]


def _root(inp: KhoInput, ctx: DecodeContext) -> tuple[KhoRoot | None, str]:
    if inp.root_fdt is None:
        if inp.side is Side.OUT:
            ctx.add("debugfs-fdt-absent", "/",
                    "there is no outgoing root FDT to read (a kernel that booted through KHO does "
                    "not expose kho/out/fdt); the subtrees were decoded from out/sub_fdts")
        else:
            ctx.add("property-missing", "/", "there is no incoming root FDT: this boot did not "
                    "come through KHO, so nothing was handed over")
        return None, "none"
    try:
        return decode_root(inp.root_fdt), "fdt"
    except FdtTruncated as exc:
        root = recover_truncated_root(inp.root_fdt)
        ctx.add("debugfs-fdt-truncated", "/",
                f"the root FDT is cut short ({exc.have} of {exc.need} bytes): a known kernel "
                "defect fixes debugfs kho/out/fdt at its size when KHO starts, and later "
                "subtrees grow the FDT. "
                + ("The root compatible and memory map were read from the prefix; "
                   if root else "")
                + "the subtrees were decoded from out/sub_fdts")
        return root, "truncated-fdt"
    except AbiError as exc:
        ctx.add("blob-malformed", "/", f"the root FDT cannot be decoded: {exc}; the next kernel "
                "would disable KHO revival and every preserved page would be lost")
        return None, "none"


def _fetch(inp: KhoInput, ctx: DecodeContext, name: str, phys: int | None,
           size: int | None) -> tuple[bytes | None, str]:
    path = f"/{name}"
    if size is not None and size > MAX_SIZED_BLOB:
        ctx.add("property-malformed", path, f"blob-size {size:#x} is beyond any real subtree "
                f"blob (this decoder reads at most {MAX_SIZED_BLOB:#x} bytes); the blob was not "
                "read from memory")
        phys = None
    if phys and inp.memory is not None:
        try:
            if size is None:
                head = inp.memory.read(phys, 8)
                if int.from_bytes(head[:4], "big") != FDT_MAGIC:
                    size = ctx.page_size
                else:
                    size = min(int.from_bytes(head[4:8], "big"), MAX_UNSIZED_BLOB)
            return inp.memory.read(phys, size), "memory"
        except MemoryUnavailable:
            pass
    if name in inp.sub_blobs:
        return inp.sub_blobs[name], "debugfs"
    where = f" at {phys:#x}" if phys else ""
    ctx.add("memory-unavailable", path, f"the {name} subtree blob{where} is neither in the "
            "memory source nor among the sub_fdts copies; it was not decoded")
    return None, "none"


def decode_state(inp: KhoInput) -> KhoState:
    # A large state decodes into hundreds of thousands of small records and no reference cycles:
    # the cyclic collector would traverse the growing result over and over without freeing
    # anything (about 45% of the time for 100k memfds), so it is paused for the decode.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _decode_state(inp)
    finally:
        if enabled:
            gc.enable()


def _decode_state(inp: KhoInput) -> KhoState:
    ctx = DecodeContext(inp.memory, inp.side, inp.page_shift)
    root, root_source = _root(inp, ctx)
    fmt = registry.kho_root(root.compatible) if root else None
    if root is not None:
        for code, path, message in root.problems:
            ctx.add(code, path, message)
        if fmt is None and root.compatible:
            consequence = ("a kernel that speaks another version disables KHO revival and every "
                           "preserved page is lost")
            if composite.is_composite(root.compatible):
                composite.findings(ctx, "/", root.compatible, "KHO root", consequence)
            else:
                ctx.add("compatible-unknown", "/",
                        f"KHO root compatible {root.compatible!r} is unknown to this decoder "
                        f"(known: {', '.join(registry.ROOT_FORMATS)}); {consequence}")

    # Subtrees: those the root lists, else the debugfs copies (truncated or absent root FDT).
    refs: list[tuple[str, int | None, int | None]]
    if root is not None and not root.recovered:
        refs = [(s.name, s.phys, s.size) for s in root.subtrees]
        for s in root.subtrees:
            for code, message in s.problems:
                ctx.add(code, f"/{s.name}", message)
        for extra in sorted(set(inp.sub_blobs) - {s.name for s in root.subtrees}):
            refs.append((extra, None, None))
            ctx.add("count-mismatch", f"/{extra}", f"sub_fdts has {extra!r} but the root FDT "
                    "does not list it")
    else:
        refs = [(name, None, None) for name in sorted(inp.sub_blobs)]

    subtrees: list[Subtree] = []
    for name, phys, size in refs:
        path = f"/{name}"
        if phys is not None and inp.side is Side.OUT and phys % 8:
            ctx.add("misaligned", path, f"subtree data address {phys:#x} is not 8-aligned")
        blob, source = _fetch(inp, ctx, name, phys, size)
        if phys is not None and inp.side is Side.OUT:
            # An unsized blob (kho-v1, first kho-v2) reaches as far as its FDT totalsize, which
            # may be more than one page.
            length = size if size is not None else max(ctx.page_size, len(blob or b""))
            ctx.ref(phys, length, path, f"{name} subtree blob")
        sub = Subtree(name, phys, size if size is not None else (len(blob) if blob else None),
                      source)
        subtrees.append(sub)
        if blob is None:
            continue
        if size is not None and len(blob) != size:
            ctx.add("count-mismatch", path, f"blob-size is {size} but {len(blob)} bytes were "
                    "read")
        decoder = SUBTREE_DECODERS.get(name)
        if decoder is None:
            ctx.add("subtree-unknown", path, f"subtree {name!r} has no decoder here; its "
                    "contents were not checked (a newer kernel subsystem, or a test module)")
            continue
        sub.decoded = decoder(blob, ctx, path)

    if root is not None:
        _check_versions(ctx, root.compatible, subtrees)
    walk = _memmap(inp, ctx, root, fmt)
    scratch = list(inp.scratch)
    check_state(ctx, walk, scratch)
    return KhoState(inp.side, root.compatible if root else None, root_source,
                    root.fdt_size if root else None, root.memmap_phys if root else None, walk,
                    subtrees, scratch, ctx.findings, ctx.refs)


def _check_versions(ctx: DecodeContext, compatible: str, subtrees: list[Subtree]) -> None:
    if registry.kho_root(compatible) is None:
        return
    luo_ok, memfd_ok = registry.shipped_with(compatible)
    for sub in subtrees:
        state = sub.decoded
        if not isinstance(state, LuoState):
            continue
        if state.compatible not in luo_ok:
            ctx.add("compatible-mismatch", f"/{sub.name}",
                    f"LUO {state.compatible!r} under a {compatible!r} root: no kernel writes this "
                    f"pair (a {compatible} kernel speaks {', '.join(sorted(luo_ok))}); the state "
                    "was not produced by one kernel")
        for session in state.sessions:
            for f in session.files:
                if f.compatible.startswith("memfd-") and f.compatible not in memfd_ok:
                    ctx.add("compatible-mismatch", f"/{sub.name}/session[{session.name}]/file"
                            f"[{f.token:#x}]", f"{f.compatible!r} under a {compatible!r} root: "
                            f"kernels of that root speak {', '.join(sorted(memfd_ok))}")


def _memmap(inp: KhoInput, ctx: DecodeContext, root: KhoRoot | None,
            fmt: KhoRootVersion | None) -> MemoryMapWalk | None:
    path = "/preserved-memory-map"
    if root is None or root.memmap_phys is None or fmt is None:
        return None
    if root.memmap_phys == 0:
        if fmt.memmap_at_finalize and inp.side is Side.OUT:
            ctx.add("memmap-not-checked", path, f"preserved-memory-map is 0: a {fmt.compatible} "
                    "kernel writes the map only at finalize (inside reboot() with LUO)")
        else:
            ctx.add("property-malformed", path, "preserved-memory-map is 0; the next kernel "
                    "disables KHO revival and every preserved page is lost")
        return None
    if inp.side is Side.IN:
        ctx.add("memmap-not-checked", path, "on the incoming side the map's pages are no longer "
                "reserved and may hold other data; the map is checked on the outgoing side, "
                "before the kexec")
        return None
    if inp.memory is None:
        ctx.add("memmap-not-checked", path, f"the map at {root.memmap_phys:#x} was not read: no "
                "memory source (pass --memory CORE or --kcore)")
        return None
    try:
        return fmt.walk_memmap(inp.memory, root.memmap_phys, inp.page_shift)
    except AbiError as exc:
        ctx.add("blob-malformed", path, f"the preserved-memory map cannot be walked: {exc}")
        return None
