"""Composite compatible strings ("kho-v4;radix-v1", "luo-v5;block-v1"; docs/kernel-abi.md §2.7):
the pure parser, and what the decoder reports, per component, for root FDTs and LUO blobs holding
one."""

from __future__ import annotations

import struct

import pytest

from kho_agent.abi import KhoInput, Side, decode_state
from kho_agent.abi import luo as luo_subtree
from kho_agent.abi.composite import Component, Problem, is_composite, parse
from kho_agent.abi.context import DecodeContext
from kho_agent.abi.fdt import FdtWriter
from kho_agent.abi.findings import CODES, Severity
from kho_agent.abi.kho_root import MEMMAP_PROP


def problems(text: str) -> list[tuple[str, Problem | None]]:
    return [(c.text, c.problem) for c in parse(text).components]


# --- the grammar ------------------------------------------------------------------------------

def test_base_and_sorted_sub_components() -> None:
    parsed = parse("kho-v4;radix-v1;vmalloc-v1")
    assert parsed.base == Component("kho-v4", 0)
    assert parsed.components == (Component("kho-v4", 0), Component("radix-v1", 1),
                                 Component("vmalloc-v1", 2))
    assert parsed.well_formed


def test_the_base_is_not_part_of_the_order() -> None:
    # "luo-v5" sorts after "block-v1", but only the sub-components must be in order
    assert problems("luo-v5;block-v1") == [("luo-v5", None), ("block-v1", None)]


def test_unsorted_sub_components() -> None:
    assert problems("kho-v4;vmalloc-v1;radix-v1") == [
        ("kho-v4", None), ("vmalloc-v1", None), ("radix-v1", Problem.UNSORTED)]
    # strcmp order: upper case before lower case, "-v10" before "-v2"
    assert problems("kho-v4;a-v2;a-v10")[2] == ("a-v10", Problem.UNSORTED)
    assert parse("kho-v4;B-v1;a-v1").well_formed


def test_duplicate_and_empty_components() -> None:
    assert problems("kho-v4;radix-v1;radix-v1") == [
        ("kho-v4", None), ("radix-v1", None), ("radix-v1", Problem.DUPLICATE)]
    assert problems("luo-v5;luo-v5")[1] == ("luo-v5", Problem.DUPLICATE)
    assert problems("kho-v4;;radix-v1") == [
        ("kho-v4", None), ("", Problem.EMPTY), ("radix-v1", None)]
    assert problems(";radix-v1") == [("", Problem.EMPTY), ("radix-v1", None)]
    assert problems("kho-v4;") == [("kho-v4", None), ("", Problem.EMPTY)]


def test_an_out_of_order_component_does_not_move_the_order() -> None:
    # the order continues from the last well-placed sub-component: d is after c
    assert problems("x;c;a;d") == [("x", None), ("c", None), ("a", Problem.UNSORTED),
                                   ("d", None)]


def test_plain_strings_are_not_composite() -> None:
    assert not is_composite("kho-v4") and is_composite("kho-v4;radix-v1")
    assert parse("kho-v4").components == (Component("kho-v4", 0),)


# --- on bytes: what the decoder reports ------------------------------------------------------

def root_with(compatible: str) -> bytes:
    w = FdtWriter().begin_node("").property_string("compatible", compatible)
    return w.property(MEMMAP_PROP, struct.pack("<Q", 0x1000)).end_node().finish()


def decode_root_findings(compatible: str) -> list[tuple[str, Severity, str, str]]:
    state = decode_state(KhoInput(root_fdt=root_with(compatible)))
    assert state.compatible == compatible and state.memmap is None
    return [(f.code, f.severity, f.path, f.message) for f in state.findings]


def test_root_with_a_known_base_and_an_unknown_sub_component() -> None:
    found = decode_root_findings("kho-v4;radix-v1")
    assert [(c, s, p) for c, s, p, _ in found] == [
        ("compatible-component-known", Severity.INFO, "/"),
        ("compatible-component-unknown", Severity.ERROR, "/")]
    known, unknown = (m for _, _, _, m in found)
    assert "'kho-v4'" in known and "kho format of 7.2 .. 7.3" in known
    assert "sub-component 1 'radix-v1' is unknown" in unknown
    assert "disables KHO revival" in unknown
    assert all(code != "compatible-unknown" for code, *_ in found)


def test_root_with_every_grammar_problem() -> None:
    found = decode_root_findings("kho-v9;vmalloc-v1;radix-v1;radix-v1;")
    assert [c for c, *_ in found] == [
        "compatible-component-unknown",     # kho-v9, the base
        "compatible-component-unknown",     # vmalloc-v1
        "compatible-component-unsorted",    # radix-v1 after vmalloc-v1
        "compatible-component-duplicate",   # radix-v1 again
        "compatible-component-empty"]       # the trailing separator
    assert all(code in CODES for code, *_ in found)


def test_root_whose_components_are_all_known_is_one_unknown_combination() -> None:
    found = decode_root_findings("kho-v4;luo-v5")
    assert [c for c, *_ in found] == ["compatible-component-known", "compatible-component-known",
                                      "compatible-unknown"]
    assert "not this combination" in found[-1][3]


def test_plain_unknown_root_keeps_its_single_finding() -> None:
    found = decode_root_findings("kho-v9")
    assert [c for c, *_ in found] == ["compatible-unknown"]


def luo_blob(compatible: str) -> bytes:
    """A luo_ser whose compatible field is sized from its string, as LUO_ABI_COMPAT_LEN is."""
    field = -(-(len(compatible) + 1) // 8) * 8
    return compatible.encode().ljust(field, b"\0") + struct.pack("<QQQ", 3, 0, 0)


@pytest.mark.parametrize("side", list(Side))
def test_luo_blob_with_a_composite_compatible(side: Side) -> None:
    ctx = DecodeContext(None, side)
    assert luo_subtree.decode(luo_blob("luo-v5;block-v1"), ctx, "/LUO") is None
    assert [(f.code, f.path) for f in ctx.findings] == [
        ("compatible-component-known", "/LUO"), ("compatible-component-unknown", "/LUO")]
    assert "'block-v1' is unknown" in ctx.findings[1].message
    assert "panics at boot" in ctx.findings[1].message


def test_luo_blob_with_an_unsorted_composite() -> None:
    ctx = DecodeContext(None)
    luo_subtree.decode(luo_blob("luo-v5;flb-v1;block-v1"), ctx, "/LUO")
    assert [f.code for f in ctx.findings] == [
        "compatible-component-known", "compatible-component-unknown",
        "compatible-component-unsorted"]


def test_plain_unknown_luo_keeps_its_single_finding() -> None:
    ctx = DecodeContext(None)
    luo_subtree.decode(luo_blob("luo-v9"), ctx, "/LUO")
    assert [f.code for f in ctx.findings] == ["compatible-unknown"]
    assert "known: luo-v1, luo-v5" in ctx.findings[0].message
