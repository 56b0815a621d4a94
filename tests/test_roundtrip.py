"""decode(encode(x)) == x for every encoder, as Hypothesis properties."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from synth import META_START, Synth, block_set, luo_state

from kho_agent.abi import memfd, registry
from kho_agent.abi.block import capacity, encode_blocks, walk_blocks
from kho_agent.abi.context import DecodeContext
from kho_agent.abi.fdt import FdtNode, FdtWriter, parse_fdt
from kho_agent.abi.formats import kexec_metadata_v1 as kexec_metadata
from kho_agent.abi.formats import luo_v1, luo_v5
from kho_agent.abi.formats import memblock_v1 as memblock
from kho_agent.abi.formats.records import KhoRootVersion, LuoVersion
from kho_agent.abi.kho_root import decode_root, encode_root
from kho_agent.abi.luo_common import LuoFile, LuoState
from kho_agent.abi.memmap_chunks import BITMAP_512_BYTES, chunks_walk, encode_chunks
from kho_agent.abi.memory import PageAllocator, SparseMemory
from kho_agent.abi.radix import RadixGeometry, radix_encode, radix_walk
from kho_agent.abi.vmalloc import VmallocDesc, encode_vmalloc, read_area_bytes, read_vmalloc

FAST = settings(max_examples=50, deadline=None)
PAGE = 4096
MAX_PFN = 1 << 26  # 256 GiB of 4 KiB pages: a realistic physical address range


@st.composite
def block_lists(draw: st.DrawFn, max_order: int = 10) -> list[tuple[int, int, int]]:
    """Distinct (phys, size, order) blocks; blocks of different orders may overlap, as keys of
    different orders may name the same memory."""
    blocks = draw(st.sets(st.tuples(st.integers(0, MAX_PFN - 1), st.integers(0, max_order)),
                          max_size=40))
    out: set[tuple[int, int]] = set()
    for pfn, order in blocks:
        out.add(((pfn >> order) << (order + 12), order))
    # Runs: some neighbours of the first block, so that bits coalesce and cross word boundaries.
    if blocks:
        run = draw(st.integers(0, 200))
        pa, order = min(out)
        out.update((pa + (i << (12 + order)), order) for i in range(run))
    return [(pa, 1 << (12 + order), order) for pa, order in sorted(out)]


# ----------------------------------------------------------------------------- memory maps


@FAST
@given(block_lists(), st.sampled_from([(12, True), (12, False), (16, True), (16, False)]))
def test_radix(blocks: list[tuple[int, int, int]], geometry: tuple[int, bool]) -> None:
    page_shift, plus_one = geometry
    geom = RadixGeometry(page_shift, plus_one)
    scaled = [(pa << (page_shift - 12), size << (page_shift - 12), order)
              for pa, size, order in blocks]
    memory = SparseMemory(1 << page_shift)
    root = radix_encode(scaled, memory, PageAllocator(META_START << 4, 1 << page_shift), geom)
    walk = radix_walk(memory, root, geom)
    assert walk.issues == [] and walk.missing_pages == []
    assert block_set(walk.extents, page_shift) == block_set(scaled, page_shift)


@FAST
@given(block_lists(max_order=18), st.sampled_from([None, BITMAP_512_BYTES]))
def test_chunks(blocks: list[tuple[int, int, int]], bitmap_bytes: int | None) -> None:
    memory = SparseMemory(PAGE)
    root = encode_chunks(blocks, memory, PageAllocator(META_START << 4, PAGE),
                         bitmap_bytes=bitmap_bytes)
    if not blocks:
        assert root == 0
        return
    forced = chunks_walk(memory, root, 12, bitmap_bytes or PAGE)
    assert forced.format == ("chunks-512" if bitmap_bytes else "chunks-page")
    assert forced.issues == [] and forced.missing_pages == []
    assert block_set(forced.extents) == block_set(blocks)
    detected = chunks_walk(memory, root)
    assert detected.issues == []
    assert block_set(detected.extents) == block_set(blocks)
    if bitmap_bytes is None:
        assert detected.format == "chunks-page"


# ----------------------------------------------------------------------------- containers


@FAST
@given(st.sampled_from([16, 64, 80]), st.integers(0, 200))
def test_block_chain(entry_size: int, count: int) -> None:
    entries = [bytes([i % 251]) * entry_size for i in range(count)]
    memory = SparseMemory(PAGE)
    first = encode_blocks(entries, entry_size, memory, PageAllocator(META_START, PAGE))
    ctx = DecodeContext(memory)
    chain = walk_blocks(ctx, first, entry_size, "/t", "things")
    assert chain.entries == entries and chain.complete
    assert ctx.findings == []
    assert len(chain.blocks) == -(-count // capacity(entry_size))


@FAST
@given(st.binary(max_size=3 * PAGE), st.integers(0, 2), st.integers(0, 1100))
def test_vmalloc(data: bytes, order: int, pad_pages: int) -> None:
    # pad_pages makes some areas need more than one 511-entry chunk.
    data = data + bytes(pad_pages * PAGE if order == 0 else 0)
    memory = SparseMemory(PAGE)
    desc = encode_vmalloc(data, memory, PageAllocator(META_START, PAGE), order=order)
    assert VmallocDesc.unpack(desc.pack()) == desc
    ctx = DecodeContext(memory)
    area = read_vmalloc(ctx, desc, "/t", "area")
    assert ctx.findings == [] and area.complete
    assert area.desc.total_pages == -(-len(data) // (PAGE << order)) << order
    assert read_area_bytes(ctx, area, len(data), "/t", "area") == data


class RecordingMemory:
    def __init__(self, inner: SparseMemory) -> None:
        self.inner, self.reads = inner, []  # type: list[tuple[int, int]]

    def read(self, phys: int, length: int) -> bytes:
        self.reads.append((phys, length))
        return self.inner.read(phys, length)


@FAST
@given(st.integers(1, 1100), st.integers(0, 1200))
def test_vmalloc_blocks_do_not_depend_on_total_pages(nblocks: int, claimed: int) -> None:
    """The decoder reads a prefix of each chunk sized by total_pages; a total_pages that lies
    must change only the count finding, never which blocks are listed."""
    memory = SparseMemory(PAGE)
    desc = encode_vmalloc(bytes(nblocks * PAGE), memory, PageAllocator(META_START, PAGE))
    recorder = RecordingMemory(memory)
    ctx = DecodeContext(recorder)  # type: ignore[arg-type]
    lying = VmallocDesc(desc.first, claimed, desc.flags, desc.order)
    area = read_vmalloc(ctx, lying, "/t", "area")
    honest = read_vmalloc(DecodeContext(memory), desc, "/t", "area")
    assert area.blocks == honest.blocks and len(area.blocks) == nblocks
    assert [f.code for f in ctx.findings] == ([] if claimed == nblocks else ["count-mismatch"])
    if claimed == nblocks:  # a healthy chunk is read as far as its terminator, not whole
        assert sum(n for _, n in recorder.reads) == 8 * (len(area.chunk_pages) + nblocks + 1)


def test_memfd_data_runs_coalesce_contiguous_folios() -> None:
    memory = SparseMemory(PAGE)
    alloc = PageAllocator(META_START, PAGE)
    # 3 adjacent data pages
    phys = registry.encode_memfd("memfd-v2", bytes(3 * PAGE), memory, alloc)
    alloc.alloc(PAGE)
    other = registry.encode_memfd("memfd-v2", bytes(PAGE), memory, alloc)
    ctx = DecodeContext(memory)
    state = registry.decode_memfd("memfd-v2", ctx, phys, "/f")
    assert state is not None and state.first_page is not None
    assert state.data_runs == [(state.first_page, 3 * PAGE)]
    refs = [(r.phys, r.length) for r in ctx.refs if r.what == "memfd data folio"]
    assert refs == [(state.first_page, 3 * PAGE)]
    second = registry.decode_memfd("memfd-v2", ctx, other, "/g")
    assert second is not None and second.data_runs == [(second.first_page, PAGE)]


@FAST
@given(st.sampled_from(sorted(registry.MEMFD_BY_COMPATIBLE)), st.binary(max_size=3 * PAGE),
       st.integers(0, 3 * PAGE), st.integers(0, 1 << 40), st.integers(0, memfd.ALL_SEALS))
def test_memfd(compatible: str, content: bytes, extra: int, pos: int, seals: int) -> None:
    memory = SparseMemory(PAGE)
    alloc = PageAllocator(META_START, PAGE)
    size = len(content) + extra
    phys = registry.encode_memfd(compatible, content, memory, alloc, size=size, pos=pos,
                                 seals=seals)
    ctx = DecodeContext(memory)
    state = registry.decode_memfd(compatible, ctx, phys, "/f")
    assert state is not None and ctx.findings == []
    has_seals = registry.MEMFD_BY_COMPATIBLE[compatible].has_seals
    assert (state.pos, state.size, state.seals, state.nr_folios) == (
        pos, size, seals if has_seals else None, -(-size // PAGE))
    if content:
        assert state.first_page is not None
        assert memory.read(state.first_page, min(len(content), PAGE)) == content[:PAGE]


# ----------------------------------------------------------------------------- LUO

session_names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7e), min_size=1,
                        max_size=63)
luo_sessions = st.dictionaries(
    session_names,
    st.tuples(st.lists(st.integers(0, (1 << 64) - 1), max_size=70, unique=True),
              st.sampled_from(sorted(registry.MEMFD_BY_COMPATIBLE))),
    max_size=60)


def _luo_roundtrip(fmt: LuoVersion, number: int,
                   sessions: dict[str, tuple[list[int], str]]) -> None:
    compatible = fmt.compatible
    s = Synth()
    ser: dict[str, list[LuoFile]] = {}
    for name, (tokens, handler) in sessions.items():
        # One real (empty) memfd shared by all files: only the LUO layer is under test here.
        data = registry.encode_memfd(handler, b"", s.memory, s.alloc)
        ser[name] = [LuoFile(0, handler, token, data) for token in tokens]
    state = luo_state(compatible, number, ser)
    ctx = DecodeContext(s.memory)
    decoded: LuoState | None = fmt.decode(fmt.encode(state, s.memory, s.alloc), ctx, "/LUO")
    assert decoded is not None
    # With no sessions a block-chain kernel leaves sessions_pa 0, which reads as "not serialized
    # yet"; the fixed arrays are always there.
    quiet = not fmt.sessions_in_blocks or sessions
    assert [f.code for f in ctx.findings] == ([] if quiet else ["sessions-not-serialized"])
    assert (decoded.compatible, decoded.liveupdate_number) == (compatible, number)
    assert [(x.name, x.file_count, [(f.token, f.compatible) for f in x.files])
            for x in decoded.sessions] == [
        (name, len(tokens), [(t, handler) for t in tokens])
        for name, (tokens, handler) in sessions.items()]


@pytest.mark.parametrize("fmt", registry.LUO_FORMATS, ids=lambda f: f.compatible)
@FAST
@given(number=st.integers(0, (1 << 64) - 1), sessions=luo_sessions)
def test_luo(fmt: LuoVersion, number: int, sessions: dict[str, tuple[list[int], str]]) -> None:
    """Every LUO version (luo-v1 and luo-v5 so far), within the version's own caps."""
    assume(len(sessions) <= fmt.limits.sessions)
    assume(all(len(t) <= fmt.limits.files_per_session for t, _ in sessions.values()))
    _luo_roundtrip(fmt, number, sessions)


