"""Whole states of every KHO/LUO era, built with the encoders and read back with decode_state().

(a) kho-v1 root (subtrees are FDTs under `fdt`) + chunk-list map, both bitmap sizes, luo-v1 with
    memfd-v1 files and memblock;                                                    6.16 .. 7.0
(b) kho-v2 without and with blob-size + the first radix depth formula;               7.1
(c) kho-v3 + luo-v1;                                                                 7.1 .. 7.2-rc1
(d) kho-v4 + luo-v5 + memfd-v2 with serialized sessions;                             7.2 ..
Then every check, each fired by one defect in an otherwise healthy state.
"""

from __future__ import annotations

import struct

import pytest
from synth import DATA_START, META_START, Synth, block_set, codes, subtree_record

from kho_agent.abi import ScratchArea, Side, block, decode_state, memfd
from kho_agent.abi.errors import AbiError
from kho_agent.abi.fdt import FdtTree, FdtWriter
from kho_agent.abi.formats import kexec_metadata_v1 as kexec_metadata
from kho_agent.abi.formats import luo_v5
from kho_agent.abi.formats.kexec_metadata_v1 import KexecMetadata
from kho_agent.abi.formats.memblock_v1 import MemblockState
from kho_agent.abi.kho_root import encode_root
from kho_agent.abi.kho_state import KhoInput, KhoState
from kho_agent.abi.luo_common import LuoFile, LuoState
from kho_agent.abi.memfd import MemfdState
from kho_agent.abi.memory import PageAllocator, SparseMemory
from kho_agent.abi.radix import RadixGeometry, radix_encode
from kho_agent.abi.registry import MEMMAP_FORMATS

PAGE = 4096
MAP = "/preserved-memory-map"
CONTENT = b"kho-agent " * 600  # 6000 bytes: two pages
KEXEC_METADATA_BLOB = kexec_metadata.encode(KexecMetadata(1, "7.3.0", 1))


def _luo(state: KhoState) -> LuoState:
    luo = subtree_record(state, "LUO")
    assert isinstance(luo, LuoState)
    return luo


def _memfd(f: LuoFile) -> MemfdState:
    assert isinstance(f.handler, MemfdState)
    return f.handler


def _sessions(luo: LuoState) -> list[tuple[str, list[tuple[int, str]]]]:
    return [(s.name, [(f.token, f.compatible) for f in s.files]) for s in luo.sessions]


def _check_map(state: KhoState, s: Synth, fmt: str) -> None:
    assert state.memmap is not None
    assert state.memmap.format == fmt
    assert state.memmap.root == state.memmap_phys
    assert block_set(state.memmap.extents, s.page_shift) == block_set(s.blocks(), s.page_shift)
    assert state.memmap.issues == [] and state.memmap.missing_pages == []
    assert all(META_START <= p < s.meta_alloc.next for p in state.memmap.meta_pages)


# ----------------------------------------------------------------------------- (a) kho-v1


def _kho_v1(memmap: str) -> tuple[Synth, KhoInput]:
    s = Synth()
    big = s.memfd_file("memfd-v1", 0x1a, CONTENT, pos=17)
    holes = s.memfd_file("memfd-v1", 0x1b, b"", size=3 * PAGE + 5)
    s.luo_v1({"vm-7": [big, holes], "idle": []}, number=5, sized=False)
    s.memblock({"kho_demo_rsv": 1 << 20}, align=1 << 20, sized=False)
    return s, s.finish("kho-v1", memmap)


