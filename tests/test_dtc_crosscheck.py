"""Every FDT we write must be a valid FDT to the reference tools, and our parser must read every
FDT exactly as libfdt does.

For each blob: `dtc -I dtb -O dts` must accept it; libfdt (through `fdtget`) must list the same
nodes, the same properties in the same order, and the same raw bytes as parse_fdt(); and dtc's own
re-encoding of it (`dtc -I dtb -O dtb`, different layout and string table) must parse to the same
tree with our parser.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

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

from kho_agent.abi.errors import AbiError, FdtTruncated
from kho_agent.abi.fdt import parse_fdt
from kho_agent.abi.formats import kho_selftest_v1 as kho_test
from kho_agent.abi.formats import luo_v1
from kho_agent.abi.formats import memblock_v1 as memblock
from kho_agent.abi.kho_root import encode_root
from kho_agent.abi.memory import PageAllocator, SparseMemory
from kho_agent.abi.registry import ROOT_FORMATS
from kho_agent.abi.vmalloc import VmallocDesc

pytestmark = pytest.mark.skipif(
    shutil.which("dtc") is None or shutil.which("fdtget") is None,
    reason="dtc/fdtget not installed (Debian package device-tree-compiler)")

def _run(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"{' '.join(args)} failed: {proc.stderr.strip()}"
    return proc.stdout


def _lines(out: str) -> list[str]:
    return out.split("\n")[:-1] if out else []


def libfdt_tree(path: Path, node: str = "/", name: str = "") -> Tree:
    """Read a tree through fdtget (libfdt): subnodes, property names, raw values as bytes."""
    props = _lines(_run("fdtget", "-p", str(path), node))
    values: list[bytes] = []
    if props:
        args = [part for prop in props for part in (node, prop)]
        out = _lines(_run("fdtget", "-t", "bx", str(path), *args))
        assert len(out) == len(props)
        values = [bytes(int(b, 16) for b in line.split()) for line in out]
    children = _lines(_run("fdtget", "-l", str(path), node))
    base = node.rstrip("/")
    return (name, list(zip(props, values, strict=True)),
            [libfdt_tree(path, f"{base}/{child}", child) for child in children])


def crosscheck(blob: bytes) -> Tree:
    """Run every check on one blob; return the agreed tree."""
    ours = our_tree(parse_fdt(blob).root)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob.dtb"
        path.write_bytes(blob)
        dts = _run("dtc", "-I", "dtb", "-O", "dts", str(path))
        assert dts.startswith("/dts-v1/;")
        assert libfdt_tree(path) == ours
        again = Path(tmp) / "again.dtb"
        _run("dtc", "-I", "dtb", "-O", "dtb", "-o", str(again), str(path))
        assert our_tree(parse_fdt(again.read_bytes()).root) == ours
    return ours


# ----------------------------------------------------------------------------- our encoders


@pytest.mark.parametrize("compatible", sorted(ROOT_FORMATS))
@pytest.mark.parametrize("count", [0, 1, 4])
def test_encode_root(compatible: str, count: int) -> None:
    subs = SUBTREES[:count]
    tree = crosscheck(encode_root(compatible, 0x264F000, subs))
    assert prop(tree, "compatible") == compatible.encode() + b"\0"
    assert prop(tree, "preserved-memory-map") == struct.pack("<Q", 0x264F000)
    # the kernel inserts each new subnode first: the last added is listed first
    assert names(tree) == [name for name, _, _ in reversed(subs)]
    fmt = ROOT_FORMATS[compatible]
    for (name, phys, size), node in zip(reversed(subs), tree[2], strict=True):
        assert node[0] == name
        assert prop(node, fmt.subtree_prop) == struct.pack("<Q", phys)
        if fmt.size_prop:
            assert prop(node, fmt.size_prop) == struct.pack("<Q", size)


def test_memblock_encode() -> None:
    tree = crosscheck(memblock.encode(memblock_state()))
    assert names(tree) == ["kho_demo_rsv", "second"]
    assert prop(tree[2][0], "start") == struct.pack("<Q", 0x7C300000)
    assert prop(tree[2][1], "size") == struct.pack("<Q", 0x2000)


def test_kho_test_encode() -> None:
    desc = VmallocDesc(0x2C06000, 1, 1, 0)
    state = kho_test.KhoTestState("kho-test-v1", kho_test.MAGIC, 15, 0x28C915AB, desc)
    tree = crosscheck(kho_test.encode(state))
    assert prop(tree, "magic") == struct.pack("<I", kho_test.MAGIC)
    data = tree[2][0]
    assert data[0] == "data" and prop(data, "folios_info") == desc.pack()


def test_luo_v1_encode() -> None:
    mem, alloc = SparseMemory(), PageAllocator()
    state = luo_v1_state()
    tree = crosscheck(luo_v1.encode(state, mem, alloc))
    assert names(tree) == ["luo-session", "luo-flb"]
    assert prop(tree, "liveupdate-number") == struct.pack("<Q", 3)
    assert prop(tree[2][0], "luo-session-header") == struct.pack("<Q", state.sessions_phys)


# ----------------------------------------------------------------------------- random trees

# Siblings unique by the name before '@': libfdt resolves the path "/a" to the first of "a@0" and
# "a", so fdtget could not address both (a path-lookup rule, not a parsing difference).
TREES = fdt_trees(st.binary(max_size=24), child_key=lambda c: c[0].split("@")[0])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(TREES)
def test_fdt_writer_random_trees(tree: Tree) -> None:
    assert crosscheck(write_tree(tree)) == tree


# ----------------------------------------------------------------------------- real samples


def test_real_sample_fdts(samples_dir: Path) -> None:
    blobs = sample_fdts(samples_dir)
    assert len(blobs) >= 10
    roots = 0
    for path in blobs:
        tree = crosscheck(path.read_bytes())
        if "kho-v4" in tree[1][0][1].decode("ascii", "replace"):
            roots += 1
            assert set(names(tree)) == {"memblock", "LUO", "kho_test", "kexec-metadata"}
    assert roots >= 4


def test_real_sample_dts_matches_dtc(samples_dir: Path) -> None:
    """The guest's own .dts renderings equal what dtc prints here for the same bytes."""
    pairs = 0
    for dts in sorted((samples_dir / "fdt").glob("*.dts")):
        stem = dts.with_suffix("")
        blob = next(p for p in (stem.with_suffix(".dtb"), stem.with_suffix(".bin")) if p.exists())
        assert _run("dtc", "-I", "dtb", "-O", "dts", str(blob)) == dts.read_text()
        crosscheck(blob.read_bytes())
        pairs += 1
    assert pairs >= 5


def test_truncated_debugfs_fdt_rejected_by_both(samples_dir: Path) -> None:
    path = samples_dir / "fdt" / "stage1-debugfs-out-fdt.truncated.bin"
    proc = subprocess.run(["dtc", "-I", "dtb", "-O", "dts", str(path)], capture_output=True,
                          text=True, check=False)
    assert proc.returncode != 0
    with pytest.raises(FdtTruncated) as exc:
        parse_fdt(path.read_bytes())
    assert (exc.value.have, exc.value.need) == (233, 405)
    assert isinstance(exc.value, AbiError)