def test_the_luo_matrix_covers_both_eras() -> None:
    assert {f.compatible for f in registry.LUO_FORMATS} >= {luo_v1.COMPATIBLE, luo_v5.COMPATIBLE}


# ----------------------------------------------------------------------------- KHO roots

@pytest.mark.parametrize("fmt", registry.KHO_ROOTS, ids=lambda f: f.compatible)
@FAST
@given(blocks=block_lists())
def test_kho_root_memory_map(fmt: KhoRootVersion, blocks: list[tuple[int, int, int]]) -> None:
    """Every KHO root version: its map encoder and its walker agree, and its root FDT reads
    back with the subtrees it lists (blob-size only where the version has it)."""
    memory = SparseMemory(PAGE)
    root = fmt.encode_memmap(blocks, memory, PageAllocator(META_START, PAGE))
    if blocks or not fmt.memmap_at_finalize:
        walk = fmt.walk_memmap(memory, root, 12)
        assert walk.issues == [] and block_set(walk.extents) == block_set(blocks)
    blob = encode_root(fmt.compatible, root, [("LUO", 0x1000, 32), ("memblock", 0x3000, 0x200)])
    decoded = decode_root(blob)
    assert (decoded.compatible, decoded.memmap_phys, decoded.problems) == (fmt.compatible, root,
                                                                           [])
    # the kernel inserts each new subnode first: the last added is listed first
    assert [(r.name, r.phys, r.size) for r in decoded.subtrees] == [
        ("memblock", 0x3000, 0x200 if fmt.size_prop else None),
        ("LUO", 0x1000, 32 if fmt.size_prop else None)]


