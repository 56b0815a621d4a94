"""Robustness of the decoder against arbitrary and hostile input.

(a) Hypothesis feeds arbitrary bytes to every entry point: only AbiError may escape the low-level
    parsers, and decode_state() must raise nothing at all.
(b) Every captured sample blob (root FDTs, sub_fdts, the truncated debugfs FDT, and the pages of
    each memory.core) is mutated a bounded, seeded number of times and decoded; no exception may
    escape and each decode must stay within a read budget (counted, not timed).
(c) Structures built to be hostile: cycles in a radix tree, a block chain and a vmalloc chain,
    chains one block over the kernel's limit, an FDT nesting 1000 levels and one with 100k nodes.
"""

from __future__ import annotations

import bisect
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kho_agent.abi import luo, registry, vmalloc
from kho_agent.abi.block import MAX_BLOCKS
from kho_agent.abi.context import DecodeContext, Side
from kho_agent.abi.errors import AbiError
from kho_agent.abi.extents import Extent, ExtentMap
from kho_agent.abi.fdt import (
    FDT_BEGIN_NODE,
    FDT_END,
    FDT_END_NODE,
    FDT_MAGIC,
    FDT_PROP,
    MAX_DEPTH,
    FdtWriter,
    parse_fdt,
)
from kho_agent.abi.findings import CODES
from kho_agent.abi.formats import luo_v1, luo_v5
from kho_agent.abi.formats import memblock_v1 as memblock
from kho_agent.abi.kho_root import decode_root, encode_root, recover_truncated_root
from kho_agent.abi.kho_state import KhoInput, KhoState, decode_state
from kho_agent.abi.luo_common import LuoFile, LuoSession, LuoState
from kho_agent.abi.memmap_chunks import chunks_walk
from kho_agent.abi.memory import PageAllocator, PhysicalMemory, SparseMemory
from kho_agent.abi.radix import RadixGeometry, radix_encode, radix_walk
from kho_agent.kernel.physmem import ElfCoreMemory

PAGE = 4096
MUTATIONS_PER_BLOB = 300
# Read budgets, enforced by CountingMemory (counted, never timed). A clean decode of a sample
# reads about 50 times (under 50 pages in each core); a mutated one may add misses (a radix node
# whose 512 slots all point outside the core costs 512 failed reads) and revisits, but nothing
# that grows with a count or length field. The general budget bounds the synthetic inputs.
SAMPLE_MAX_READS = 2_000
MAX_READS = 20_000
MAX_READ_BYTES = 64 << 20
MAX_READ_LENGTH = 16 << 20


# ----------------------------------------------------------------------------- memory wrappers


class ReadBudgetExceeded(Exception):
    """Raised by CountingMemory; not an AbiError, so no decoder can swallow it."""