@pytest.mark.parametrize("memmap", ["chunks-page", "chunks-512"])
def test_kho_v1_state(memmap: str) -> None:
    s, inp = _kho_v1(memmap)
    state = decode_state(inp)
    assert codes(state) == []
    assert (state.compatible, state.root_source) == ("kho-v1", "fdt")
    _check_map(state, s, memmap)
    # The 1 MiB-aligned reserve_mem region is one order-8 block (kho_preserve_pages()).
    assert state.memmap is not None
    mb = subtree_record(state, "memblock")
    assert isinstance(mb, MemblockState)
    assert [(r.name, r.compatible, r.size) for r in mb.regions] == [
        ("kho_demo_rsv", "reserve-mem-v1", 1 << 20)]
    assert mb.regions[0].start is not None
    assert (mb.regions[0].start, 8) in block_set(state.memmap.extents)
    # kho-v1 roots carry no size: it comes from each subtree FDT's own totalsize.
    assert [(sub.name, sub.phys is not None and sub.phys >= DATA_START, sub.source)
            for sub in state.subtrees] == [("memblock", True, "memory"), ("LUO", True, "memory")]
    assert all(sub.size and sub.size < PAGE for sub in state.subtrees)
    luo = _luo(state)
    assert (luo.compatible, luo.liveupdate_number) == ("luo-v1", 5)
    assert (luo.session_compatible, luo.flb_compatible) == ("luo-session-v2", "luo-flb-v1")
    assert _sessions(luo) == [("vm-7", [(0x1a, "memfd-v1"), (0x1b, "memfd-v1")]), ("idle", [])]
    first, second = (_memfd(f) for f in luo.sessions[0].files)
    assert (first.pos, first.size, first.seals, first.nr_folios) == (17, 6000, None, 2)
    assert (second.pos, second.size, second.nr_folios) == (0, 3 * PAGE + 5, 4)
    assert first.first_page is not None
    assert s.memory.read(first.first_page, 10) == b"kho-agent "


def test_kho_v1_roots_have_no_blob_size() -> None:
    _, inp = _kho_v1("chunks-page")
    assert inp.root_fdt is not None
    assert b"blob-size" not in inp.root_fdt and b"preserved-data" not in inp.root_fdt
    assert b"fdt\0" in inp.root_fdt


def test_kho_v1_subtree_that_is_not_an_fdt() -> None:
    s = Synth()
    s.place("memblock", b"memblock-v1\0" + bytes(20), sized=False)
    state = decode_state(s.finish("kho-v1", "chunks-page"))
    # An unsized kho-v1 blob without FDT magic is read as one page, then refused.
    assert codes(state) == [("blob-malformed", "error", "/memblock")]
    assert state.subtrees[0].size == PAGE


# ----------------------------------------------------------------------------- (b) kho-v2


def _kho_v2(sized: bool, page_shift: int = 12) -> tuple[Synth, KhoInput]:
    s = Synth(page_shift)
    f = s.memfd_file("memfd-v2", 0x2001, CONTENT, seals=0x5)
    s.luo_v1({"kho-demo": [f]}, number=2, sized=sized)
    s.memblock({"rsv": 4 * s.page_size}, sized=sized)
    s.kexec_metadata("7.1.0-kho", 2, sized=sized)
    return s, s.finish("kho-v2", "radix-v2-early")


@pytest.mark.parametrize("sized", [False, True], ids=["first-form", "blob-size"])
def test_kho_v2_state(sized: bool) -> None:
    s, inp = _kho_v2(sized)
    assert inp.root_fdt is not None
    assert (b"blob-size" in inp.root_fdt) is sized
    state = decode_state(inp)
    assert codes(state) == []
    assert state.compatible == "kho-v2"
    _check_map(state, s, "radix-v2-early")
    sizes = {sub.name: sub.size for sub in state.subtrees}
    assert sizes["kexec-metadata"] == (73 if sized else PAGE)  # unsized non-FDT: one page read
    meta = subtree_record(state, "kexec-metadata")
    assert meta == KexecMetadata(1, "7.1.0-kho", 2)
    luo = _luo(state)
    assert (luo.compatible, luo.liveupdate_number) == ("luo-v1", 2)
    assert _sessions(luo) == [("kho-demo", [(0x2001, "memfd-v2")])]
    mfd = _memfd(luo.sessions[0].files[0])
    assert (mfd.pos, mfd.size, mfd.seals, mfd.flags, mfd.nr_folios) == (0, 6000, 0x5, 0, 2)


