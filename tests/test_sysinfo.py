"""kho_agent.kernel.sysinfo: host facts on a fake root and on this machine's real root."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from kho_agent.errors import AgentError, NotFound
from kho_agent.kernel.params import cmdline_bool, param_values, parse_cmdline
from kho_agent.kernel.sysinfo import (
    MemblockRegion,
    SysInfo,
    kho_enabled,
    luo_enabled,
    parse_memblock,
    parse_node_list,
    read_sysinfo,
)

BOOT_ID = "6f8515e3-2fdc-4179-8329-a9789f3f2fe4"

# Lines in the exact layout of memblock_debug_show(): "%4d: %pa..%pa %4d %s\n" (nid printed as
# "%4c" 'x' when the region has no valid node).
MEMBLOCK_TEXT = (
    "   0: 0x0000000000000000..0x0000000000000fff    0 NONE\n"
    "   1: 0x0000000001000000..0x00000000027fffff    0 RSV_KERN\n"
    "   2: 0x000000007ffd5f80..0x000000007ffd9fff    x RSV_KERN\n"
    "   3: 0x0000000100000000..0x00000001000fffff    1 RSV_NIT\n"
    "   4: 0x0000000100100000..0x00000001001fffff    1 UNKNOWN\n"
)


def put(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def minimal_root(root: Path, cmdline: str = "console=ttyS0") -> Path:
    put(root, "proc/sys/kernel/osrelease", "7.3.0-rc7-kho\n")
    put(root, "proc/cmdline", cmdline + "\n")
    put(root, "proc/sys/kernel/random/boot_id", BOOT_ID + "\n")
    put(root, "proc/meminfo", "MemTotal:        2040308 kB\nMemFree:         1900000 kB\n"
                              "MemAvailable:    1950000 kB\n")
    return root


def full_root(root: Path) -> Path:
    minimal_root(root, 'console=ttyS0 kho=on foo="a b" liveupdate=1 kho_scratch=16M,512M,256M '
                       "quiet -- init_arg=1")
    put(root, "proc/meminfo",
        "MemTotal:       16384000 kB\nMemFree:        10000000 kB\nMemAvailable:   12000000 kB\n"
        "HugePages_Total:       4\nHugepagesize:       2048 kB\nHugetlb:         1056768 kB\n"
        "CmaTotal:         327680 kB\n")
    put(root, "proc/sys/kernel/arch", "aarch64\n")
    put(root, "proc/self/smaps", "00400000-00452000 r-xp 00000000 08:02 173521 /bin/x\n"
                                 "Size:                328 kB\nKernelPageSize:       16 kB\n")
    put(root, "proc/1/comm", "systemd\n")
    put(root, "sys/devices/system/node/has_memory", "0,2\n")
    put(root, "sys/devices/system/node/node0/meminfo",
        "Node 0 MemTotal:        8192000 kB\nNode 0 MemFree:         5000000 kB\n")
    put(root, "sys/devices/system/node/node2/meminfo",
        "Node 2 MemTotal:        8192000 kB\nNode 2 MemFree:         5000000 kB\n")
    put(root, "sys/devices/system/node/node2/hugepages/hugepages-2048kB/nr_hugepages", "4\n")
    put(root, "sys/devices/system/node/node2/hugepages/hugepages-1048576kB/nr_hugepages", "1\n")
    put(root, "sys/kernel/debug/memblock/reserved", MEMBLOCK_TEXT)
    put(root, "etc/default/kexec", "# Defaults for kexec initscript\nLOAD_KEXEC=true\n")
    put(root, "sys/kernel/security/lockdown", "none [integrity] confidentiality\n")
    return root


def test_full_fake_root(tmp_path: Path) -> None:
    info = read_sysinfo(full_root(tmp_path))
    assert info.release == "7.3.0-rc7-kho"
    assert info.boot_id == BOOT_ID
    assert info.params["foo"] == "a b"          # quotes group the space and are dropped
    assert info.params["kho_scratch"] == "16M,512M,256M"
    assert info.params["quiet"] is None
    assert "init_arg" not in info.params        # after "--" the words belong to init
    assert info.machine == "aarch64"             # proc/sys/kernel/arch wins over uname
    assert info.page_size == 16 * 1024          # KernelPageSize from the root's smaps
    assert info.mem_total == 16384000 * 1024
    assert info.mem_available == 12000000 * 1024
    assert info.hugepages_total == 1056768 * 1024   # Hugetlb: covers every page size
    assert info.cma_total == 327680 * 1024
    # node 2 holds 4 x 2 MiB + 1 x 1 GiB of HugeTLB pages
    assert [(n.nid, n.mem_total, n.hugetlb) for n in info.nodes] == [
        (0, 8192000 * 1024, 0), (2, 8192000 * 1024, 4 * 2 * 1024 * 1024 + (1 << 30))]
    assert info.memblock_reserved is not None and len(info.memblock_reserved) == 5
    assert info.pid1 == "systemd"
    assert info.systemd_version is None         # not the real root: systemctl is not asked
    assert info.load_kexec_at_shutdown is True
    assert info.lockdown == "integrity"
    assert kho_enabled(info) and luo_enabled(info)
    assert info.warnings == []


def test_optional_files_missing(tmp_path: Path) -> None:
    info = read_sysinfo(minimal_root(tmp_path))
    assert info.nodes == []
    assert info.memblock_reserved is None
    assert info.pid1 is None and info.systemd_version is None
    assert info.load_kexec_at_shutdown is None
    assert info.lockdown is None
    assert info.cma_total is None
    assert info.hugepages_total == 0
    assert info.machine == os.uname().machine
    assert not kho_enabled(info) and not luo_enabled(info)


@pytest.mark.parametrize("rel", ["proc/sys/kernel/osrelease", "proc/cmdline", "proc/meminfo",
                                 "proc/sys/kernel/random/boot_id"])
def test_mandatory_file_missing(tmp_path: Path, rel: str) -> None:
    minimal_root(tmp_path)
    (tmp_path / rel).unlink()
    with pytest.raises(NotFound) as err:
        read_sysinfo(tmp_path)
    assert str(tmp_path / rel) in err.value.message
    assert err.value.exit_code == NotFound.exit_code


def test_meminfo_without_memtotal(tmp_path: Path) -> None:
    minimal_root(tmp_path)
    put(tmp_path, "proc/meminfo", "MemFree: 1 kB\n")
    with pytest.raises(AgentError, match="no MemTotal"):
        read_sysinfo(tmp_path)


def test_hugetlb_fallback_without_hugetlb_line(tmp_path: Path) -> None:
    minimal_root(tmp_path)
    put(tmp_path, "proc/meminfo", "MemTotal: 1000 kB\nHugePages_Total:  3\n"
                                  "Hugepagesize:    2048 kB\n")
    assert read_sysinfo(tmp_path).hugepages_total == 3 * 2048 * 1024


# --- command line -------------------------------------------------------------------------------

@pytest.mark.parametrize("cmdline, expected", [
    # kernel/params.c next_arg(): quotes group, a quote after '=' and the last quote are dropped
    ('a="b c" d', {"a": "b c", "d": None}),
    ('"a=b c" d=e', {"a": "b c", "d": "e"}),
    ('"flag"', {"flag": None}),
    ("x=1 x=2", {"x": "2"}),                       # the last value wins
    ("kho-scratch=1%", {"kho_scratch": "1%"}),     # parameq(): dashes equal underscores
    ("a=b=c", {"a": "b=c"}),                       # only the first '=' splits
    ("  a   b=  ", {"a": None, "b": ""}),
    ("a -- b=1", {"a": None}),                     # "--" ends the kernel's parameters
    ("", {}),
])
def test_parse_cmdline(cmdline: str, expected: dict[str, str | None]) -> None:
    assert parse_cmdline(cmdline) == expected


def test_param_values_keeps_every_occurrence() -> None:
    cmdline = "crashkernel=512M,high crashkernel=256M,low x=1 -- crashkernel=9G"
    assert param_values(cmdline, "crashkernel") == ["512M,high", "256M,low"]


@pytest.mark.parametrize("value, expected", [
    # kstrtobool(): the first character decides (1 y Y t T e E / 0 n N f F d D) ...
    ("1", True), ("y", True), ("Yes", True), ("true", True), ("enable", True), ("E", True),
    ("0", False), ("n", False), ("no", False), ("False", False), ("disable", False),
    # ... or the first two for on/off
    ("on", True), ("ON", True), ("oN", True), ("off", False), ("OFF", False),
    # anything else is "Malformed early option" and the default stays
    ("o", None), ("ox", None), ("x", None), ("2", None), ("", None), (None, None),
])
def test_cmdline_bool(value: str | None, expected: bool | None) -> None:
    params: dict[str, str | None] = {"kho": value}
    for default in (False, True):
        want = default if expected is None else expected
        assert cmdline_bool(params, "kho", default) is want
    assert cmdline_bool({}, "kho", True) is True


def test_kho_enabled_follows_kho_param(tmp_path: Path) -> None:
    info = read_sysinfo(minimal_root(tmp_path, "kho=on liveupdate=off"))
    assert kho_enabled(info) and not luo_enabled(info)
    info = read_sysinfo(minimal_root(tmp_path, "kho liveupdate=y"))  # bare "kho" is rejected
    assert not kho_enabled(info) and luo_enabled(info)


# --- memblock -----------------------------------------------------------------------------------

def test_parse_memblock_kernel_format() -> None:
    regions = parse_memblock(MEMBLOCK_TEXT)
    assert regions == [
        MemblockRegion(0, 0x1000, 0, ()),
        MemblockRegion(0x1000000, 0x1800000, 0, ("RSV_KERN",)),
        MemblockRegion(0x7FFD5F80, 0x4080, None, ("RSV_KERN",)),
        MemblockRegion(0x100000000, 0x100000, 1, ("RSV_NIT",)),
        MemblockRegion(0x100100000, 0x100000, 1, ("UNKNOWN",)),
    ]


def test_parse_memblock_skips_the_empty_dummy_region() -> None:
    # An empty array keeps one zero-sized region; base + size - 1 wraps to all ones.
    assert parse_memblock("   0: 0x0000000000000000..0xffffffffffffffff    x NONE\n") == []


def test_parse_memblock_old_format_means_unknown() -> None:
    # Before 6.4 the file had neither node nor flags: no RSRV_KERN information at all.
    assert parse_memblock("   0: 0x0000000000000000..0x0000000000000fff\n") is None


@pytest.mark.parametrize("line", [
    "   0: 0x1000-0x1fff    0 NONE",
    "   0: 0x0000000000002000..0x0000000000001000    0 NONE",
    "garbage",
])
def test_parse_memblock_malformed_names_the_line(line: str) -> None:
    text = "   0: 0x0000000000000000..0x0000000000000fff    0 NONE\n" + line + "\n"
    with pytest.raises(AgentError, match="line 2"):
        parse_memblock(text, "reserved")


def test_malformed_memblock_file_fails_read_sysinfo(tmp_path: Path) -> None:
    minimal_root(tmp_path)
    put(tmp_path, "sys/kernel/debug/memblock/reserved", "   0: what is this\n")
    with pytest.raises(AgentError, match="line 1"):
        read_sysinfo(tmp_path)


@pytest.mark.parametrize("text, nodes", [("0\n", [0]), ("0-2,5\n", [0, 1, 2, 5]), ("\n", [])])
def test_parse_node_list(text: str, nodes: list[int]) -> None:
    assert parse_node_list(text) == nodes


def test_bad_node_list_is_a_warning(tmp_path: Path) -> None:
    minimal_root(tmp_path)
    put(tmp_path, "sys/devices/system/node/has_memory", "zero\n")
    info = read_sysinfo(tmp_path)
    assert info.nodes == [] and "has_memory" in info.warnings[0]


# --- /etc/default/kexec -------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("LOAD_KEXEC=true\n", True),
    ('LOAD_KEXEC="true"\n', True),
    ("LOAD_KEXEC=false\n", False),
    ("LOAD_KEXEC=true\nLOAD_KEXEC=false\n", False),   # sourced by sh: the last one counts
    ("# LOAD_KEXEC=true\n", False),                    # unset: the init script does nothing
    ("LOAD_KEXEC=True\n", False),                      # the script compares with xtrue exactly
])
def test_load_kexec(tmp_path: Path, text: str, expected: bool) -> None:
    minimal_root(tmp_path)
    put(tmp_path, "etc/default/kexec", text)
    assert read_sysinfo(tmp_path).load_kexec_at_shutdown is expected


# --- the real machine ---------------------------------------------------------------------------

def test_real_root() -> None:
    info = read_sysinfo(Path("/"))
    assert isinstance(info, SysInfo)
    assert info.release == os.uname().release
    assert info.page_size == os.sysconf("SC_PAGE_SIZE") == 4096
    assert info.mem_total > 0 and 0 < info.mem_available <= info.mem_total
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
                        info.boot_id)
    assert info.cmdline == Path("/proc/cmdline").read_text().strip()
    assert info.machine == Path("/proc/sys/kernel/arch").read_text().strip() \
        if Path("/proc/sys/kernel/arch").exists() else os.uname().machine
    if Path("/sys/devices/system/node/has_memory").exists():
        assert info.nodes and all(n.mem_total > 0 for n in info.nodes)
