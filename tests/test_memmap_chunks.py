"""kho-v1 preserved-memory map: the khoser_mem_chunk list, both bitmap sizes."""

from __future__ import annotations

import struct
import time

import pytest
from synth import META_START, Synth, block_set, codes

from kho_agent.abi import decode_state
from kho_agent.abi import memmap_chunks as chunks
from kho_agent.abi.errors import AbiError
from kho_agent.abi.kho_root import encode_root
from kho_agent.abi.kho_state import KhoInput
from kho_agent.abi.memmap_chunks import (
    BITMAP_512_BYTES,
    ChunkEntry,
    capacity,
    chunks_walk,
    encode_chunks,
    read_chain,
)
from kho_agent.abi.memory import PageAllocator, SparseMemory
from kho_agent.abi.registry import MEMMAP_FORMATS

PAGE = 4096
MAP = "/preserved-memory-map"
# (phys, size, order): three orders, an order-0 range crossing a 128 MiB bitmap boundary and a
# 1 GiB range preserved as order-18 blocks, as 6.16's kho_preserve_phys() splits big ranges.
EXTENTS = [
    (0x0800_0000 - 0x2000, 0x5000, 0),
    (0x0020_0000, 0x4000, 1),
    (0x4000_0000, 0xC000_0000, 18),
]


def _encode(bitmap_bytes: int | None,
            extents: list[tuple[int, int, int]] | None = None) -> tuple[SparseMemory, int]:
    memory = SparseMemory(PAGE)
    root = encode_chunks(EXTENTS if extents is None else extents, memory,
                         PageAllocator(META_START, PAGE), bitmap_bytes=bitmap_bytes)
    return memory, root


def _chunk(memory: SparseMemory, phys: int) -> tuple[int, int, int, list[ChunkEntry]]:
    page = memory.read(phys, PAGE)
    nxt, order, num = struct.unpack_from("<QII", page, 0)
    entries = [ChunkEntry(*struct.unpack_from("<QQ", page, 16 + 16 * i)) for i in range(num)]
    return nxt, order, num, entries


def test_walkers_are_registered() -> None:
    assert {"chunks", "chunks-512", "chunks-page"} <= set(MEMMAP_FORMATS)
    assert capacity(PAGE) == 255
    assert capacity(16384) == 1023