def test_kho_v2_early_radix_depth_at_16k_pages() -> None:
    # Where the first kho-v2 depth formula differs: 4 levels at 16 KiB pages, not 5. Four levels
    # index 50 key bits, one short of an order-0 key (order bit 50): the defect `+ 1` fixed.
    early = RadixGeometry(14, depth_plus_one=False)
    assert (early.depth, RadixGeometry(14).depth) == (4, 5)
    memory = SparseMemory(1 << 14)
    alloc = PageAllocator(META_START, 1 << 14)
    with pytest.raises(AbiError, match="-ERANGE"):
        radix_encode([(0x1000_0000, 1 << 14, 0)], memory, alloc, early)
    root = radix_encode([(0x1000_0000, 1 << 15, 1)], memory, alloc, early)
    walk = MEMMAP_FORMATS["radix-v2-early"](memory, root, 14)
    assert [(e.phys, e.size, e.order) for e in walk.extents] == [(0x1000_0000, 1 << 15, 1)]


def test_kho_v2_state_at_64k_pages() -> None:
    s, inp = _kho_v2(True, page_shift=16)
    state = decode_state(inp)
    assert codes(state) == []
    _check_map(state, s, "radix-v2-early")
    assert _sessions(_luo(state)) == [("kho-demo", [(0x2001, "memfd-v2")])]
    assert _memfd(_luo(state).sessions[0].files[0]).nr_folios == 1


# ----------------------------------------------------------------------------- (c) kho-v3


def test_kho_v3_state() -> None:
    s = Synth()
    files = [s.memfd_file("memfd-v2", 0x100 + i, bytes([i]) * (i * 1000)) for i in range(3)]
    s.luo_v1({"db": files, "cache": []}, number=9)
    s.kexec_metadata("7.2.0-rc1", 1)
    state = decode_state(s.finish("kho-v3", "radix"))
    assert codes(state) == []
    assert state.compatible == "kho-v3"
    _check_map(state, s, "radix")
    luo = _luo(state)
    assert (luo.compatible, luo.liveupdate_number) == ("luo-v1", 9)
    assert _sessions(luo) == [("db", [(0x100, "memfd-v2"), (0x101, "memfd-v2"),
                                      (0x102, "memfd-v2")]), ("cache", [])]
    assert [_memfd(f).size for f in luo.sessions[0].files] == [0, 1000, 2000]
    assert [_memfd(f).nr_folios for f in luo.sessions[0].files] == [0, 1, 1]


# ----------------------------------------------------------------------------- (d) kho-v4


def test_kho_v4_state_with_serialized_sessions() -> None:
    s = Synth()
    # 60 sessions span two session blocks (51 per block); 70 files span two file blocks (63).
    many = [s.memfd_file("memfd-v2", 0x1000 + i, b"") for i in range(70)]
    sessions = [("vm-7", [s.memfd_file("memfd-v2", 0x1a, CONTENT, pos=3, seals=0x3f)]),
                ("many", many)] + [(f"s{i}", []) for i in range(58)]
    s.luo_v5(sessions, number=4)
    s.kexec_metadata("7.3.0-rc7-kho", 3)
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == []
    _check_map(state, s, "radix")
    luo = _luo(state)
    assert (luo.compatible, luo.liveupdate_number, luo.sessions_serialized) == ("luo-v5", 4, True)
    assert [x.name for x in luo.sessions] == ["vm-7", "many"] + [f"s{i}" for i in range(58)]
    assert [f.token for f in luo.sessions[1].files] == [0x1000 + i for i in range(70)]
    mfd = _memfd(luo.sessions[0].files[0])
    assert (mfd.pos, mfd.size, mfd.seals, mfd.nr_folios) == (3, 6000, 0x3f, 2)
    assert mfd.folio_flags == {memfd.FOLIO_DIRTY | memfd.FOLIO_UPTODATE: 2}


def test_kho_v4_state_before_reboot() -> None:
    s = Synth()
    s.luo_v5({"vm-7": [s.memfd_file("memfd-v2", 0x1a, CONTENT)]}, serialize=False)
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == [("sessions-not-serialized", "info", "/LUO")]
    luo = _luo(state)
    assert (luo.sessions_phys, luo.sessions, luo.sessions_serialized) == (0, [], False)


# ----------------------------------------------------------------------------- checks


