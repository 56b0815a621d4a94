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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kho_agent.abi.errors import AbiError, FdtTruncated
from kho_agent.abi.fdt import FdtNode, FdtWriter, parse_fdt
from kho_agent.abi.formats import kho_selftest_v1 as kho_test
from kho_agent.abi.formats import luo_v1
from kho_agent.abi.formats import memblock_v1 as memblock
from kho_agent.abi.kho_root import encode_root
from kho_agent.abi.luo_common import LuoFile, LuoFlb, LuoSession, LuoState
from kho_agent.abi.memory import PageAllocator, SparseMemory
from kho_agent.abi.registry import ROOT_FORMATS
from kho_agent.abi.vmalloc import VmallocDesc

pytestmark = pytest.mark.skipif(
    shutil.which("dtc") is None or shutil.which("fdtget") is None,
    reason="dtc/fdtget not installed (Debian package device-tree-compiler)")

# (name, [(property, value)], [children]) with the root's name left out: the format both sides are
# reduced to before comparing.
Tree = tuple[str, list[tuple[str, bytes]], list["Tree"]]


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


def our_tree(node: FdtNode, name: str = "") -> Tree:
    return (name, list(node.props), [our_tree(c, c.name) for c in node.children])


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


def names(tree: Tree) -> list[str]:
    return [child[0] for child in tree[2]]


def prop(tree: Tree, name: str) -> bytes:
    return dict(tree[1])[name]


# ----------------------------------------------------------------------------- our encoders


SUBTREES: list[tuple[str, int, int | None]] = [
    ("memblock", 0x2C3F000, 218), ("LUO", 0x2C3D000, 32), ("kho_test", 0x267C000, 240),
    ("kexec-metadata", 0x2656000, 73)]


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
    state = memblock.MemblockState("memblock-v1", [
        memblock.ReserveMemRegion("kho_demo_rsv", "reserve-mem-v1", 0x7C300000, 0x100000),
        memblock.ReserveMemRegion("second", "reserve-mem-v1", 0x1000, 0x2000)])
    tree = crosscheck(memblock.encode(state))
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
    state = LuoState("luo-v1", 3, 0, 0, True,
                     [LuoSession("a", 0, 0, [LuoFile(0, "memfd-v1", 7, 0x1000)]),
                      LuoSession("b", 0, 0, [])],
                     [LuoFlb("liveupdate-test-flb-v0", 0xFEED, 9)])
    tree = crosscheck(luo_v1.encode(state, mem, alloc))
    assert names(tree) == ["luo-session", "luo-flb"]
    assert prop(tree, "liveupdate-number") == struct.pack("<Q", 3)
    assert prop(tree[2][0], "luo-session-header") == struct.pack("<Q", state.sessions_phys)


# ----------------------------------------------------------------------------- random trees

NODE_NAME = st.from_regex(r"[a-z][a-z0-9_-]{0,10}(@[0-9a-f]{1,4})?", fullmatch=True)
# dtc checks some well-known property names (phandle, #*-cells, reg, ...) as errors; stay clear of
# them, but include names whose tails are shared in the string table ("size" in "blob-size").
PROP_NAME = st.one_of(st.from_regex(r"x[a-z0-9_,.+-]{0,12}", fullmatch=True),
                      st.sampled_from(["compatible", "size", "blob-size", "start",
                                       "preserved-data", "data"]))


@st.composite
def fdt_trees(draw: st.DrawFn, depth: int = 0) -> Tree:
    props = draw(st.lists(st.tuples(PROP_NAME, st.binary(max_size=24)), max_size=5,
                          unique_by=lambda p: p[0]))
    children: list[Tree] = []
    if depth < 4:
        # Unique by the name before '@': libfdt resolves the path "/a" to the first of "a@0" and
        # "a", so fdtget could not address both (a path-lookup rule, not a parsing difference).
        children = draw(st.lists(fdt_trees(depth + 1), max_size=3,
                                 unique_by=lambda c: c[0].split("@")[0]))
    name = draw(NODE_NAME) if depth else ""
    return (name, props, children)


def _write(w: FdtWriter, tree: Tree) -> None:
    w.begin_node(tree[0])
    for name, value in tree[1]:
        w.property(name, value)
    for child in tree[2]:
        _write(w, child)
    w.end_node()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fdt_trees())
def test_fdt_writer_random_trees(tree: Tree) -> None:
    w = FdtWriter()
    _write(w, tree)
    assert crosscheck(w.finish()) == tree


# ----------------------------------------------------------------------------- real samples


def _sample_fdts(samples: Path) -> list[Path]:
    found = [samples / case / "fdt" for case in ("case-out-1", "case-in-1")]
    found += [samples / case / "sub_fdts" / name for case in ("case-out-1", "case-in-1")
              for name in ("memblock", "kho_test")]
    found += sorted((samples / "fdt").glob("*.dtb"))
    found += [p for p in sorted((samples / "fdt").glob("*.bin"))
              if p.read_bytes()[:4] == b"\xd0\x0d\xfe\xed" and "truncated" not in p.name]
    return found


def test_real_sample_fdts(samples_dir: Path) -> None:
    blobs = _sample_fdts(samples_dir)
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
