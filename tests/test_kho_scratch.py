"""kho_agent.kernel.kho_scratch: the kho_scratch= grammar (docs/kernel-abi.md §5.3) and the sizes a
cold boot reserves (§5.4). Expected values come from the kernel's rules, worked by hand in the
comments."""

from __future__ import annotations

import pytest

from kho_agent.errors import InvalidArgument
from kho_agent.kernel.kho_scratch import (
    SCRATCH_ALIGNMENT_BYTES,
    UINT_MAX,
    AreaSizes,
    KernReserved,
    ScratchParam,
    ScratchSizes,
    count_reserved,
    incoming_preserved,
    kernel_scratch_sizes,
    parse_kho_scratch,
    scratch_alignment,
    size_text,
)
from kho_agent.kernel.sysinfo import MemblockRegion

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30


# === grammar ===================================================================================

@pytest.mark.parametrize("value, expected", [
    ("0%", ScratchParam(scale=0)),
    ("200%", ScratchParam(scale=200)),
    ("+5%", ScratchParam(scale=5)),                   # kstrtoull() skips one leading '+'
    ("4294967295%", ScratchParam(scale=UINT_MAX)),    # 10 digits, the largest unsigned int
    ("0000000007%", ScratchParam(scale=7)),           # base 10: leading zeros are not octal
    ("+000000001%", ScratchParam(scale=1)),           # 10 characters before the % in all
    ("16M,512M,256M", ScratchParam(sizes=ScratchSizes(16 * MiB, 512 * MiB, 256 * MiB))),
    ("0,0,4k", ScratchParam(sizes=ScratchSizes(0, 0, 4 * KiB))),   # zeros allowed, sum not
    ("1g,2G,3m", ScratchParam(sizes=ScratchSizes(GiB, 2 * GiB, 3 * MiB))),
    # memparse() uses base 0: 0x is hex, a leading 0 is octal (010 = 8)
    ("0x10M,010M,1E", ScratchParam(sizes=ScratchSizes(16 * MiB, 8 * MiB, 1 << 60))),
    ("1T,1P,0", ScratchParam(sizes=ScratchSizes(1 << 40, 1 << 50, 0))),
])
def test_grammar_accepts(value: str, expected: ScratchParam) -> None:
    assert parse_kho_scratch(value) == expected


@pytest.mark.parametrize("value", [
    "64M,,64M",            # an empty field has no number
    "256M,512M,512Mfoo",   # the string must be fully consumed
    "12345678901%",        # 11 digits: longer than the kernel's 11-byte buffer allows
    "00000000001%",        # ... even when the value is small
    "4294967296%",         # 10 digits but above UINT_MAX: -ERANGE
    "512M,512M",           # the old two-field form
    "0,0,0",               # the sum must not be zero
    "16E,0,0",             # 16 << 60 wraps to 0 in 64 bits: a zero sum again
    "8E,8E,0",             # 2^63 + 2^63: the 64-bit sum wraps to zero
    "1,2,3,4",             # a fourth field is trailing garbage
    "%", "", "-5%", "5.5%", "abc%", "16M%",
    " 16M,1M,1M",          # simple_strtoull() skips no spaces
    "+16M,1M,1M",          # nor takes a sign
    "16MB,1M,1M",          # one suffix letter only
    "0x,1,1",              # "0x" without a hex digit parses as octal 0, then 'x' is garbage
    None,                  # a bare "kho_scratch" has no value
])
def test_grammar_rejects(value: str | None) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_kho_scratch(value)
    assert "Malformed early option 'kho_scratch'" in err.value.message
    assert "200%" in err.value.message


@pytest.mark.parametrize("n, text", [
    (0, "0"), (16 * MiB, "16M"), (GiB, "1G"), (1536 * MiB, "1536M"), (4 * KiB + 1, "4097"),
    (1 << 40, "1T"), (3 * KiB, "3K"),
])
def test_size_text_largest_exact_suffix(n: int, text: str) -> None:
    assert size_text(n) == text
    assert parse_kho_scratch(f"{text},0,1").sizes == ScratchSizes(n, 0, 1)  # round trip


# === the kernel's sizing =======================================================================

def test_alignment() -> None:
    # PAGE_SIZE << MAX_PAGE_ORDER (docs/kernel-abi.md §5.4): 4 MiB on x86-64 and 4K arm64, 32 MiB
    # with 16K pages (order 11), 512 MiB with 64K pages (order 13).
    assert SCRATCH_ALIGNMENT_BYTES == scratch_alignment(4096) == 4 * MiB
    assert scratch_alignment(16384, 11) == 32 * MiB
    assert scratch_alignment(65536, 13) == 512 * MiB


