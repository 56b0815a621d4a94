"""The decoder against state captured from a real 7.3-rc7 KHO/LUO kernel (tests/data)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kho_agent.abi import KhoInput, KhoState, Severity, Side, decode_state, kho_root
from kho_agent.abi.context import DecodeContext
from kho_agent.abi.formats import kexec_metadata_v1 as kexec_metadata
from kho_agent.abi.formats import kho_selftest_v1 as kho_test
from kho_agent.abi.formats import luo_v5
from kho_agent.abi.formats import memblock_v1 as memblock
from kho_agent.abi.formats.memblock_v1 import MemblockState
from kho_agent.abi.jsonview import to_json
from kho_agent.abi.luo_common import LuoState
from kho_agent.abi.memfd import MemfdState
from kho_agent.abi.memory import PageAllocator, SparseMemory
from kho_agent.kernel.debugfs import read_snapshot
from kho_agent.kernel.physmem import ElfCoreMemory


def load_case(case: Path, side: Side, *, memory: bool = True) -> KhoState:
    snap = read_snapshot(str(case))
    mem = ElfCoreMemory(str(case / "memory.core")) if memory else None
    try:
        return decode_state(KhoInput(snap.fdt, snap.sub_blobs, [], mem, side))
    finally:
        if mem is not None:
            mem.close()


def flatten(obj: Any) -> Iterator[Any]:
    if isinstance(obj, dict):
        for v in obj.values():
            yield from flatten(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from flatten(v)
    else:
        yield obj


def subtree(state: KhoState, name: str) -> Any:
    for s in state.subtrees:
        if s.name == name:
            return s.decoded
    raise AssertionError(f"no subtree {name}")


def errors(state: KhoState) -> list[str]:
    return [f"{f.code} {f.path}: {f.message}" for f in state.findings
            if f.severity is Severity.ERROR]


@pytest.mark.parametrize("case,side", [("case-out-1", Side.OUT), ("case-in-1", Side.IN)])
def test_expected_values_present_in_json(samples_dir: Path, case: str, side: Side) -> None:
    expect = json.loads((samples_dir / case / "expect.json").read_text())
    assert expect["side"] == side.value
    state = load_case(samples_dir / case, side)
    values = set(flatten(to_json(state)))
    missing = [v for v in expect["contains"] if v not in values]
    assert missing == []
    assert errors(state) == []


def test_outgoing_case_decodes_radix_map_and_subtrees(samples_dir: Path) -> None:
    state = load_case(samples_dir / "case-out-1", Side.OUT)
    assert state.compatible == "kho-v4"
    assert state.fdt_size == 405
    assert state.memmap_phys == 0x276C000
    assert state.memmap is not None
    m = state.memmap.extents
    # figures from the capture's own reference decode (README of case-out-1)
    assert len(state.memmap.meta_pages) == 45
    assert m.block_count() == 1094
    assert m.total_bytes == 13856768
    assert m.blocks_by_order() == {0: 1079, 1: 4, 2: 2, 4: 1, 5: 1, 6: 1, 7: 3, 8: 1, 9: 1,
                                   10: 1}
    assert [s.name for s in state.subtrees] == ["memblock", "LUO", "kho_test", "kexec-metadata"]
    assert {s.name: (s.phys, s.size) for s in state.subtrees} == {
        "memblock": (0x42F5000, 218), "LUO": (0x42F3000, 32), "kho_test": (0x24BE000, 240),
        "kexec-metadata": (0x2773000, 73)}
    mb = subtree(state, "memblock")
    assert isinstance(mb, MemblockState)
    assert [(r.name, r.compatible, r.start, r.size) for r in mb.regions] == [
        ("kho_demo_rsv", "reserve-mem-v1", 0x7C300000, 0x100000)]
    luo = subtree(state, "LUO")
    assert isinstance(luo, LuoState)
    assert (luo.compatible, luo.liveupdate_number, luo.sessions_phys, luo.flbs_phys) == \
        ("luo-v5", 1, 0, 0x42F4000)
    assert not luo.sessions_serialized and luo.flbs == [] and luo.flb_pgcnt == 1
    meta = subtree(state, "kexec-metadata")
    assert (meta.version, meta.previous_release, meta.kexec_count) == (1, "7.3.0-rc7-kho", 1)
    codes = {f.code for f in state.findings}
    assert "sessions-not-serialized" in codes
    # every structure the decoder saw is inside the preserved map: the check had work to do
    assert any(r.what == "reserve_mem region 'kho_demo_rsv'" for r in state.refs)
    assert not [f for f in state.findings if f.code == "not-preserved"]


def test_incoming_case_sessions_tokens_and_memfds(samples_dir: Path) -> None:
    state = load_case(samples_dir / "case-in-1", Side.IN)
    luo = subtree(state, "LUO")
    assert isinstance(luo, LuoState)
    assert (luo.liveupdate_number, luo.sessions_phys, luo.flbs_phys) == (1, 0x7EB13000, 0x2C3E000)
    got = {s.name: [(f.token, f.compatible) for f in s.files] for s in luo.sessions}
    assert got == {
        "kexec_simple_state": [(0x3E7, "memfd-v2")],
        "test-session": [(0x1A, "memfd-v2")],
        "kexec_multi_state": [(0x3E6, "memfd-v2")],
        "multi-test-empty-1": [],
        "multi-test-empty-2": [],
        "multi-test-files-1": [(0x1001, "memfd-v2")],
        "multi-test-files-2": [(0x2002, "memfd-v2"), (0x3003, "memfd-v2")],
        "kho-demo": [(0x1001, "memfd-v2"), (0x1002, "memfd-v2")],
        "kho-demo-2": [(0x2001, "memfd-v2")],
    }
    memfds = {(s.name, f.token): f.handler for s in luo.sessions for f in s.files}
    demo = memfds[("kho-demo", 0x1001)]
    assert isinstance(demo, MemfdState)
    assert (demo.size, demo.pos, demo.seals, demo.nr_folios) == (4096, 50, 0x6, 1)
    big = memfds[("kho-demo", 0x1002)]
    assert isinstance(big, MemfdState)
    assert (big.size, big.nr_folios, big.folios_read) == (4194304, 1024, 1024)
    assert big.folio_flags == {0x3: 1024}  # holes were materialised: all dirty|uptodate
    small = memfds[("kho-demo-2", 0x2001)]
    assert isinstance(small, MemfdState)
    assert (small.size, small.pos) == (15, 15)
    # the first data page of token 0x1a holds the selftest's payload
    simple = memfds[("test-session", 0x1A)]
    assert isinstance(simple, MemfdState) and simple.first_page is not None
    with ElfCoreMemory(str(samples_dir / "case-in-1" / "memory.core")) as mem:
        assert mem.read(simple.first_page, 17) == b"hello kexec world"
        assert mem.read(demo.first_page or 0, 21) == b"KHO-LUO demo payload:"
    assert [(f.name, f.data, f.count) for f in luo.flbs] == [
        (f"liveupdate-test-flb-v{i}", 0xFEEDF00DCAFEBEE0 + i, 9) for i in range(3)]
    assert errors(state) == []
    assert {f.code for f in state.findings} >= {"memmap-not-checked"}


def test_real_blobs_reencode_byte_exact(samples_dir: Path) -> None:
    """Our encoders write exactly the bytes the real kernel wrote."""
    case = samples_dir / "case-out-1"
    ctx = DecodeContext(None)
    blobs = {p.name: p.read_bytes() for p in (case / "sub_fdts").iterdir()}
    mb = memblock.decode(blobs["memblock"], ctx, "/memblock")
    assert mb is not None and memblock.encode(mb) == blobs["memblock"]
    kt = kho_test.decode(blobs["kho_test"], ctx, "/kho_test")
    assert kt is not None and kho_test.encode(kt) == blobs["kho_test"]
    meta = kexec_metadata.decode(blobs["kexec-metadata"], ctx, "/kexec-metadata")
    assert meta is not None and kexec_metadata.encode(meta) == blobs["kexec-metadata"]
    root_blob = (case / "fdt").read_bytes()
    root = kho_root.decode_root(root_blob)
    # the kernel added subtrees in initcall order; each lands first, so reverse the listing
    added = [(s.name, s.phys or 0, s.size) for s in reversed(root.subtrees)]
    assert kho_root.encode_root(root.compatible, root.memmap_phys or 0, added) == root_blob
    # luo_ser of the outgoing side: sessions not serialized, FLB page at a fixed address
    mem = SparseMemory()
    state = LuoState("luo-v5", 1, 0, 0x42F4000, sessions_serialized=False)
    assert luo_v5.encode(state, mem, PageAllocator(), serialize_sessions=False) == blobs["LUO"]
    with ElfCoreMemory(str(case / "memory.core")) as core:
        assert mem.read(0x42F4000, 4096) == core.read(0x42F4000, 4096)


def test_incoming_luo_ser_reencodes(samples_dir: Path) -> None:
    blob = (samples_dir / "case-in-1" / "sub_fdts" / "LUO").read_bytes()
    assert blob[:8] == b"luo-v5\0\0"
    assert struct.unpack_from("<QQQ", blob, 8) == (1, 0x7EB13000, 0x2C3E000)


def test_truncated_debugfs_fdt_is_reported_and_recovered(samples_dir: Path) -> None:
    snap = read_snapshot(str(samples_dir / "debugfs" / "stage1-3-loaded" / "out"))
    assert snap.fdt is not None and len(snap.fdt) == 233
    with ElfCoreMemory(str(samples_dir / "case-out-1" / "memory.core")) as mem:
        from kho_agent.abi.kho_state import ScratchArea, scratch_roles
        scratch = [ScratchArea(p, n, r) for p, n, r in
                   zip(snap.scratch_phys, snap.scratch_len, scratch_roles(3), strict=True)]
        state = decode_state(KhoInput(snap.fdt, snap.sub_blobs, scratch, mem, Side.OUT))
    truncated = [f for f in state.findings if f.code == "debugfs-fdt-truncated"]
    assert len(truncated) == 1 and truncated[0].severity is Severity.INFO
    assert "233 of 405" in truncated[0].message
    assert state.root_source == "truncated-fdt"
    assert (state.compatible, state.memmap_phys) == ("kho-v4", 0x276C000)
    assert state.memmap is not None and state.memmap.extents.block_count() == 1094
    assert [a.role for a in state.scratch] == ["lowmem", "global", "node 0"]
    assert {s.name: s.source for s in state.subtrees} == {
        "LUO": "debugfs", "kexec-metadata": "debugfs", "kho_test": "debugfs",
        "memblock": "debugfs"}
    assert errors(state) == []


def test_kho_booted_kernel_without_out_fdt(samples_dir: Path) -> None:
    snap = read_snapshot(str(samples_dir / "debugfs" / "stage2-1-boot" / "out"))
    assert snap.fdt is None
    state = decode_state(KhoInput(snap.fdt, snap.sub_blobs, [], None, Side.OUT))
    assert [f.code for f in state.findings if f.code.startswith("debugfs")] == \
        ["debugfs-fdt-absent"]
    luo = subtree(state, "LUO")
    assert isinstance(luo, LuoState) and luo.liveupdate_number == 2
    assert subtree(state, "kexec-metadata").kexec_count == 2
    assert errors(state) == []


def test_freed_incoming_luo_blob_is_info_not_error(samples_dir: Path) -> None:
    snap = read_snapshot(str(samples_dir / "debugfs" / "stage2-1-boot" / "in"))
    assert snap.sub_blobs["LUO"].startswith(b"#!/bin/busybox sh")
    state = decode_state(KhoInput(snap.fdt, snap.sub_blobs, [], None, Side.IN))
    freed = [f for f in state.findings if f.code == "luo-blob-freed"]
    assert len(freed) == 1 and freed[0].severity is Severity.INFO and freed[0].path == "/LUO"
    assert errors(state) == []
    # the same garbage on the outgoing side is a real defect
    out = decode_state(KhoInput(snap.fdt, snap.sub_blobs, [], None, Side.OUT))
    assert any(f.code == "blob-malformed" and f.path == "/LUO" for f in out.findings)


def test_incoming_memory_map_pages_reused_is_not_an_error(samples_dir: Path) -> None:
    """case-in-1's core lacks the radix pages (reused after boot): --in must not walk it."""
    state = load_case(samples_dir / "case-in-1", Side.IN)
    assert state.memmap is None
    state_out = load_case(samples_dir / "case-in-1", Side.OUT)
    assert any(f.code == "memory-unavailable" and f.path == "/preserved-memory-map"
               for f in state_out.findings)
    assert errors(state_out) == []


def test_scratch_overlap_detected_on_real_map(samples_dir: Path) -> None:
    """Put a fake scratch area over the real reserve_mem region: the check must fire."""
    snap = read_snapshot(str(samples_dir / "case-out-1"))
    from kho_agent.abi.kho_state import ScratchArea
    with ElfCoreMemory(str(samples_dir / "case-out-1" / "memory.core")) as mem:
        state = decode_state(KhoInput(snap.fdt, snap.sub_blobs,
                                      [ScratchArea(0x7C000000, 0x1000000, "global")], mem,
                                      Side.OUT))
    hits = [f for f in state.findings if f.code == "scratch-overlap"]
    assert len(hits) == 1 and "0x7c300000" in hits[0].message
    assert hits[0].severity is Severity.ERROR
