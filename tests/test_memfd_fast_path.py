"""memfd.decode's fast paths (a folio array of one vmalloc chunk, a one-folio file) against its
general code (`fast=False`): on healthy memfds and on memfds with one word of their metadata
overwritten, both give the same state, the same findings and the same references in the same
order, and claim the same pages. The fast paths exist for speed only (benchmarks/bench_decoder.py's
LUO figure: 100k memfds); a difference here is a decoder that says different things about the
same bytes depending on which path they took."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kho_agent.abi import memfd, registry
from kho_agent.abi.context import DecodeContext
from kho_agent.abi.memory import PageAllocator, SparseMemory

PAGE = 4096
LAYOUTS = {f.compatible: f.layout for f in registry.MEMFD_FORMATS}


def _build(compatible: str, pages: int, partial: int) -> tuple[SparseMemory, int, list[int]]:
    """A memfd of `pages` pages plus `partial` bytes; returns the memory, the memfd_luo_ser
    address and the addresses of its metadata words (header, vmalloc chunk, folio entries)."""
    memory = SparseMemory(PAGE)
    alloc = PageAllocator(0x100000, PAGE)
    size = pages * PAGE + partial
    content = bytes((i * 7) & 0xFF for i in range(min(size, 3 * PAGE)))
    phys = memfd.encode(LAYOUTS[compatible], content, memory, alloc, size=size)
    layout = LAYOUTS[compatible]
    fields = layout.ser.unpack_from(memory.read(phys, layout.ser.size), 0)
    first, total = fields[-4], fields[-3]
    words = [phys + off for off in range(0, layout.ser.size, 8)]
    if first:
        words += [first + off for off in range(0, 8 * (2 + total), 8)]
        chunk_words = struct.unpack_from(f"<{1 + total}Q", memory.read(first, 8 * (1 + total)))
        for blk in chunk_words[1:]:
            if blk:
                words += [blk + off for off in range(0, 16 * max(pages, 1), 8)][:64]
    return memory, phys, words


def _decode(compatible: str, memory: SparseMemory, phys: int, fast: bool
            ) -> tuple[object, DecodeContext]:
    ctx = DecodeContext(memory)
    state = memfd.decode(LAYOUTS[compatible], ctx, phys, "/LUO/session[s]/file[0x1]", fast=fast)
    return state, ctx


def _same(compatible: str, memory: SparseMemory, phys: int) -> None:
    fast_state, fast = _decode(compatible, memory, phys, True)
    slow_state, slow = _decode(compatible, memory, phys, False)
    assert fast.findings == slow.findings
    assert fast.refs == slow.refs
    assert fast.owners == slow.owners
    assert fast_state == slow_state


@pytest.mark.parametrize("compatible", sorted(LAYOUTS))
@pytest.mark.parametrize(("pages", "partial"), [(0, 0), (0, 100), (1, 0), (2, 0), (5, 17)])
def test_healthy_memfds_decode_alike_on_both_paths(compatible: str, pages: int,
                                                   partial: int) -> None:
    memory, phys, _ = _build(compatible, pages, partial)
    _same(compatible, memory, phys)
    state, ctx = _decode(compatible, memory, phys, True)
    assert not ctx.findings and isinstance(state, memfd.MemfdState) and state.complete


WORDS = [0, 1, 2, 8, PAGE, PAGE + 8, 0x100000, 0x101000, 0x7FF000, 1 << 40, (1 << 64) - 1,
         1 << 52, (3 << 52) | 0x100]
VALUES = st.sampled_from(WORDS)


@pytest.mark.parametrize("compatible", sorted(LAYOUTS))
@pytest.mark.parametrize("pages", [0, 1, 2])
def test_every_word_of_a_small_memfd_overwritten_decodes_alike(compatible: str,
                                                               pages: int) -> None:
    """Each metadata word of a small memfd (the fast paths' inputs) with each value, as a 64-bit
    and as a 32-bit field."""
    _, _, words = _build(compatible, pages, 0)
    for where in words:
        for value in WORDS:
            for packed in (struct.pack("<Q", value), struct.pack("<I", value & 0xFFFFFFFF)):
                memory, phys, _ = _build(compatible, pages, 0)
                memory.write(where, packed)
                _same(compatible, memory, phys)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(compatible=st.sampled_from(sorted(LAYOUTS)), pages=st.integers(0, 3),
       partial=st.sampled_from([0, 1]), pick=st.integers(0, 10_000), value=VALUES,
       half=st.booleans())
def test_one_overwritten_word_decodes_alike_on_both_paths(compatible: str, pages: int,
                                                          partial: int, pick: int, value: int,
                                                          half: bool) -> None:
    memory, phys, words = _build(compatible, pages, partial)
    where = words[pick % len(words)]
    if half:  # a 32-bit field (seals, flags, total_pages, flags/order)
        memory.write(where, struct.pack("<I", value & 0xFFFFFFFF))
    else:
        memory.write(where, struct.pack("<Q", value))
    _same(compatible, memory, phys)


def test_an_unreadable_chunk_or_folio_page_decodes_alike_on_both_paths() -> None:
    for drop in ("chunk", "folios"):
        memory, phys, words = _build("memfd-v2", 1, 0)
        layout = LAYOUTS["memfd-v2"]
        fields = layout.ser.unpack_from(memory.read(phys, layout.ser.size), 0)
        first = fields[-4]
        target = first if drop == "chunk" else struct.unpack_from("<Q", memory.read(first + 8,
                                                                                   8))[0]
        partial = SparseMemory(PAGE)
        for page_phys in {w - w % PAGE for w in words} - {target}:
            partial.write(page_phys, memory.read(page_phys, PAGE))
        _same("memfd-v2", partial, phys)
        _, ctx = _decode("memfd-v2", partial, phys, True)
        assert ctx.findings, drop