class CountingMemory:
    """Counts reads and bytes; stops a decode that exceeds its budget by raising past it."""

    def __init__(self, inner: PhysicalMemory, max_reads: int = MAX_READS,
                 max_bytes: int = MAX_READ_BYTES, max_length: int = MAX_READ_LENGTH) -> None:
        self.inner = inner
        self.max_reads = max_reads
        self.max_bytes = max_bytes
        self.max_length = max_length
        self.reads = 0
        self.bytes = 0
        self.pages: set[int] = set()

    def read(self, phys: int, length: int) -> bytes:
        self.reads += 1
        if self.reads > self.max_reads:
            raise ReadBudgetExceeded(f"more than {self.max_reads} reads in one decode")
        if length > self.max_length:
            raise ReadBudgetExceeded(f"a single read of {length:#x} bytes at {phys:#x}")
        data = self.inner.read(phys, length)
        self.bytes += len(data)
        if self.bytes > self.max_bytes:
            raise ReadBudgetExceeded(f"more than {self.max_bytes} bytes read in one decode")
        self.pages.update(range(phys // PAGE, (phys + max(length, 1) - 1) // PAGE + 1))
        return data


class MutatingMemory:
    """Another memory source with some bytes replaced: `edits` maps a physical address to the
    byte value it reads as. Position-based, so the result does not depend on read order."""

    def __init__(self, inner: PhysicalMemory, edits: dict[int, int]) -> None:
        self.inner = inner
        self.edits = edits
        self._sorted = sorted(edits)

    def read(self, phys: int, length: int) -> bytes:
        data = self.inner.read(phys, length)
        if not self.edits:
            return data
        lo = bisect.bisect_left(self._sorted, phys)
        hi = bisect.bisect_left(self._sorted, phys + length)
        if lo == hi:
            return data
        buf = bytearray(data)
        for addr in self._sorted[lo:hi]:
            buf[addr - phys] = self.edits[addr]
        return bytes(buf)


# ----------------------------------------------------------------------------- mutators

INTERESTING_U32 = (0, 1, 2, 3, 4, 9, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0x7FFFFFFF,
                   0x80000000, 0xFFFFFFFE, 0xFFFFFFFF, FDT_MAGIC)
INTERESTING_U64 = (0, 1, 0x1000, 0xFFF, 1 << 63, (1 << 64) - 1, (1 << 64) - PAGE, 10_000, 10_001)


def mutate_blob(blob: bytes, rng: random.Random) -> bytes:
    """1..4 byte-level edits: bit flips, random bytes, interesting big-endian words (FDT fields),
    interesting native u64s (KHO values), truncation and extension."""
    buf = bytearray(blob)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        if not buf:
            buf += bytes([rng.randrange(256)])
            continue
        pos = rng.randrange(len(buf))
        if op == 0:
            buf[pos] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos] = rng.randrange(256)
        elif op == 2:
            at = pos & ~3
            buf[at:at + 4] = struct.pack(">I", rng.choice(INTERESTING_U32))
        elif op == 3:
            at = pos & ~7
            buf[at:at + 8] = struct.pack("<Q", rng.choice(INTERESTING_U64))
        elif op == 4:
            del buf[pos:]
        elif op == 5:
            buf += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:
            length = rng.randint(1, 16)
            buf[pos:pos + length] = bytes(length)
    return bytes(buf)


def memory_edits(rng: random.Random, hot_pages: list[int], all_pages: list[int]) -> dict[int, int]:
    """1..6 edits in the core, mostly on pages a clean decode reads: bit flips, random bytes,
    interesting u64s, and pointers to pages of the core (which is how cycles, shared structures
    and wrong-kind pointers arise)."""
    edits: dict[int, int] = {}
    for _ in range(rng.randint(1, 6)):
        page = rng.choice(hot_pages) if rng.random() < 0.9 else rng.choice(all_pages)
        off = rng.randrange(PAGE)
        op = rng.randrange(5)
        if op == 0:
            edits[page + off] = rng.randrange(256)
        elif op == 1:
            # flip a bit of what is there now is order-dependent; flip relative to zero instead
            edits[page + off] = 1 << rng.randrange(8)
        else:
            at = page + (off & ~7)
            if op == 2:
                value = rng.choice(INTERESTING_U64)
            elif op == 3:
                value = rng.choice(all_pages) + rng.choice((0, 0, 8, 16, 48))
            else:
                value = rng.getrandbits(64)
            for i, byte in enumerate(struct.pack("<Q", value)):
                edits[at + i] = byte
    return edits


# ----------------------------------------------------------------------------- samples


@dataclass
class Case:
    name: str
    side: Side
    fdt: bytes
    sub_blobs: dict[str, bytes]
    core: Path


def load_case(samples: Path, name: str) -> Case:
    d = samples / name
    side = Side.IN if name.startswith("case-in") else Side.OUT
    subs = {p.name: p.read_bytes() for p in sorted((d / "sub_fdts").iterdir())}
    return Case(name, side, (d / "fdt").read_bytes(), subs, d / "memory.core")


def core_pages(mem: ElfCoreMemory) -> list[int]:
    return sorted({p for s in mem.segments
                   for p in range(s.phys // PAGE * PAGE, s.phys + s.size, PAGE)})


def checked_decode(inp: KhoInput, max_reads: int = MAX_READS
                   ) -> tuple[KhoState, CountingMemory | None]:
    """decode_state under a read budget; any exception fails the test through pytest."""
    counter = CountingMemory(inp.memory, max_reads) if inp.memory is not None else None
    inp.memory = counter
    state = decode_state(inp)
    assert isinstance(state, KhoState)
    return state, counter


CASES = ("case-out-1", "case-in-1")


@pytest.mark.parametrize("case_name", CASES)
def test_clean_samples_decode_within_budget(samples_dir: Path, case_name: str) -> None:
    case = load_case(samples_dir, case_name)
    with ElfCoreMemory(str(case.core)) as mem:
        state, counter = checked_decode(KhoInput(case.fdt, dict(case.sub_blobs), memory=mem,
                                                 side=case.side))
    assert counter is not None and counter.reads > 0
    assert state.compatible == "kho-v4"
    assert not [f for f in state.findings if f.severity.value == "error"]


BLOB_IDS = ["case-out-1/fdt", "case-out-1/LUO", "case-out-1/kexec-metadata",
            "case-out-1/kho_test", "case-out-1/memblock", "case-in-1/fdt", "case-in-1/LUO",
            "case-in-1/kexec-metadata", "case-in-1/kho_test", "case-in-1/memblock",
            "case-out-1/truncated"]


@pytest.mark.parametrize("target", BLOB_IDS)
def test_mutated_sample_blobs(samples_dir: Path, target: str) -> None:
    case_name, which = target.split("/")
    case = load_case(samples_dir, case_name)
    truncated = (samples_dir / "fdt" / "stage1-debugfs-out-fdt.truncated.bin").read_bytes()
    if which == "fdt":
        original = case.fdt
    elif which == "truncated":
        original = truncated
    else:
        original = case.sub_blobs[which]
    rng = random.Random(f"kho-fuzz/{target}")
    outcomes: set[str] = set()
    worst_reads = 0
    with ElfCoreMemory(str(case.core)) as mem:
        for _ in range(MUTATIONS_PER_BLOB):
            blob = mutate_blob(original, rng)
            subs = dict(case.sub_blobs)
            if which in ("fdt", "truncated"):
                root: bytes | None = blob
            else:
                # Without a root FDT the sub_fdts copies are what gets decoded (with a root, the
                # in-memory blob would win and the mutation would not be looked at).
                root = None
                subs[which] = blob
            state, counter = checked_decode(KhoInput(root, subs, memory=mem, side=case.side),
                                            SAMPLE_MAX_READS)
            assert counter is not None
            worst_reads = max(worst_reads, counter.reads)
            outcomes.add(state.root_source)
            outcomes.update(f.code for f in state.findings)
    # The mutations must actually reach the decoder's error paths, or this test proves nothing.
    assert outcomes & {"blob-malformed", "compatible-unknown", "property-malformed",
                       "kexec-metadata-invalid", "luo-blob-freed", "property-missing",
                       "memory-unavailable", "debugfs-fdt-truncated"}, outcomes
    assert 0 < worst_reads <= SAMPLE_MAX_READS


@pytest.mark.parametrize("case_name", CASES)
def test_mutated_memory_pages(samples_dir: Path, case_name: str) -> None:
    case = load_case(samples_dir, case_name)
    with ElfCoreMemory(str(case.core)) as mem:
        all_pages = core_pages(mem)
        clean_state, clean = checked_decode(KhoInput(case.fdt, dict(case.sub_blobs),
                                                     memory=mem, side=case.side))
        assert clean is not None
        hot = sorted(p * PAGE for p in clean.pages if p * PAGE in set(all_pages))
        assert hot, "the clean decode read no page of the core"
        rng = random.Random(f"kho-fuzz/{case_name}/memory.core")
        codes: set[str] = set()
        for _ in range(MUTATIONS_PER_BLOB):
            mutated = MutatingMemory(mem, memory_edits(rng, hot, all_pages))
            state, counter = checked_decode(KhoInput(case.fdt, dict(case.sub_blobs),
                                                     memory=mutated, side=case.side),
                                            SAMPLE_MAX_READS)
            assert counter is not None and counter.reads <= SAMPLE_MAX_READS
            codes.update(f.code for f in state.findings)
    # The mutations must reach the decoder's defect paths, not just decode like the original.
    assert len(codes - {f.code for f in clean_state.findings}) >= 3, codes


# ----------------------------------------------------------------------------- hypothesis


def _fdt_like(body: bytes, strings: bytes, tweak: int) -> bytes:
    """A header that passes the magic/version checks around arbitrary structure and strings
    blocks, so that hypothesis spends its time inside the token walk."""
    off_rsv = 40
    off_struct = off_rsv + 16
    off_strings = off_struct + len(body)
    total = off_strings + len(strings)
    header = struct.pack(">10I", FDT_MAGIC, total, off_struct, off_strings, off_rsv, 17, 16, 0,
                         len(strings), len(body))
    blob = bytearray(header + bytes(16) + body + strings)
    if tweak and len(blob) > 8:
        blob[tweak % len(blob)] ^= 0xFF
    return bytes(blob)


def _tokens() -> st.SearchStrategy[bytes]:
    token = st.one_of(
        st.builds(lambda n: struct.pack(">I", FDT_BEGIN_NODE) + n + bytes(-len(n) % 4),
                  st.sampled_from([b"\0", b"a\0", b"LUO\0", b"memblock\0", b"x\xff\0", b"ab"])),
        st.just(struct.pack(">I", FDT_END_NODE)),
        st.builds(lambda length, off, v: struct.pack(">III", FDT_PROP, length, off) + v,
                  st.integers(0, 40), st.integers(0, 64), st.binary(max_size=40)),
        st.just(struct.pack(">I", FDT_END)),
        st.binary(min_size=4, max_size=4),
    )
    return st.lists(token, max_size=24).map(b"".join)


fdt_bytes = st.one_of(
    st.binary(max_size=512),
    st.builds(_fdt_like, _tokens(), st.binary(max_size=64) | st.just(
        b"preserved-memory-map\0compatible\0preserved-data\0blob-size\0"), st.integers(0, 300)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fdt_bytes)
def test_fdt_parsers_raise_only_abi_errors(blob: bytes) -> None:
    try:
        fdt = parse_fdt(blob)
    except AbiError as exc:
        assert str(exc)  # errors carry a message a user can read
    else:
        assert fdt.totalsize <= len(blob)
        assert sum(1 for _ in fdt.root.walk()) <= 1 + len(blob) // 8
    try:
        root = decode_root(blob)
    except AbiError as exc:
        assert str(exc)
    else:
        assert root.fdt_size <= len(blob)
        assert all(code in CODES for code, _, _ in root.problems)
    try:
        recovered = recover_truncated_root(blob)
    except AbiError:
        recovered = None
    assert recovered is None or recovered.recovered


POOL = [0x10_0000 + i * PAGE for i in range(12)]


def _word() -> st.SearchStrategy[int]:
    return st.one_of(st.sampled_from(POOL), st.sampled_from(INTERESTING_U64),
                     st.integers(0, 64), st.integers(0, (1 << 64) - 1))


page_contents = st.lists(_word(), max_size=48).map(lambda ws: struct.pack(f"<{len(ws)}Q", *ws))


def _memory(pages: list[bytes]) -> SparseMemory:
    mem = SparseMemory()
    for phys, content in zip(POOL, pages, strict=False):
        mem.write(phys, content.ljust(PAGE, b"\0")[:PAGE])
    return mem


COMPOSITES = ["luo-v5;block-v1", "luo-v5;flb-v1;block-v1", "luo-v5;;", "kho-v4;radix-v1",
              "kho-v4;radix-v1;radix-v1", ";"]


def _compat_field(version: str) -> bytes:
    """A compatible field sized from its string, as LUO_ABI_COMPAT_LEN is."""
    return version.encode().ljust(-(-(len(version) + 1) // 8) * 8, b"\0")


sub_blob = st.one_of(
    st.binary(max_size=128),
    st.builds(lambda compat, words: compat + struct.pack(f"<{len(words)}Q", *words),
              st.sampled_from([b"luo-v5\0\0", b"luo-v9\0\0", b"\x01\0\0\0", b"luo-v1\0\0",
                               # every LUO version the registry knows, and composite strings
                               *(_compat_field(v) for v in registry.versions("luo")),
                               *(_compat_field(v) for v in COMPOSITES)]),
              st.lists(_word(), max_size=8)),
    fdt_bytes,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sub_blob, st.lists(page_contents, max_size=len(POOL)), st.sampled_from(list(Side)))
def test_subtree_decoders_raise_only_abi_errors(blob: bytes, pages: list[bytes],
                                                side: Side) -> None:
    for decoder in (luo.decode, *(f.decode for f in registry.SUBTREES)):
        ctx = DecodeContext(CountingMemory(_memory(pages)), side)
        try:
            decoder(blob, ctx, "/x")
        except AbiError as exc:
            assert str(exc)
        else:
            assert all(f.code in CODES for f in ctx.findings)


root_fdt = st.one_of(
    fdt_bytes,
    st.builds(lambda compat, memmap, subs: encode_root(compat, memmap, subs),
              st.sampled_from(registry.versions("kho")),
              st.sampled_from(POOL) | st.sampled_from(INTERESTING_U64),
              st.lists(st.tuples(st.sampled_from([luo.SUBTREE_NAME,
                                                  *(f.subtree_name for f in registry.SUBTREES),
                                                  "other"]),
                                 st.sampled_from(POOL) | st.integers(0, 1 << 40),
                                 st.none() | st.integers(0, 1 << 20)),
                       max_size=4, unique_by=lambda t: t[0])),
    # roots whose compatible is composite (docs/kernel-abi.md §2.7), well formed or not
    st.builds(lambda compat, memmap: FdtWriter().begin_node("").property_string(
        "compatible", compat).property("preserved-memory-map", struct.pack("<Q", memmap))
        .end_node().finish(), st.sampled_from(COMPOSITES), st.sampled_from(POOL)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.none() | root_fdt,
       st.dictionaries(st.sampled_from(["LUO", "memblock", "kho_test", "kexec-metadata", "zz"]),
                       sub_blob, max_size=4),
       st.lists(page_contents, max_size=len(POOL)), st.sampled_from(list(Side)), st.booleans())
def test_decode_state_never_raises(root: bytes | None, subs: dict[str, bytes],
                                   pages: list[bytes], side: Side, with_memory: bool) -> None:
    memory = _memory(pages) if with_memory else None
    state, _ = checked_decode(KhoInput(root, subs, memory=memory, side=side))
    assert state.side is side
    assert all(f.code in CODES for f in state.findings)
    assert state.root_source in ("fdt", "truncated-fdt", "none")


# ----------------------------------------------------------------------------- adversarial


def _codes(state: KhoState) -> set[str]:
    return {f.code for f in state.findings}


def test_radix_node_pointing_to_itself() -> None:
    mem = SparseMemory()
    root = 0x20_0000
    geom = RadixGeometry()
    page = bytearray(PAGE)
    struct.pack_into("<Q", page, 0, root)
    struct.pack_into("<Q", page, 8, root)
    mem.write(root, bytes(page))
    counter = CountingMemory(mem)
    walk = radix_walk(counter, root, geom)
    assert [i.code for i in walk.issues].count("chain-cycle") == 2
    assert counter.reads == 1
    # and through decode_state
    state, _ = checked_decode(KhoInput(encode_root("kho-v4", root, []), memory=mem))
    assert "chain-cycle" in _codes(state)


def test_radix_interior_cycle_deeper_down() -> None:
    """A level-1 table pointing back at the root: reached twice, reported once, not followed."""
    mem = SparseMemory()
    alloc = PageAllocator(0x40_0000)
    root = radix_encode([(0x1000_0000, PAGE, 0)], mem, alloc)
    geom = RadixGeometry()
    node = root
    for _ in range(geom.depth - 2):  # down to the level-1 table
        node = next(w for w in struct.unpack(f"<{PAGE // 8}Q", mem.read(node, PAGE)) if w)
    mem.write(node + 8 * 5, struct.pack("<Q", root))
    counter = CountingMemory(mem)
    walk = radix_walk(counter, root, geom)
    assert "chain-cycle" in [i.code for i in walk.issues]
    assert walk.extents.total_bytes == PAGE
    assert counter.reads == geom.depth


def _luo_state(files_per_session: list[int]) -> LuoState:
    sessions = [LuoSession(f"s{i}", 0, 0, [LuoFile(j, "memfd-v2", j + 1, 0) for j in range(n)])
                for i, n in enumerate(files_per_session)]
    return LuoState("luo-v5", 1, 0, 0, True, sessions)


def _luo_input(mem: SparseMemory, alloc: PageAllocator, luo_blob: bytes) -> KhoInput:
    luo_phys = alloc.alloc(len(luo_blob))
    mem.write(luo_phys, luo_blob)
    root = encode_root("kho-v4", alloc.alloc(), [("LUO", luo_phys, len(luo_blob))])
    return KhoInput(root, {}, memory=mem, side=Side.IN)


def test_block_chain_that_loops() -> None:
    mem, alloc = SparseMemory(), PageAllocator()
    blob = luo_v5.encode(_luo_state([0, 0]), mem, alloc)
    sessions_pa = struct.unpack_from("<Q", blob, 16)[0]
    second = alloc.alloc()
    # block 1 -> block 2 -> block 1
    mem.write(sessions_pa, struct.pack("<Q", second))
    mem.write(second, struct.pack("<QQ", sessions_pa, 1) + pack_name("looped"))
    state, counter = checked_decode(_luo_input(mem, alloc, blob))
    assert "chain-cycle" in _codes(state)
    assert counter is not None and counter.reads < 20


def pack_name(name: str) -> bytes:
    return struct.pack("<64sQQ", name.encode(), 0, 0)


def test_block_chain_one_over_the_kernel_limit() -> None:
    mem, alloc = SparseMemory(), PageAllocator()
    blob = luo_v5.encode(_luo_state([]), mem, alloc)
    blocks = [alloc.alloc() for _ in range(MAX_BLOCKS + 1)]
    for i, phys in enumerate(blocks):
        nxt = blocks[i + 1] if i + 1 < len(blocks) else 0
        mem.write(phys, struct.pack("<QQ", nxt, 1) + pack_name(f"s{i}"))
    blob = blob[:16] + struct.pack("<Q", blocks[0]) + blob[24:]
    state, counter = checked_decode(_luo_input(mem, alloc, blob))
    assert "chain-too-long" in _codes(state)
    assert counter is not None and counter.reads <= MAX_BLOCKS + 10
    luo_state = next(s.decoded for s in state.subtrees if s.name == "LUO")
    assert isinstance(luo_state, LuoState) and len(luo_state.sessions) == MAX_BLOCKS


def test_vmalloc_chain_that_loops() -> None:
    mem, alloc = SparseMemory(), PageAllocator()
    data = bytes(PAGE * 4)
    ser = registry.encode_memfd("memfd-v2", data, mem, alloc)
    desc_first = struct.unpack_from("<Q", mem.read(ser + 32, 8))[0]
    # a full chunk whose next points at itself
    chunk = struct.pack("<Q", desc_first) + struct.pack("<Q", 0x7000_0000) * ((PAGE - 8) // 8)
    mem.write(desc_first, chunk)
    state = _luo_state([1])
    state.sessions[0].files[0].data = ser
    blob = luo_v5.encode(state, mem, alloc)
    result, counter = checked_decode(_luo_input(mem, alloc, blob))
    assert "chain-cycle" in _codes(result)
    assert counter is not None and counter.reads < 50


def test_sessions_sharing_one_files_chain() -> None:
    """204 sessions all pointing at one 200-block files chain: without a global notion of which
    page belongs to which structure this is 204 x 200 block reads (quadratic in the input)."""
    mem, alloc = SparseMemory(), PageAllocator()
    files = [alloc.alloc() for _ in range(200)]
    for i, phys in enumerate(files):
        nxt = files[i + 1] if i + 1 < len(files) else 0
        mem.write(phys, struct.pack("<QQ48sQQ", nxt, 1, b"none-v1", 0, i))
    sessions = [alloc.alloc() for _ in range(4)]
    for i, phys in enumerate(sessions):
        nxt = sessions[i + 1] if i + 1 < len(sessions) else 0
        entries = b"".join(struct.pack("<64sQQ", f"s{i}-{j}".encode(), files[0], 200)
                           for j in range(51))
        mem.write(phys, struct.pack("<QQ", nxt, 51) + entries)
    blob = struct.pack("<8sQQQ", b"luo-v5", 1, sessions[0], 0)
    state, counter = checked_decode(_luo_input(mem, alloc, blob))
    assert "chain-cycle" in _codes(state)
    assert counter is not None and counter.reads <= 4 + 200 + 4 * 51 + 5


def test_files_sharing_one_memfd() -> None:
    """600 files pointing at one memfd whose folio array has 40 chunks: each chunk is read once."""
    mem, alloc = SparseMemory(), PageAllocator()
    ser = registry.encode_memfd("memfd-v2", b"x", mem, alloc)
    chunks = [alloc.alloc() for _ in range(40)]
    folio_page = alloc.alloc()
    mem.write(folio_page, struct.pack("<QQ", (0x7000_0000 >> 12) | (3 << 52), 0))
    for i, phys in enumerate(chunks):
        nxt = chunks[i + 1] if i + 1 < len(chunks) else 0
        mem.write(phys, struct.pack("<Q", nxt) + struct.pack("<Q", folio_page) * 511)
    raw = bytearray(mem.read(ser, 48))
    struct.pack_into("<QIHH", raw, 32, chunks[0], 40 * 511, 1, 0)
    mem.write(ser, bytes(raw))
    state = _luo_state([60] * 10)
    for s in state.sessions:
        for f in s.files:
            f.data = ser
    blob = luo_v5.encode(state, mem, alloc)
    result, counter = checked_decode(_luo_input(mem, alloc, blob))
    assert "chain-cycle" in _codes(result)
    assert counter is not None and counter.reads <= 11 + 10 + 600 + 40 + 1 + 5


def test_memfd_folio_array_with_huge_order_is_not_read_whole() -> None:
    """A kho_vmalloc order of 40 claims 4 PiB blocks; the decoder must not ask for them."""
    mem, alloc = SparseMemory(), PageAllocator()
    ser = registry.encode_memfd("memfd-v2", b"x" * PAGE, mem, alloc)
    raw = bytearray(mem.read(ser, 48))
    struct.pack_into("<H", raw, 46, 40)  # kho_vmalloc.order
    mem.write(ser, bytes(raw))
    state = _luo_state([1])
    state.sessions[0].files[0].data = ser
    blob = luo_v5.encode(state, mem, alloc)
    result, counter = checked_decode(_luo_input(mem, alloc, blob))
    assert "property-malformed" in _codes(result)
    assert counter is not None and counter.bytes < 1 << 20


def test_root_blob_size_is_bounded() -> None:
    """blob-size is read from the FDT: 2^60 must not become a 2^60-byte read."""
    mem = SparseMemory()
    for phys in range(0x10_0000, 0x10_0000 + 64 * PAGE, PAGE):
        mem.write(phys, bytes(PAGE))
    root = encode_root("kho-v4", 0x10_0000, [("zz", 0x10_0000, 1 << 60)])
    state, counter = checked_decode(KhoInput(root, {}, memory=mem))
    assert counter is not None and counter.bytes < MAX_READ_LENGTH
    assert _codes(state) & {"count-mismatch", "property-malformed"}


def _raw_fdt(body: bytes, strings: bytes) -> bytes:
    return _fdt_like(body, strings, 0)


def _nested(levels: int) -> bytes:
    begin = struct.pack(">I", FDT_BEGIN_NODE) + b"n\0\0\0"
    body = (struct.pack(">I", FDT_BEGIN_NODE) + bytes(4) + begin * levels
            + struct.pack(">I", FDT_END_NODE) * (levels + 1) + struct.pack(">I", FDT_END))
    return _raw_fdt(body, b"")


def test_fdt_nesting_1000_levels() -> None:
    blob = _nested(1000)
    with pytest.raises(AbiError, match="deeper"):
        parse_fdt(blob)
    parse_fdt(_nested(MAX_DEPTH - 1))  # the limit itself is not what rejects the deep one
    for name in ("memblock", "kho_test", "LUO"):
        state, _ = checked_decode(KhoInput(None, {name: blob}))
        assert "blob-malformed" in _codes(state)
    state, _ = checked_decode(KhoInput(blob, {}))
    assert "blob-malformed" in _codes(state)


def _wide(nodes: int) -> bytes:
    strings = b"compatible\0start\0size\0"
    child = bytearray()
    for i in range(nodes):
        name = f"r{i}".encode() + b"\0"
        child += struct.pack(">I", FDT_BEGIN_NODE) + name + bytes(-len(name) % 4)
        child += struct.pack(">III", FDT_PROP, 8, 11) + struct.pack("<Q", i * PAGE)
        child += struct.pack(">I", FDT_END_NODE)
    compat = b"memblock-v1\0"
    body = (struct.pack(">I", FDT_BEGIN_NODE) + bytes(4)
            + struct.pack(">III", FDT_PROP, len(compat), 0) + compat + bytes(child)
            + struct.pack(">I", FDT_END_NODE) + struct.pack(">I", FDT_END))
    return _raw_fdt(body, strings)


def test_fdt_with_100k_nodes() -> None:
    blob = _wide(100_000)
    fdt = parse_fdt(blob)
    assert len(fdt.root.children) == 100_000
    state, _ = checked_decode(KhoInput(None, {"memblock": blob}))
    mb = state.subtrees[0].decoded
    assert isinstance(mb, memblock.MemblockState) and len(mb.regions) == 100_000
    assert "property-missing" in _codes(state)
    # as a root FDT: 100k subtrees, none of which can be fetched
    root_state, _ = checked_decode(KhoInput(blob, {}, memory=SparseMemory()))
    assert len(root_state.subtrees) == 100_000


# ----------------------------------------------------------------------------- differential


def test_read_vmalloc_spanning_chunks() -> None:
    """600 blocks: one full chunk of 511, a second chunk of 89, all read and referenced."""
    mem, alloc = SparseMemory(), PageAllocator()
    data = bytes(range(256)) * (600 * PAGE // 256)
    desc = vmalloc.encode_vmalloc(data, mem, alloc)
    ctx = DecodeContext(mem)
    area = vmalloc.read_vmalloc(ctx, desc, "/p", "test")
    assert len(area.chunk_pages) == 2 and len(area.blocks) == 600 and area.complete
    assert not ctx.findings
    assert len(ctx.refs) == 2 + 600
    assert vmalloc.read_area_bytes(ctx, area, len(data), "/p", "test") == data


def test_decode_state_restores_the_collector() -> None:
    import gc
    inp = KhoInput(encode_root("kho-v4", 0, []), {})
    assert gc.isenabled()
    decode_state(inp)
    assert gc.isenabled()
    gc.disable()
    try:
        decode_state(inp)
        assert not gc.isenabled()
    finally:
        gc.enable()


# ----------------------------------------------------------------------------- found by fuzz/
# What the coverage-guided fuzzer (fuzz/decoder.py) found, or showed the way to (see
# fuzz/README.md), reduced by hand to the smallest input that fails on the code before the fix.


def _elf_core(tmp_path: Path, phoff: int, segments: list[tuple[int, int, int]]) -> str:
    """An ELF64 core header with `segments` = (p_offset, p_paddr, p_filesz) PT_LOAD entries."""
    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<Q", header, 32, phoff)
    struct.pack_into("<HH", header, 54, 56, len(segments))
    table = b"".join(struct.pack("<IIQQQQQQ", 1, 6, off, 0, paddr, size, size, 4096)
                     for off, paddr, size in segments)
    path = tmp_path / "core"
    path.write_bytes(bytes(header) + table + b"payload!")
    return str(path)


@pytest.mark.parametrize("phoff", [1 << 63, (1 << 64) - 1, (1 << 63) - 8])
def test_elf_core_program_headers_beyond_any_file(tmp_path: Path, phoff: int) -> None:
    """e_phoff is a u64 but pread takes an off_t: 2^63 and above raised OverflowError, just
    below it EINVAL, instead of the AbiError of a file that is not a usable core."""
    with pytest.raises(AbiError, match="beyond any file"):
        ElfCoreMemory(_elf_core(tmp_path, phoff, [(120, 0x1000, 8)]))


def test_elf_core_segment_beyond_any_file(tmp_path: Path) -> None:
    """A PT_LOAD whose p_offset no pread can reach: read() raised OverflowError."""
    path = _elf_core(tmp_path, 64, [(1 << 63, 0x1000, 8)])
    with pytest.raises(AbiError, match="beyond any file"), ElfCoreMemory(path) as mem:
        mem.read(0x1000, 8)
    # the table is checked, not just the segments that get read
    path = _elf_core(tmp_path, 64, [(120, 0x1000, 8), ((1 << 64) - 4, 0x9000, 8)])
    with pytest.raises(AbiError, match="segment 1"):
        ElfCoreMemory(path)


def test_kho_v1_chunk_of_impossible_order_costs_nothing() -> None:
    """A khoser_mem_chunk with order 0xffffffff is reported and skipped by read_chain, but the
    walk still computed its bitmap span, 2^32+ bits: a 512 MB integer for a 16-byte header."""
    import tracemalloc

    mem = SparseMemory()
    root = 0x10_0000
    mem.write(root, struct.pack("<QII", 0, 0xFFFF_FFFF, 1) + struct.pack("<QQ", 0, 0x20_0000))
    tracemalloc.start()
    try:
        walk = chunks_walk(CountingMemory(mem), root)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    assert [i.code for i in walk.issues] == ["property-malformed"]
    state, _ = checked_decode(KhoInput(encode_root("kho-v1", root, []), memory=mem))
    assert "property-malformed" in _codes(state)


def _radix_down_slot_zero(mem: SparseMemory, root: int, leaf: bytes) -> None:
    """A radix tree whose only path takes slot 0 at every level: the leaf under key prefix 0."""
    geom = RadixGeometry()
    for level in range(geom.depth - 1):
        mem.write(root + level * PAGE, struct.pack("<Q", root + (level + 1) * PAGE))
    mem.write(root + (geom.depth - 1) * PAGE, leaf)


def test_radix_leaf_under_key_prefix_zero() -> None:
    """The leaf under prefix 0 holds keys of several bit lengths, i.e. several orders (38..53).
    A run of set bits across a power of two was decoded with its first key's order, and keys
    whose blocks reach 2^64 became extents no u64 holds: OverflowError out of the walk or out of
    ExtentMap.union(), so decode_state() raised."""
    mem = SparseMemory()
    root = 0x20_0000
    # bits 7 and 8: key 7 (order 50) is the block at 3 << 62 of 2^62 bytes, which ends at 2^64;
    # key 8 (order 49) is the block at 0 of 2^61 bytes; bit 1 is key 1, one 2^64-byte block
    _radix_down_slot_zero(mem, root, bytes([0b1000_0010, 0b1]))
    walk = radix_walk(CountingMemory(mem), root)
    assert [(e.phys, e.size, e.order) for e in walk.extents] == [(0, 1 << 61, 49)]
    assert [i.code for i in walk.issues] == ["property-malformed"] * 2
    walk.extents.union()
    state, _ = checked_decode(KhoInput(encode_root("kho-v4", root, []), memory=mem))
    assert "property-malformed" in _codes(state)


def test_kho_v1_bitmap_that_ends_at_2_64() -> None:
    """A kho-v1 bitmap whose span ends exactly at 2^64 passed the 'past 2^64' check, and its
    last block became an extent ending at 2^64: ExtentMap.union() raised OverflowError."""
    mem = SparseMemory()
    root, bitmap = 0x10_0000, 0x20_0000
    span = PAGE * 8 * PAGE  # a page-sized bitmap of order-0 pages
    mem.write(root, struct.pack("<QII", 0, 0, 1) + struct.pack("<QQ", (1 << 64) - span, bitmap))
    mem.write(bitmap, bytes(PAGE - 1) + b"\x80")
    walk = chunks_walk(CountingMemory(mem), root)
    assert [i.code for i in walk.issues] == ["property-malformed"]
    assert len(walk.extents) == 0
    state, _ = checked_decode(KhoInput(encode_root("kho-v1", root, []), memory=mem))
    assert "property-malformed" in _codes(state)


def test_luo_v1_sessions_sharing_one_file_array() -> None:
    """luo-v1 sessions point at contiguous file arrays with no owner check: 100 sessions on
    one array of 128 files decoded 12,800 files (and read the array 100 times) from 5 pages,
    the luo-v1 form of test_sessions_sharing_one_files_chain. An array is decoded once now,
    also when the sessions point into it at different offsets."""
    mem, alloc = SparseMemory(), PageAllocator()
    ser = registry.encode_memfd("memfd-v2", b"x", mem, alloc)
    files = alloc.alloc(2 * PAGE)
    mem.write(files, b"".join(struct.pack("<48sQQ", b"memfd-v2", ser, i) for i in range(128)))
    header = alloc.alloc(16 * PAGE)
    mem.write(header, struct.pack("<Q", 100) + b"".join(
        struct.pack("<64sQQ", f"s{i}".encode(), files + (i % 2) * 64, 128 - i % 2)
        for i in range(100)))
    w = FdtWriter().begin_node("").property_string("compatible", luo_v1.COMPATIBLE)
    w.property_u64("liveupdate-number", 1).begin_node("luo-session")
    w.property_string("compatible", luo_v1.SESSION_COMPATIBLE)
    blob = w.property_u64("luo-session-header", header).end_node().end_node().finish()
    luo_phys = alloc.alloc(len(blob))
    mem.write(luo_phys, blob)
    root = encode_root("kho-v3", alloc.alloc(), [("LUO", luo_phys, len(blob))])
    state, counter = checked_decode(KhoInput(root, {}, memory=mem, side=Side.IN))
    luo_state = next(s.decoded for s in state.subtrees if s.name == "LUO")
    assert isinstance(luo_state, LuoState) and len(luo_state.sessions) == 100
    assert sum(len(s.files) for s in luo_state.sessions) == 128
    assert "chain-cycle" in _codes(state)
    assert counter is not None and counter.reads <= 2 + 100 + 128 + 10


def test_scratch_area_clear_of_the_map_is_not_a_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each scratch area was compared with every extent of the map: 5.8 s for 3 areas and 1M
    scattered pages, and areas x extents for the 1026 areas a debugfs scratch list may hold. An
    area clear of the map (every healthy one) is now a bisection of the map's union."""
    m = ExtentMap()
    for i in range(1000):
        m.add(i * 2 * PAGE, PAGE, 0)
    scanned = 0
    plain_iter = ExtentMap.__iter__

    def counting_iter(self: ExtentMap) -> Iterator[Extent]:
        nonlocal scanned
        for e in plain_iter(self):
            scanned += 1
            yield e

    monkeypatch.setattr(ExtentMap, "__iter__", counting_iter)
    assert m.overlapping(2000 * 2 * PAGE, 64 * PAGE) == []
    assert m.overlapping(PAGE, PAGE) == []  # the hole between the first two extents
    assert scanned == 0
    assert m.overlapping(PAGE, 2 * PAGE) == [Extent(2 * PAGE, PAGE, 0)]
    assert m.overlapping(0, 1) == [Extent(0, PAGE, 0)]