def _v5_state(sessions: dict[str, list[LuoFile]] | list[tuple[str, list[LuoFile]]]
              ) -> tuple[Synth, LuoState]:
    s = Synth()
    return s, s.luo_v5(sessions)


def _finding(state: KhoState, code: str) -> tuple[str, str, str]:
    hits = [c for c in codes(state) if c[0] == code]
    assert hits, f"{code} not among {codes(state)}"
    return hits[0]


def test_unknown_root_compatible() -> None:
    w = FdtWriter().begin_node("").property_string("compatible", "kho-v9")
    blob = w.property_u64("preserved-memory-map", 0x1000).end_node().finish()
    state = decode_state(KhoInput(blob, memory=Synth().memory))
    assert codes(state) == [("compatible-unknown", "error", "/")]
    assert state.compatible == "kho-v9" and state.memmap is None


def test_unknown_raw_luo_version() -> None:
    s = Synth()
    s.place("LUO", b"luo-v9\0\0" + struct.pack("<QQQ", 1, 0, 0))
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == [("compatible-unknown", "error", "/LUO")]
    assert "'luo-v9'" in state.findings[0].message


def test_unknown_file_handler() -> None:
    s = Synth()
    s.luo_v5({"vm-7": [LuoFile(0, "memfd-v9", 0x1a, 0x1234_5000)]})
    state = decode_state(s.finish("kho-v4", "radix"))
    assert ("handler-unknown", "error", "/LUO/session[vm-7]/file[0x1a]") in codes(state)
    assert "'memfd-v9'" in next(f.message for f in state.findings if f.code == "handler-unknown")


def test_root_lacks_memory_map() -> None:
    w = FdtWriter().begin_node("").property_string("compatible", "kho-v4").end_node()
    state = decode_state(KhoInput(w.finish(), memory=Synth().memory))
    assert codes(state) == [("property-missing", "error", "/")]


def test_root_memory_map_malformed() -> None:
    w = FdtWriter().begin_node("").property_string("compatible", "kho-v4")
    blob = w.property_u32("preserved-memory-map", 0x1000).end_node().finish()
    state = decode_state(KhoInput(blob, memory=Synth().memory))
    assert codes(state) == [("property-malformed", "error", "/")]


def test_kho_v3_subtree_without_blob_size() -> None:
    s = Synth()
    s.luo_v1({"vm-7": []}, sized=False)
    state = decode_state(s.finish("kho-v3", "radix"))
    assert codes(state) == [("property-missing", "error", "/LUO")]
    assert "blob-size" in state.findings[0].message


def test_subtree_data_pointer_malformed() -> None:
    s = Synth()
    s.kexec_metadata("7.3.0", 1)
    root = encode_root("kho-v4", s.write_map("radix"), [])
    tree = FdtTree.open(root)
    tree.add_subnode("/", "kexec-metadata")
    tree.setprop("/kexec-metadata", "preserved-data", b"\0\0\0\x10")
    tree.setprop("/kexec-metadata", "blob-size", struct.pack("<Q", 73))
    state = decode_state(KhoInput(tree.pack(), memory=s.memory))
    assert ("property-malformed", "error", "/kexec-metadata") in codes(state)


def test_luo_v1_without_liveupdate_number() -> None:
    s = Synth()
    w = FdtWriter().begin_node("").property_string("compatible", "luo-v1")
    w.begin_node("luo-session").property_string("compatible", "luo-session-v2")
    w.property_u64("luo-session-header", 0).end_node()
    s.place("LUO", w.end_node().finish())
    state = decode_state(s.finish("kho-v3", "radix"))
    assert codes(state) == [("property-missing", "error", "/LUO")]
    assert "liveupdate-number" in state.findings[0].message


def test_blob_not_preserved() -> None:
    s = Synth()
    s.memblock({"rsv": PAGE})
    s.place("kexec-metadata", KEXEC_METADATA_BLOB, preserved=False)
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == [("not-preserved", "error", "/kexec-metadata")]