REGIONS = [
    MemblockRegion(0x1000000, 10 * MiB, 0, ("RSV_KERN",)),    # A: 16..26 MiB, node 0
    MemblockRegion(0x2000000, 6 * MiB, 0, ()),                # B: firmware (NONE): not counted
    MemblockRegion(0xFFE00000, 4 * MiB, 0, ("RSV_KERN",)),    # C: crosses 4 GiB, node 0
    MemblockRegion(0x100400000, 20 * MiB, 1, ("RSV_KERN",)),  # D: above 4 GiB, node 1
    MemblockRegion(0x200000000, 3 * MiB, None, ("RSV_NIT",)), # E: no node ('x')
    MemblockRegion(0x300000000, 5 * MiB, 1, ("NOMAP",)),      # F: not kernel use
]
# low   = A 10 MiB + C clipped to limit - base = 0xffffffff - 0xffe00000 = 2 MiB - 1
#       = 12 MiB - 1 = 12582911
# total = A 10 + C 4 + D 20 + E 3 = 37 MiB = 38797312
# node 0 = A + C = 14 MiB, node 1 = D = 20 MiB (E has no node)
LOW, TOTAL = 12 * MiB - 1, 37 * MiB


def test_count_reserved_like_memblock_reserved_kern_size() -> None:
    kern = count_reserved(REGIONS)
    assert (kern.low, kern.total, kern.per_node) == (LOW, TOTAL, {0: 14 * MiB, 1: 20 * MiB})


def test_count_reserved_excludes_scratch_areas() -> None:
    # 4 MiB of A is a scratch area (an allocation still listed as reserved after a cold boot)
    kern = count_reserved(REGIONS, exclude=[(0x1200000, 4 * MiB)])
    assert (kern.low, kern.total, kern.per_node[0]) == (LOW - 4 * MiB, TOTAL - 4 * MiB,
                                                        10 * MiB)


def test_incoming_preserved_is_rsv_nit_outside_the_scratch_areas() -> None:
    """kho_preserved_memory_reserve(): memblock_reserve() (no flag) then
    memblock_reserved_mark_noinit(): RSV_NIT alone. Inside a scratch area an RSV_NIT region is
    this kernel's own (preserved memory never lies in scratch); RSV_KERN is never preserved."""
    regions = [
        MemblockRegion(0x40000000, GiB, 0, ("RSV_NIT",)),          # 1 GiB carried over
        MemblockRegion(0x90000000, 8 * MiB, 0, ("RSV_NIT",)),      # 4 MiB in the area below
        MemblockRegion(0xA0000000, 40 * MiB, 0, ("RSV_KERN",)),    # this kernel's allocations
    ]
    area = [(0x90400000, 64 * MiB)]                                 # 0x90400000..0x94400000
    assert incoming_preserved(regions, area) == [(0x40000000, GiB), (0x90000000, 4 * MiB)]
    # the count the planner makes on a KHO boot: everything kernel-flagged but those
    kern = count_reserved(regions, exclude=incoming_preserved(regions, area))
    assert kern.total == 44 * MiB
    assert incoming_preserved(regions, []) == [(0x40000000, GiB), (0x90000000, 8 * MiB)]


@pytest.mark.parametrize("param, hugetlb, expected", [
    # 200%: lowmem = round_up(25165822, 4 MiB) = 24 MiB (5.9999995 blocks);
    # global = round_up(2 * 38797312 - 25165822 = 52428802, 4 MiB) = 13 blocks = 52 MiB;
    # nodes 28 and 40 MiB are already aligned
    (None, None, AreaSizes(24 * MiB, 52 * MiB, {0: 28 * MiB, 1: 40 * MiB})),
    # 300%: lowmem 37748733 -> 9 blocks = 36 MiB; global 116391936 - 37748733 = 78643203
    # -> 18.75 -> 19 blocks = 76 MiB; node 0 42 MiB -> 44 MiB; node 1 60 MiB
    (ScratchParam(scale=300), None, AreaSizes(36 * MiB, 76 * MiB, {0: 44 * MiB, 1: 60 * MiB})),
    # 7.3 leaves 8 MiB of HugeTLB on node 1 out: total 29 MiB -> global 60817408 - 25165822
    # = 35651586 -> 8.5 -> 9 blocks = 36 MiB; node 1 (20 - 8) * 2 = 24 MiB
    (None, KernReserved(0, 8 * MiB, {1: 8 * MiB}),
     AreaSizes(24 * MiB, 36 * MiB, {0: 28 * MiB, 1: 24 * MiB})),
    # absolute sizes are rounded up the same way: 250M -> 252M, every node gets it
    (parse_kho_scratch("16M,512M,250M"), None,
     AreaSizes(16 * MiB, 512 * MiB, {0: 252 * MiB, 1: 252 * MiB})),
    (parse_kho_scratch("1,0,0"), None, AreaSizes(4 * MiB, 0, {0: 0, 1: 0})),
    # 0% scales everything to zero-sized areas
    (parse_kho_scratch("0%"), None, AreaSizes(0, 0, {0: 0, 1: 0})),
])
def test_kernel_default_algorithm(param: ScratchParam | None, hugetlb: KernReserved | None,
                                  expected: AreaSizes) -> None:
    got = kernel_scratch_sizes(count_reserved(REGIONS), param, nodes=[0, 1], hugetlb=hugetlb)
    assert got == expected