def test_page_variant_layout_is_the_kernels() -> None:
    memory, root = _encode(None)
    # One chunk per order, orders ascending, linked through `next`.
    nxt, order, num, entries = _chunk(memory, root)
    assert (order, num) == (0, 2)
    # PRESERVE_BITS = 32768 at order 0: bitmap index 0 covers 0..128 MiB, index 1 the next 128.
    assert [e.phys_start for e in entries] == [0, 0x0800_0000]
    assert all(e.bitmap % PAGE == 0 for e in entries)
    bits = int.from_bytes(memory.read(entries[0].bitmap, PAGE), "little")
    assert bits == 0b11 << (0x0800_0000 // PAGE - 2)
    nxt, order, num, entries = _chunk(memory, nxt)
    assert (order, num, [e.phys_start for e in entries]) == (1, 1, [0])
    nxt2, order, num, entries = _chunk(memory, nxt)
    assert (nxt2, order, num) == (0, 18, 1)
    bits = int.from_bytes(memory.read(entries[0].bitmap, PAGE), "little")
    assert bits == 0b111 << 1  # 1 GiB blocks 1..3

    walk = chunks_walk(memory, root)
    assert walk.format == "chunks-page"
    assert [(e.phys, e.size, e.order) for e in walk.extents] == [
        (0x0800_0000 - 0x2000, 0x5000, 0), (0x0020_0000, 0x4000, 1),
        (0x4000_0000, 0xC000_0000, 18)]
    assert walk.issues == [] and walk.missing_pages == []
    assert len(walk.meta_pages) == 3 + 4  # three chunks, four bitmap pages


def test_512_variant_layout_is_the_kernels() -> None:
    memory, root = _encode(BITMAP_512_BYTES)
    _, order, num, entries = _chunk(memory, root)
    # PRESERVE_BITS = 4096 at order 0: each bitmap covers 16 MiB.
    assert (order, num) == (0, 2)
    assert [e.phys_start for e in entries] == [0x0700_0000, 0x0800_0000]
    # kmalloc-512 slots: 512-byte aligned, packed into one page.
    assert [e.bitmap % PAGE for e in entries] == [0, 512]
    assert entries[0].bitmap == entries[1].bitmap - 512
    assert int.from_bytes(memory.read(entries[0].bitmap, 512), "little") == 0b11 << 4094
    assert int.from_bytes(memory.read(entries[1].bitmap, 512), "little") == 0b111

    walk = chunks_walk(memory, root)
    assert walk.format == "chunks-512"
    assert block_set(walk.extents) == block_set(EXTENTS)
    assert len(walk.meta_pages) == 3 + 1  # three chunks, all four bitmaps in one slab page
    assert MEMMAP_FORMATS["chunks-512"](memory, root, 12).format == "chunks-512"


def test_several_chunks_per_order() -> None:
    # 300 order-0 pages, one per 128 MiB bitmap: 300 bitmaps need two chunks of order 0.
    extents = [(i * 0x0800_0000, PAGE, 0) for i in range(300)]
    memory, root = _encode(None, extents)
    nxt, order, num, _ = _chunk(memory, root)
    assert (order, num) == (0, 255)
    last, order, num, entries = _chunk(memory, nxt)
    assert (last, order, num) == (0, 0, 45)
    assert entries[-1].phys_start == 299 * 0x0800_0000
    walk = chunks_walk(memory, root)
    assert block_set(walk.extents) == block_set(extents)
    assert len(walk.extents) == 300


def test_detection_defaults_to_page_variant_when_ambiguous() -> None:
    # A single 512-byte bitmap in a page-aligned slot whose phys_start is a multiple of the page
    # variant's span reads the same either way; the newer variant is reported.
    memory, root = _encode(BITMAP_512_BYTES, [(0x0800_0000, 0x3000, 0)])
    walk = chunks_walk(memory, root)
    assert walk.format == "chunks-page"
    assert block_set(walk.extents) == block_set([(0x0800_0000, 0x3000, 0)])


def test_empty_map_encodes_as_zero() -> None:
    memory = SparseMemory(PAGE)
    assert encode_chunks([], memory, PageAllocator(META_START, PAGE)) == 0
    assert len(memory) == 0


def test_encoder_rejects_bad_input() -> None:
    memory = SparseMemory(PAGE)
    alloc = PageAllocator(META_START, PAGE)
    with pytest.raises(AbiError, match="not whole order-1 blocks"):
        encode_chunks([(0x1000, 0x2000, 1)], memory, alloc)
    with pytest.raises(AbiError, match="512 bytes or one page"):
        encode_chunks([(0, PAGE, 0)], memory, alloc, bitmap_bytes=1024)


def test_dense_map_decodes_to_one_extent_quickly() -> None:
    # 64 GiB of order-0 pages: 512 full bitmaps; the walk must not visit 16M bits one by one.
    extents = [(0x10_0000_0000, 64 << 30, 0)]
    memory, root = _encode(None, extents)
    started = time.perf_counter()
    walk = chunks_walk(memory, root)
    assert time.perf_counter() - started < 2.0
    assert [(e.phys, e.size, e.order) for e in walk.extents] == extents
    assert walk.extents.block_count() == 16 << 20


# ----------------------------------------------------------------------------- defects


def _state_with_map() -> tuple[Synth, int]:
    """A kho-v1 state whose map is then damaged by the caller; returns (synth, map root)."""
    s = Synth()
    s.memblock({"rsv": 0x4000}, sized=False)
    return s, s.write_map("chunks-page")


def _decode(s: Synth, root: int) -> list[tuple[str, str, str]]:
    blob = encode_root("kho-v1", root, s.subtrees)
    return codes(decode_state(KhoInput(blob, memory=s.memory)))


def test_num_elms_above_capacity() -> None:
    s, root = _state_with_map()
    s.memory.write(root + 12, struct.pack("<I", 256))
    walk = chunks_walk(s.memory, root)
    # Clamped to the page, the 254 entries past the real one are null pointers: one issue.
    assert [i.code for i in walk.issues] == ["block-count-invalid", "property-malformed"]
    assert "num_elms 256, capacity is 255" in walk.issues[0].message
    assert "(and 253 more entries of this chunk alike)" in walk.issues[1].message
    assert ("block-count-invalid", "error", MAP) in _decode(s, root)


def test_chunk_cycle() -> None:
    s, root = _state_with_map()
    s.write_u64(root, root)  # next -> itself
    walk = chunks_walk(s.memory, root)
    assert [i.code for i in walk.issues] == ["chain-cycle"]
    assert ("chain-cycle", "error", MAP) in _decode(s, root)


def test_chain_too_long(monkeypatch: pytest.MonkeyPatch) -> None:
    extents = [(0, PAGE, 0), (0, 2 * PAGE, 1), (0, 4 * PAGE, 2)]  # three orders: three chunks
    memory, root = _encode(None, extents)
    monkeypatch.setattr(chunks, "MAX_CHUNKS", 2)
    walk = chunks_walk(memory, root)
    assert [i.code for i in walk.issues] == ["chain-too-long"]
    assert block_set(walk.extents) == block_set(extents[:2])


def test_misaligned_next_and_bitmap() -> None:
    memory, root = _encode(None, [(0, PAGE, 0), (0, 2 * PAGE, 1)])
    nxt, _, _, entries = _chunk(memory, root)
    memory.write(root + 16 + 8, struct.pack("<Q", entries[0].bitmap + 8))
    memory.write(root, struct.pack("<Q", nxt + 0x10))
    walk = chunks_walk(memory, root)
    # An unaligned bitmap pointer selects the 512-byte variant, where +8 is still misaligned.
    assert walk.format == "chunks-512"
    assert sorted(i.code for i in walk.issues) == ["misaligned", "misaligned"]
    assert len(walk.extents) == 0


def test_forced_variant_reports_foreign_phys_start() -> None:
    memory, root = _encode(BITMAP_512_BYTES, [(0x0100_0000, PAGE, 0)])
    walk = MEMMAP_FORMATS["chunks-page"](memory, root, 12)
    assert walk.format == "chunks-page"
    assert [i.code for i in walk.issues] == ["misaligned"]
    assert "phys_start 0x1000000" in walk.issues[0].message


def test_null_bitmap_and_impossible_order() -> None:
    memory, root = _encode(None, [(0, PAGE, 0), (0, 2 * PAGE, 1)])
    nxt = _chunk(memory, root)[0]
    memory.write(root + 16 + 8, struct.pack("<Q", 0))
    memory.write(nxt + 8, struct.pack("<I", 60))
    walk = chunks_walk(memory, root)
    assert [i.code for i in walk.issues] == ["property-malformed", "property-malformed"]
    assert "impossible order 60" in walk.issues[0].message
    assert "null bitmap" in walk.issues[1].message


def test_missing_bitmap_page_is_listed_and_the_walk_goes_on() -> None:
    memory, root = _encode(None, [(0, PAGE, 0), (0x0800_0000, PAGE, 0), (0, 2 * PAGE, 1)])
    entries = _chunk(memory, root)[3]
    memory.drop(entries[0].bitmap, PAGE)
    walk = chunks_walk(memory, root)
    assert walk.missing_pages == [entries[0].bitmap]
    assert block_set(walk.extents) == {(0x0800_0000, 0), (0, 1)}
    assert walk.issues == []


def test_missing_chunk_page_ends_the_chain() -> None:
    s, root = _state_with_map()
    s.memory.drop(root, PAGE)
    walk = chunks_walk(s.memory, root)
    assert walk.missing_pages == [root]
    assert len(walk.extents) == 0
    found = _decode(s, root)
    assert ("memory-unavailable", "info", MAP) in found
    # An incomplete map must not turn every structure into a not-preserved false alarm.
    assert not [c for c in found if c[0] == "not-preserved"]


def test_misaligned_root_is_blob_malformed() -> None:
    s, root = _state_with_map()
    with pytest.raises(AbiError, match="not a page-aligned"):
        read_chain(s.memory, root + 8)
    assert ("blob-malformed", "error", MAP) in _decode(s, root + 8)


def test_map_zero_on_outgoing_kho_v1_is_not_checked() -> None:
    s = Synth()
    s.memblock({"rsv": 0x4000}, sized=False)
    assert _decode(s, 0) == [("memmap-not-checked", "info", MAP)]
