"""The format registry: one record per version, listed once, and the facts the decoder, the
simulator, preflight and the errno advice used to keep in tables of their own."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
from pathlib import Path

import pytest

from kho_agent.abi import formats, registry
from kho_agent.abi.formats.records import (
    KhoRootVersion,
    LuoVersion,
    MemfdVersion,
    SubtreeVersion,
)
from kho_agent.abi.luo_common import FILE_SER, FLB_HEADER, FLB_SER, SESSION_SER

RECORD_TYPES = (KhoRootVersion, LuoVersion, MemfdVersion, SubtreeVersion)
SIM = Path(__file__).parent.parent / "kho_agent" / "sim"


def test_one_record_per_family_and_compatible() -> None:
    keys = [(f.family, f.compatible) for f in registry.FORMATS]
    assert len(keys) == len(set(keys))
    assert {f.family for f in registry.FORMATS} >= {
        "kho", "luo", "memfd", "memblock", "kexec-metadata", "kho-test"}


def test_every_record_in_formats_is_registered() -> None:
    """A version module whose record is missing from registry.FORMATS would be decoded by no one;
    the package itself imports none of them (no registration by import)."""
    listed = {id(f) for f in registry.FORMATS}
    modules = [m.name for m in pkgutil.iter_modules(formats.__path__) if m.name != "records"]
    assert len(modules) == len(registry.FORMATS)
    for name in modules:
        module = importlib.import_module(f"{formats.__name__}.{name}")
        records = [v for v in vars(module).values() if isinstance(v, RECORD_TYPES)]
        assert len(records) == 1, name
        assert id(records[0]) in listed, name
    tree = ast.parse(Path(formats.__file__).read_text())
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom)]


# docs/kernel-abi.md §0: the KHO root versions whose kernels wrote each LUO and memfd version
SHIPPED = {"luo-v1": {"kho-v1", "kho-v2", "kho-v3"}, "luo-v5": {"kho-v4"},
           "memfd-v1": {"kho-v1", "kho-v2"}, "memfd-v2": {"kho-v2", "kho-v3", "kho-v4"}}


def test_shipped_with_is_the_table_of_kernel_releases() -> None:
    for compatible, roots in SHIPPED.items():
        record = registry.luo(compatible) or registry.memfd(compatible)
        assert record is not None and record.shipped_with_kho == roots
    for root in ("kho-v1", "kho-v2", "kho-v3", "kho-v4"):
        luos, memfds = registry.shipped_with(root)
        assert {v for v, roots in SHIPPED.items() if root in roots} <= luos | memfds
    assert registry.shipped_with("kho-v3")[1] == {"memfd-v2"}
    # the simulator widens it by one pair, kho-v3 with memfd-v1
    assert registry.simulated_with("kho-v3") == (registry.shipped_with("kho-v3")[0],
                                                 frozenset({"memfd-v1", "memfd-v2"}))
    for f in registry.MEMFD_FORMATS:
        assert not f.simulated_with_kho & f.shipped_with_kho


def test_root_records() -> None:
    table = {f.compatible: (f.subtree_prop, f.size_prop, f.size_required, f.memmap,
                            f.memmap_at_finalize, f.radix_plus_one, f.writes_kexec_metadata,
                            f.debugfs_fdt_truncated) for f in registry.KHO_ROOTS}
    assert {k: table[k] for k in ("kho-v1", "kho-v2", "kho-v3", "kho-v4")} == {
        "kho-v1": ("fdt", None, False, "chunks", True, False, False, False),
        "kho-v2": ("preserved-data", "blob-size", False, "radix-v2-early", False, False, True,
                   False),
        "kho-v3": ("preserved-data", "blob-size", True, "radix", False, True, True, False),
        "kho-v4": ("preserved-data", "blob-size", True, "radix", False, True, True, True),
    }
    assert {"chunks", "chunks-512", "chunks-page", "radix", "radix-v2-early"} <= set(
        registry.MEMMAP_FORMATS)


def test_luo_records() -> None:
    v1, v5 = registry.LUO_BY_COMPATIBLE["luo-v1"], registry.LUO_BY_COMPATIBLE["luo-v5"]
    assert (v1.limits.sessions, v1.limits.files_per_session, v1.limits.errno_name) == (
        819, 128, "ENOMEM/ENOSPC")
    assert (v5.limits.sessions, v5.limits.files_per_session, v5.limits.errno_name) == (
        510_000, 630_000, "ENOSPC")
    assert (v1.blob_is_fdt, v1.sessions_in_blocks, v5.blob_is_fdt, v5.sessions_in_blocks) == (
        True, False, False, True)
    assert v1.image_strings == ("luo-session-v2", "luo-flb-v1") and v5.image_strings == ()


def test_struct_layouts_have_the_kernel_sizes() -> None:
    from kho_agent.abi.formats import kexec_metadata_v1, luo_v5
    assert (SESSION_SER.size, FILE_SER.size, FLB_HEADER.size, FLB_SER.size) == (80, 64, 16, 64)
    assert luo_v5.SER.size == 32 and kexec_metadata_v1.SER.size == 73
    memfds = {f.compatible: (f.layout.ser.size, f.has_seals) for f in registry.MEMFD_FORMATS}
    assert (memfds["memfd-v1"], memfds["memfd-v2"]) == ((40, False), (48, True))


def test_lookups() -> None:
    assert registry.find("luo", "luo-v5") is registry.LUO_BY_COMPATIBLE["luo-v5"]
    assert registry.find("kho", "luo-v5") is None
    assert registry.by_compatible("memblock-v1") is not None
    assert registry.by_compatible("v1") is None  # kexec-metadata's version is a number
    assert registry.versions("kho")[:4] == ("kho-v1", "kho-v2", "kho-v3", "kho-v4")
    assert set(registry.FILE_HANDLERS) == set(registry.versions("memfd")) >= {"memfd-v1",
                                                                            "memfd-v2"}


def test_limits_in_preflight_and_in_the_errno_advice_come_from_the_records() -> None:
    import errno

    from kho_agent.engine import preflight
    from kho_agent.kernel import liveupdate as lu
    assert {f.compatible: f.limits for f in registry.LUO_FORMATS} == preflight.LUO_LIMITS
    create = lu.luo_advice("CREATE_SESSION", errno.ENOSPC)
    preserve = lu.luo_advice("PRESERVE_FD", errno.ENOSPC, name="s")
    for f in registry.LUO_FORMATS:
        if f.limits.sessions_errno == "ENOSPC":
            assert f"{f.compatible}: {f.limits.sessions_why}, {f.limits.sessions:,}" in create
        if f.limits.files_errno == "ENOSPC":
            assert f"{f.compatible}: {f.limits.files_why}, {f.limits.files_per_session:,}" \
                in preserve
    assert "510,000 sessions" in create and "630,000 files" in preserve


@pytest.mark.parametrize("path", sorted(SIM.glob("*.py")), ids=lambda p: p.name)
def test_the_simulator_names_no_version(path: Path) -> None:
    """The simulator asks the records (sim/versions.py), never compares version strings."""
    assert re.findall(r"[\"'][a-z-]+-v\d+[\"']", path.read_text()) == []
