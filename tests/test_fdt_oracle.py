"""A second, independent reading of every FDT we write and every sample FDT: the `fdt` package
(PyPI, pure Python, written without libfdt) parses the same bytes, and its node and property tree
must equal kho_agent's own parser's, value for value. It runs where dtc is not installed
(test_dtc_crosscheck.py skips then), and it also writes: FDTs it re-encodes with its own layout
and string table must read back to the same tree with our parser.
"""

from __future__ import annotations

import struct
from pathlib import Path

import fdt
import pytest
from fdtcases import (
    SUBTREES,
    Tree,
    fdt_trees,
    luo_v1_state,
    memblock_state,
    names,
    our_tree,
    prop,
    sample_fdts,
    write_tree,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kho_agent.abi.errors import FdtTruncated
from kho_agent.abi.fdt import parse_fdt
from kho_agent.abi.formats import luo_v1
from kho_agent.abi.formats import memblock_v1 as memblock
from kho_agent.abi.kho_root import encode_root
from kho_agent.abi.memory import PageAllocator, SparseMemory
from kho_agent.abi.registry import ROOT_FORMATS


def raw_value(prop: fdt.Property) -> bytes:
    """The property's bytes back from the `fdt` package's typed value. It types a value as
    strings (printable, each NUL-terminated, none empty), else as big-endian 32-bit words, else
    as bytes: each form gives the bytes back exactly."""
    if isinstance(prop, fdt.PropStrings):
        return b"".join(s.encode("ascii") + b"\0" for s in prop.data)
    if isinstance(prop, fdt.PropWords):
        return b"".join(struct.pack(">I", word) for word in prop.data)
    if isinstance(prop, fdt.PropBytes):
        return bytes(prop.data)
    return b""


def oracle_tree(node: fdt.Node, name: str = "") -> Tree:
    return (name, [(p.name, raw_value(p)) for p in node.props],
            [oracle_tree(child, child.name) for child in node.nodes])


def agree(blob: bytes) -> Tree:
    """Both parsers read `blob` alike, reservations included, and our parser reads the `fdt`
    package's re-encoding of it alike too; the agreed tree."""
    theirs = fdt.parse_dtb(blob)
    ours = parse_fdt(blob)
    tree = our_tree(ours.root)
    assert oracle_tree(theirs.root) == tree
    assert [(e["address"], e["size"]) for e in theirs.entries] == ours.reservations
    assert theirs.header.total_size == ours.totalsize
    assert our_tree(parse_fdt(theirs.to_dtb(version=17)).root) == tree
    return tree


# --- our encoders --------------------------------------------------------------------------------

@pytest.mark.parametrize("compatible", sorted(ROOT_FORMATS))
@pytest.mark.parametrize("count", [0, 1, 4])
def test_root_fdt_of_every_kho_version(compatible: str, count: int) -> None:
    subs = SUBTREES[:count]
    tree = agree(encode_root(compatible, 0x264F000, subs))
    assert prop(tree, "compatible") == compatible.encode() + b"\0"
    # CPU-native (little-endian) u64 inside the FDT, as the kernel writes it
    assert prop(tree, "preserved-memory-map") == struct.pack("<Q", 0x264F000)
    assert names(tree) == [name for name, _, _ in reversed(subs)]
    fmt = ROOT_FORMATS[compatible]
    for (_, phys, size), node in zip(reversed(subs), tree[2], strict=True):
        assert prop(node, fmt.subtree_prop) == struct.pack("<Q", phys)
        if fmt.size_prop:
            assert prop(node, fmt.size_prop) == struct.pack("<Q", size)
        else:
            assert [p for p, _ in node[1]] == [fmt.subtree_prop]


def test_memblock_fdt() -> None:
    blob = memblock.encode(memblock_state())
    tree = agree(blob)
    assert prop(tree, "compatible") == b"memblock-v1\0"
    assert names(tree) == ["kho_demo_rsv", "second"]
    assert prop(tree[2][0], "compatible") == b"reserve-mem-v1\0"
    assert prop(tree[2][0], "start") == struct.pack("<Q", 0x7C300000)
    assert prop(tree[2][1], "size") == struct.pack("<Q", 0x2000)
    # the oracle's own lookup by path finds the same region
    region = fdt.parse_dtb(blob).get_node("/kho_demo_rsv")
    assert raw_value(region.get_property("size")) == struct.pack("<Q", 0x100000)


def test_luo_v1_fdt() -> None:
    mem, alloc = SparseMemory(), PageAllocator()
    tree = agree(luo_v1.encode(luo_v1_state(), mem, alloc))
    assert prop(tree, "compatible") == b"luo-v1\0"
    assert prop(tree, "liveupdate-number") == struct.pack("<Q", 3)
    assert names(tree) == ["luo-session", "luo-flb"]
    assert prop(tree[2][0], "compatible") == b"luo-session-v2\0"
    assert prop(tree[2][1], "compatible") == b"luo-flb-v1\0"


# --- any tree FdtWriter can write ----------------------------------------------------------------

# every form the oracle types a value as: strings, words, odd-sized bytes, empty
VALUE = st.one_of(st.binary(max_size=24),
                  st.lists(st.from_regex(r"[a-z0-9,.-]{1,12}", fullmatch=True), min_size=1,
                           max_size=3).map(lambda ss: b"".join(s.encode() + b"\0" for s in ss)),
                  st.integers(0, (1 << 64) - 1).map(lambda v: struct.pack("<Q", v)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fdt_trees(VALUE))
def test_fdt_writer_random_trees(tree: Tree) -> None:
    assert agree(write_tree(tree)) == tree


# --- the captured samples ------------------------------------------------------------------------

def test_real_sample_fdts(samples_dir: Path) -> None:
    blobs = sample_fdts(samples_dir)
    assert len(blobs) >= 10
    roots = 0
    for path in blobs:
        tree = agree(path.read_bytes())
        if dict(tree[1]).get("compatible") == b"kho-v4\0":
            roots += 1
            assert set(names(tree)) == {"memblock", "LUO", "kho_test", "kexec-metadata"}
            for node in tree[2]:
                assert len(prop(node, "preserved-data")) == 8
                assert len(prop(node, "blob-size")) == 8
    assert roots >= 4


def test_truncated_debugfs_fdt(samples_dir: Path) -> None:
    """The cut-short debugfs out/fdt of 7.2/7.3: our parser refuses it (its header promises 405
    bytes, 233 are there); the oracle, which does not check totalsize, runs off the end of the
    prefix (its string table is cut off)."""
    blob = (samples_dir / "fdt" / "stage1-debugfs-out-fdt.truncated.bin").read_bytes()
    with pytest.raises(FdtTruncated) as exc:
        parse_fdt(blob)
    assert (exc.value.have, exc.value.need) == (233, 405)
    with pytest.raises(IndexError):
        fdt.parse_dtb(blob)