# ----------------------------------------------------------------------------- small blobs


@FAST
@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=64),
       st.integers(0, (1 << 32) - 1))
def test_kexec_metadata(release: str, count: int) -> None:
    meta = kexec_metadata.KexecMetadata(kexec_metadata.VERSION, release, count)
    ctx = DecodeContext(None)
    assert kexec_metadata.decode(kexec_metadata.encode(meta), ctx, "/k") == meta
    assert ctx.findings == []


node_names = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789_-,."), min_size=1,
                     max_size=20)


@FAST
@given(st.dictionaries(node_names, st.tuples(st.integers(0, (1 << 52) - 1),
                                             st.integers(0, (1 << 40) - 1)), max_size=8))
def test_memblock(regions: dict[str, tuple[int, int]]) -> None:
    state = memblock.MemblockState(memblock.COMPATIBLE, [
        memblock.ReserveMemRegion(name, memblock.REGION_COMPATIBLE, pfn << 12, size)
        for name, (pfn, size) in regions.items()])
    ctx = DecodeContext(None)
    assert memblock.decode(memblock.encode(state), ctx, "/memblock") == state
    assert ctx.findings == []
    assert len(ctx.refs) == sum(1 for _, size in regions.values() if size)


FdtTreeSpec = tuple[str, list[tuple[str, bytes]], list["FdtTreeSpec"]]


@st.composite
def fdt_trees(draw: st.DrawFn, depth: int = 0) -> FdtTreeSpec:
    name = "" if depth == 0 else draw(node_names)
    props = draw(st.dictionaries(node_names, st.binary(max_size=40), max_size=5))
    children: list[FdtTreeSpec] = []
    if depth < 3:
        kids = draw(st.lists(fdt_trees(depth + 1), max_size=3,
                             unique_by=lambda c: c[0]))
        children = kids
    return name, list(props.items()), children


def _write(w: FdtWriter, tree: FdtTreeSpec) -> None:
    name, props, children = tree
    w.begin_node(name)
    for key, value in props:
        w.property(key, value)
    for child in children:
        _write(w, child)
    w.end_node()


@FAST
@given(fdt_trees())
def test_fdt_writer_to_parser(tree: FdtTreeSpec) -> None:
    w = FdtWriter()
    _write(w, tree)
    blob = w.finish()
    fdt = parse_fdt(blob)
    assert fdt.totalsize == len(blob)

    def spec(node: FdtNode) -> FdtTreeSpec:
        return node.name, list(node.props), [spec(c) for c in node.children]

    assert spec(fdt.root) == tree
