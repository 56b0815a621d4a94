"""What the two independent FDT checks share (test_dtc_crosscheck.py: dtc and libfdt;
test_fdt_oracle.py: the `fdt` package): the tree both sides are reduced to, the FDTs we encode
for them, random trees for FdtWriter, and the captured sample FDTs. Each check keeps its own
reader and its own assertions."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from hypothesis import strategies as st

from kho_agent.abi.fdt import FdtNode, FdtWriter
from kho_agent.abi.formats import memblock_v1 as memblock
from kho_agent.abi.luo_common import LuoFile, LuoFlb, LuoSession, LuoState

# (name, [(property, raw value)], [children]), the root's name left out: every parser's tree is
# reduced to this before the trees are compared.
Tree = tuple[str, list[tuple[str, bytes]], list["Tree"]]


def our_tree(node: FdtNode, name: str = "") -> Tree:
    return (name, list(node.props), [our_tree(c, c.name) for c in node.children])


def prop(tree: Tree, name: str) -> bytes:
    return dict(tree[1])[name]


def names(tree: Tree) -> list[str]:
    return [child[0] for child in tree[2]]


# --- what we encode ------------------------------------------------------------------------------

# (name, phys, blob-size) of a 7.3 root's subtrees
SUBTREES: list[tuple[str, int, int | None]] = [
    ("memblock", 0x2C3F000, 218), ("LUO", 0x2C3D000, 32), ("kho_test", 0x267C000, 240),
    ("kexec-metadata", 0x2656000, 73)]


def memblock_state() -> memblock.MemblockState:
    return memblock.MemblockState("memblock-v1", [
        memblock.ReserveMemRegion("kho_demo_rsv", "reserve-mem-v1", 0x7C300000, 0x100000),
        memblock.ReserveMemRegion("second", "reserve-mem-v1", 0x1000, 0x2000)])


def luo_v1_state() -> LuoState:
    return LuoState("luo-v1", 3, 0, 0, True,
                    [LuoSession("a", 0, 0, [LuoFile(0, "memfd-v1", 7, 0x1000)]),
                     LuoSession("b", 0, 0, [])],
                    [LuoFlb("liveupdate-test-flb-v0", 0xFEED, 9)])


# --- any tree FdtWriter can write ----------------------------------------------------------------

NODE_NAME = st.from_regex(r"[a-z][a-z0-9_-]{0,10}(@[0-9a-f]{1,4})?", fullmatch=True)
# dtc checks some well-known property names (phandle, #*-cells, reg, ...) as errors: stay clear
# of them, but include names whose tails are shared in the string table ("size" in "blob-size").
PROP_NAME = st.one_of(st.from_regex(r"x[a-z0-9_,.+-]{0,12}", fullmatch=True),
                      st.sampled_from(["compatible", "size", "blob-size", "start",
                                       "preserved-data", "data"]))


def fdt_trees(values: st.SearchStrategy[bytes],
              child_key: Callable[[Tree], str] = lambda c: c[0]) -> st.SearchStrategy[Tree]:
    """Trees four levels deep with property values from `values`; siblings are unique by
    `child_key` (a checker whose path lookup cannot tell two names apart narrows it)."""
    @st.composite
    def trees(draw: st.DrawFn, depth: int = 0) -> Tree:
        props = draw(st.lists(st.tuples(PROP_NAME, values), max_size=5,
                              unique_by=lambda p: p[0]))
        children: list[Tree] = []
        if depth < 4:
            children = draw(st.lists(trees(depth + 1), max_size=3, unique_by=child_key))
        name = draw(NODE_NAME) if depth else ""
        return (name, props, children)
    return trees()


def write_tree(tree: Tree) -> bytes:
    w = FdtWriter()

    def node(t: Tree) -> None:
        w.begin_node(t[0])
        for name, value in t[1]:
            w.property(name, value)
        for child in t[2]:
            node(child)
        w.end_node()
    node(tree)
    return w.finish()


# --- the captured samples ------------------------------------------------------------------------

def sample_fdts(samples: Path) -> list[Path]:
    """Every complete FDT among the samples: the root and FDT subtrees of both cases, and the
    .dtb/.bin captures (not the cut-short debugfs one)."""
    found = [samples / case / "fdt" for case in ("case-out-1", "case-in-1")]
    found += [samples / case / "sub_fdts" / name for case in ("case-out-1", "case-in-1")
              for name in ("memblock", "kho_test")]
    found += sorted((samples / "fdt").glob("*.dtb"))
    found += [p for p in sorted((samples / "fdt").glob("*.bin"))
              if p.read_bytes()[:4] == b"\xd0\x0d\xfe\xed" and "truncated" not in p.name]
    return found