@pytest.mark.parametrize("memmap", ["chunks-page", "chunks-512"])
def test_blob_not_preserved_in_kho_v1_map(memmap: str) -> None:
    s = Synth()
    s.memblock({"rsv": PAGE}, sized=False)
    s.luo_v1({"vm-7": []}, sized=False)
    s.unpreserved.add(s.subtrees[-1][1])
    state = decode_state(s.finish("kho-v1", memmap))
    assert codes(state) == [("not-preserved", "error", "/LUO")]


def test_preserved_memory_in_scratch() -> None:
    s = Synth()
    s.memblock({"rsv": 1 << 20}, align=1 << 20)
    region = s.alloc.preserved[0][0]
    scratch = [ScratchArea(region + 0x8_0000, 0x1000, "lowmem"),
               ScratchArea(0x7000_0000, 0x100_0000, "global")]
    state = decode_state(s.finish("kho-v4", "radix", scratch=scratch))
    assert codes(state) == [("scratch-overlap", "error", MAP)]
    assert f"order-8 range {region:#x}+0x100000 overlaps the lowmem" in state.findings[0].message


def test_map_pages_in_scratch() -> None:
    s = Synth()
    s.memblock({"rsv": PAGE})
    state = decode_state(s.finish("kho-v1", "chunks-page",
                                  scratch=[ScratchArea(META_START, 1 << 20, "node 0")]))
    assert codes(state) == [("scratch-overlap", "error", MAP)]
    assert "of the map itself" in state.findings[0].message


def test_misaligned_subtree_address() -> None:
    s = Synth()
    phys = s.place("kexec-metadata", KEXEC_METADATA_BLOB)
    s.memory.write(phys + 4, KEXEC_METADATA_BLOB)
    s.subtrees[-1] = ("kexec-metadata", phys + 4, len(KEXEC_METADATA_BLOB))
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == [("misaligned", "error", "/kexec-metadata")]
    assert subtree_record(state, "kexec-metadata") == KexecMetadata(1, "7.3.0", 1)


def test_misaligned_session_block() -> None:
    s, luo = _v5_state({"vm-7": []})
    s.write_u64(luo.sessions_phys, s.alloc.alloc(PAGE) + 8)  # next -> inside a page
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == [("misaligned", "error", "/LUO/sessions-block[1]")]


def test_session_chain_cycle() -> None:
    s, luo = _v5_state({"vm-7": []})
    s.write_u64(luo.sessions_phys, luo.sessions_phys)
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == [("chain-cycle", "error", "/LUO/sessions-block[1]")]
    assert [x.name for x in _luo(state).sessions] == ["vm-7"]


