"""Human-readable tree of a decoded KHO state. One small function per record type."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..abi import KhoState, Severity
from ..abi.extents import ExtentMap
from ..abi.formats.kexec_metadata_v1 import KexecMetadata
from ..abi.formats.kho_selftest_v1 import KhoTestState
from ..abi.formats.memblock_v1 import MemblockState
from ..abi.luo_common import LuoState
from ..abi.memfd import MemfdState


def size_text(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << (shift - 4)) == 0:
            value = n / (1 << shift)
            return f"{value:g} {unit}"
    return f"{n} B"


class Tree:
    """Collects lines with ASCII branches: each node is (text, children)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def emit(self, nodes: list[tuple[str, list[Any]]], prefix: str = "") -> None:
        for i, (text, children) in enumerate(nodes):
            last = i == len(nodes) - 1
            self.lines.append(f"{prefix}{'`-' if last else '|-'} {text}")
            self.emit(children, prefix + ("   " if last else "|  "))


Node = tuple[str, list[Any]]


def _memfd(m: MemfdState) -> str:
    seals = f", seals {m.seals:#x}" if m.seals is not None else ""
    return (f"{m.compatible}: size {m.size} ({size_text(m.size)}), pos {m.pos}{seals}, "
            f"{m.nr_folios} folio(s)")


def _luo(s: LuoState) -> list[Node]:
    head = f"{s.compatible}, liveupdate-number {s.liveupdate_number}"
    if not s.sessions_serialized:
        head += ", sessions not serialized yet (sessions_pa = 0)"
    nodes: list[Node] = []
    for sess in s.sessions:
        files: list[Node] = []
        for f in sess.files:
            detail = _memfd(f.handler) if isinstance(f.handler, MemfdState) else f.compatible
            files.append((f"file token {f.token:#x} ({f.token}): {detail}", []))
        nodes.append((f"session {sess.name!r}: {sess.file_count} file(s)", files))
    for flb in s.flbs:
        nodes.append((f"flb {flb.name!r}: data {flb.data:#x}, {flb.count} file(s)", []))
    return [(head, nodes)]


def _memblock(s: MemblockState) -> list[Node]:
    regions: list[Node] = []
    for r in s.regions:
        where = (f"{r.start:#x} + {size_text(r.size)}" if r.start is not None and r.size
                 is not None else "no address")
        regions.append((f"reserve_mem {r.name!r} ({r.compatible}): {where}", []))
    return [(s.compatible, regions)]


def _kexec_metadata(m: KexecMetadata) -> list[Node]:
    return [(f"version {m.version}, previous release {m.previous_release!r}, kexec count "
             f"{m.kexec_count}", [])]


def _kho_test(t: KhoTestState) -> list[Node]:
    return [(f"{t.compatible}: {t.nr_folios} folio(s), csum {t.csum:#x}" if t.csum is not None
             else t.compatible, [])]


RENDERERS: dict[type, Callable[[Any], list[Node]]] = {
    LuoState: _luo,
    MemblockState: _memblock,
    KexecMetadata: _kexec_metadata,
    KhoTestState: _kho_test,
}


def _memmap_line(state: KhoState) -> Node:
    if state.memmap_phys is None:
        return ("preserved-memory-map: unknown", [])
    walk = state.memmap
    if walk is None:
        return (f"preserved-memory-map @ {state.memmap_phys:#x} (not walked)", [])
    m: ExtentMap = walk.extents
    orders = ", ".join(f"order {o}: {n}" for o, n in m.blocks_by_order().items())
    return (f"preserved-memory-map @ {walk.root:#x} ({walk.format}): {m.block_count()} "
            f"block(s) in {len(m)} extent(s), {size_text(m.total_bytes)}; "
            f"{len(walk.meta_pages)} map page(s)", [(orders, [])] if orders else [])


def render_state(state: KhoState, source: str) -> str:
    side = "outgoing" if state.side.value == "out" else "incoming"
    compat = state.compatible or "unknown"
    size = f", {state.fdt_size}-byte FDT" if state.fdt_size else ""
    tree = Tree()
    nodes: list[Node] = [_memmap_line(state)]
    if state.scratch:
        nodes.append(("scratch areas", [(f"{a.role}: {a.phys:#x} + {size_text(a.size)}", [])
                                         for a in state.scratch]))
    for sub in state.subtrees:
        where = f" @ {sub.phys:#x}" if sub.phys else ""
        size_s = f", {sub.size} bytes" if sub.size is not None else ""
        render = RENDERERS.get(type(sub.decoded))
        children = render(sub.decoded) if render and sub.decoded is not None else []
        nodes.append((f"{sub.name}{where}{size_s} (from {sub.source})", children))
    tree.emit(nodes)
    out = [f"KHO state ({side}) from {source}", f"root compatible {compat}{size}", *tree.lines]
    out.append("")
    out.extend(render_findings(state))
    return "\n".join(out)


def render_findings(state: KhoState) -> list[str]:
    counts = {sev: sum(1 for f in state.findings if f.severity is sev) for sev in Severity}
    lines = [f"Findings: {counts[Severity.ERROR]} error(s), {counts[Severity.WARNING]} "
             f"warning(s), {counts[Severity.INFO]} info"]
    order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
    for f in sorted(state.findings, key=lambda f: order[f.severity]):
        lines.append(f"  [{f.severity.value}] {f.code} {f.path}: {f.message}")
    return lines