def test_file_chain_too_long(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Synth()
    files = [s.memfd_file("memfd-v2", 0x1000 + i, b"") for i in range(64)]  # two file blocks
    s.luo_v5({"vm-7": files})
    monkeypatch.setattr(block, "MAX_BLOCKS", 1)
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == [("chain-too-long", "error", "/LUO/session[vm-7]/files-block[1]")]
    assert len(_luo(state).sessions[0].files) == 63  # the first block is still read


def test_empty_session_block_after_full_one() -> None:
    # The duplicate-CREATE_SESSION pitfall: 51 sessions fill a block and an empty one follows.
    s, luo = _v5_state({f"s{i}": [] for i in range(51)})
    empty = s.alloc.alloc(PAGE)
    s.memory.write(empty, bytes(PAGE))
    s.write_u64(luo.sessions_phys, empty)
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == [("block-count-invalid", "error", "/LUO/sessions-block[1]")]
    assert "count 0" in state.findings[0].message and "panics" in state.findings[0].message
    assert len(_luo(state).sessions) == 51


def test_file_count_mismatch() -> None:
    s = Synth()
    luo = s.luo_v5({"vm-7": [s.memfd_file("memfd-v2", 0x1a, b"a"),
                             s.memfd_file("memfd-v2", 0x1b, b"b")]})
    s.write_u64(s.session_entry(luo, 0) + 72, 3)  # luo_file_set_ser.count
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == [("count-mismatch", "error", "/LUO/session[vm-7]")]
    assert "says 3 files but its blocks hold 2" in state.findings[0].message


def test_luo_v1_file_count_above_array() -> None:
    s = Synth()
    luo = s.luo_v1({"vm-7": []})
    s.write_u64(luo.sessions_phys + 8 + 72, 129)  # session 0 count: the array holds 128
    state = decode_state(s.finish("kho-v3", "radix"))
    assert codes(state) == [("count-mismatch", "error", "/LUO/session[vm-7]")]


def test_duplicate_session_names() -> None:
    s = Synth()
    s.luo_v5([("vm-7", []), ("other", []), ("vm-7", [])])
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == [("session-duplicate-name", "error", "/LUO/session[vm-7]")]


def test_duplicate_tokens() -> None:
    s = Synth()
    s.luo_v5({"vm-7": [s.memfd_file("memfd-v2", 0x1a, b"a"),
                       s.memfd_file("memfd-v2", 0x1a, b"b")]})
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == [("token-duplicate", "error", "/LUO/session[vm-7]/file[0x1a]")]


def test_session_name_without_nul() -> None:
    s = Synth()
    name = "n" * 64
    s.luo_v5({name: []})
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == [("name-unterminated", "error", f"/LUO/session[{name}]")]


def test_empty_session_name() -> None:
    s = Synth()
    s.luo_v1({"": []})
    state = decode_state(s.finish("kho-v3", "radix"))
    assert codes(state) == [("name-empty", "error", "/LUO/session[#0]")]


def test_memfd_folios_do_not_cover_size() -> None:
    s = Synth()
    f = s.memfd_file("memfd-v2", 0x1a, CONTENT)
    s.write_u64(f.data + 8, 8 << 20)  # size: 8 MiB, two folios
    s.luo_v5({"vm-7": [f]})
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == [("memfd-short", "error", "/LUO/session[vm-7]/file[0x1a]")]


def test_memfd_without_folios() -> None:
    s = Synth()
    f = s.memfd_file("memfd-v1", 0x1a, b"")
    s.write_u64(f.data + 8, PAGE)  # size one page, nr_folios 0
    s.luo_v1({"vm-7": [f]}, sized=False)
    state = decode_state(s.finish("kho-v1", "chunks-page"))
    assert codes(state) == [("memfd-short", "error", "/LUO/session[vm-7]/file[0x1a]")]


@pytest.mark.parametrize("memmap", ["chunks-page", "chunks-512"])
def test_kho_v1_chunk_with_too_many_elements(memmap: str) -> None:
    s, inp = _kho_v1(memmap)
    assert inp.memory is not None and inp.root_fdt is not None
    state = decode_state(inp)
    assert state.memmap_phys is not None
    s.memory.write(state.memmap_phys + 12, struct.pack("<I", 1000))
    state = decode_state(inp)
    assert ("block-count-invalid", "error", MAP) in codes(state)
    assert "num_elms 1000, capacity is 255" in state.findings[0].message


def test_incoming_side_skips_the_map() -> None:
    s, _ = _kho_v1("chunks-page")
    inp = s.finish("kho-v1", "chunks-page", side=Side.IN)
    state = decode_state(inp)
    assert codes(state) == [("memmap-not-checked", "info", MAP)]
    assert _sessions(_luo(state))[0][0] == "vm-7"


def test_luo_v5_blob_too_short() -> None:
    s = Synth()
    s.place("LUO", luo_v5.COMPATIBLE.encode().ljust(8, b"\0") + bytes(8))
    state = decode_state(s.finish("kho-v4", "radix"))
    assert codes(state) == [("blob-malformed", "error", "/LUO")]


def test_unsized_blob_longer_than_a_page_is_checked_whole() -> None:
    # kho-v1 subtrees carry no size; the FDT's totalsize says how far the blob reaches, and every
    # page of it must be preserved, not only the first.
    s = Synth()
    s.memblock({f"region{i:02}": PAGE for i in range(60)}, sized=False)
    phys = s.subtrees[-1][1]
    index = s.alloc.preserved.index((phys, 2 * PAGE))
    s.alloc.preserved[index] = (phys, PAGE)  # the blob's second page is not preserved
    state = decode_state(s.finish("kho-v1", "chunks-page"))
    assert state.subtrees[0].size is not None and state.subtrees[0].size > PAGE
    assert codes(state) == [("not-preserved", "error", "/memblock")]
