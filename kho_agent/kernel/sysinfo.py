"""Host facts read from files under a root: release, command line, memory, NUMA, memblock, PID 1.

Everything hangs off `root` (the real `/`, a simulator's directory, or a test's fake tree). The only
other I/O is `os.uname()`, `os.sysconf()` and, on the real root with systemd as PID 1,
`systemctl --version`.

Mandatory files (a Linux /proc always has them): proc/sys/kernel/osrelease, proc/cmdline,
proc/meminfo, proc/sys/kernel/random/boot_id. Their absence raises NotFound. Everything else is
optional (containers and minimal kernels lack sysfs nodes, debugfs, security fs) and comes back as
None or [].

The memblock debugfs format (mm/memblock.c `memblock_debug_show()`, 6.4 and later):

    "%4d: %pa..%pa %4d %s\\n"  index, base, end (inclusive), node id ('x' when the region has
                               no valid node: "%4c"), and the name of the *lowest* set flag only
                               (NONE when no flag is set, UNKNOWN when no set bit has a name)

`%pa` prints a phys_addr_t as 0x plus zero-padded hex. Flag names, bit 0 upwards: HOTPLUG, MIRROR,
NOMAP, DRV_MNG, RSV_NIT, RSV_KERN, KHO_SCRATCH (7.3 adds MEMBLOCK_RSRV_HUGETLB = 0x80 without a
name). Because only the lowest flag is printed, a region flagged RSRV_NOINIT|RSRV_KERN shows as
RSV_NIT, and a boot-time HugeTLB region (RSRV_KERN|RSRV_HUGETLB) shows as RSV_KERN. Kernels before
6.4 print only "%4d: %pa..%pa"; they predate KHO and give no flags, so that form is read as "no
memblock information" (None).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import AgentError, NotFound, PermissionDenied, errno_text
from .params import cmdline_bool, parse_cmdline

MEMBLOCK_RESERVED = "sys/kernel/debug/memblock/reserved"
NODE_DIR = "sys/devices/system/node"
SYSTEMCTL_TIMEOUT = 10.0  # seconds; systemctl --version does no IPC, this only bounds a hang

_MEMBLOCK_LINE = re.compile(
    r"^\s*(?P<idx>\d+): 0x(?P<base>[0-9a-fA-F]+)\.\.0x(?P<end>[0-9a-fA-F]+)"
    r"\s+(?P<nid>-?\d+|x)\s+(?P<flags>[A-Za-z0-9_?|]+)\s*$")
_MEMBLOCK_OLD_LINE = re.compile(r"^\s*\d+: 0x[0-9a-fA-F]+\.\.0x[0-9a-fA-F]+\s*$")


@dataclass
class NumaNode:
    nid: int
    mem_total: int            # bytes, from <root>/sys/devices/system/node/nodeN/meminfo
    hugetlb: int = 0          # bytes of HugeTLB pages on this node, all page sizes


@dataclass
class MemblockRegion:
    base: int
    size: int
    nid: int | None
    flags: tuple[str, ...]    # as debugfs prints them, e.g. ("RSV_KERN",); () for NONE

    @property
    def end(self) -> int:
        """One past the last byte."""
        return self.base + self.size


@dataclass
class SysInfo:
    release: str              # proc/sys/kernel/osrelease
    cmdline: str              # proc/cmdline, stripped
    params: dict[str, str | None]   # parsed cmdline: quotes honoured, last wins, bare -> None
    boot_id: str              # proc/sys/kernel/random/boot_id
    machine: str              # os.uname().machine unless <root>/proc/sys/kernel/arch exists
    page_size: int
    mem_total: int            # bytes (proc/meminfo)
    mem_available: int
    hugepages_total: int      # bytes of HugeTLB pages, all page sizes (meminfo Hugetlb)
    cma_total: int | None
    nodes: list[NumaNode]     # nodes with memory (sys/devices/system/node/has_memory)
    memblock_reserved: list[MemblockRegion] | None   # sys/kernel/debug/memblock/reserved
    pid1: str | None          # proc/1/comm
    systemd_version: int | None   # only when pid1 is systemd and root is /
    load_kexec_at_shutdown: bool | None  # Debian kexec-tools etc/default/kexec LOAD_KEXEC
    lockdown: str | None      # sys/kernel/security/lockdown: the bracketed mode
    warnings: list[str] = field(default_factory=list)  # optional files present but unusable
    # proc/sys/kernel/version, `uname -v` ("#1 SMP PREEMPT_DYNAMIC Debian 6.1.76-1 (date)"):
    # with the release, which build of the kernel runs (None: not readable)
    version: str | None = None


def kho_enabled(info: SysInfo) -> bool:
    """KHO is on for this boot by kho= (default off; CONFIG_KEXEC_HANDOVER_ENABLE_DEFAULT kernels
    are on without it, which the command line cannot show)."""
    return cmdline_bool(info.params, "kho", False)


def luo_enabled(info: SysInfo) -> bool:
    """LUO is on by liveupdate= (default off). It also needs KHO in the same boot."""
    return cmdline_bool(info.params, "liveupdate", False)


# --- file helpers -------------------------------------------------------------------------------

def _read_mandatory(root: Path, rel: str, what: str) -> str:
    path = root / rel
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError as exc:
        raise NotFound(f"{path} does not exist, so {what} cannot be read; is {root} the root of "
                       "a running Linux system with /proc mounted?") from exc
    except PermissionError as exc:
        raise PermissionDenied(f"{path}: permission denied reading {what}; run as root") from exc
    except OSError as exc:
        raise AgentError(f"cannot read {path} ({what}): {errno_text(exc)}") from exc


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:  # absent, unreadable or not a file: optional facts are simply unknown
        return None


def _kib_fields(text: str, prefix: str = "") -> dict[str, int]:
    """`Name:  123 kB` lines as bytes (values without a unit, like HugePages_Total, as is)."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        if prefix:
            if not line.startswith(prefix):
                continue
            line = line[len(prefix):]
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        parts = rest.split()
        if not parts or not parts[0].isdigit():
            continue
        value = int(parts[0])
        if len(parts) > 1 and parts[1].lower() == "kb":
            value *= 1024
        out[name.strip()] = value
    return out


def parse_node_list(text: str) -> list[int]:
    """A sysfs node list such as `0-1,3` (bitmap_parselist format)."""
    out: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ValueError(f"{text.strip()!r} is not a node list")
        out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    return sorted(set(out))


def _read_nodes(root: Path, warnings: list[str]) -> list[NumaNode]:
    base = root / NODE_DIR
    text = _read_optional(base / "has_memory")
    if text is None:
        return []
    try:
        nids = parse_node_list(text)
    except ValueError as exc:
        warnings.append(f"{base / 'has_memory'}: {exc}; NUMA nodes unknown")
        return []
    nodes = []
    for nid in nids:
        node_dir = base / f"node{nid}"
        meminfo = _read_optional(node_dir / "meminfo")
        fields = _kib_fields(meminfo, f"Node {nid} ") if meminfo else {}
        if "MemTotal" not in fields:
            warnings.append(f"{node_dir / 'meminfo'} is missing or has no MemTotal; node {nid} "
                            "is counted with 0 bytes")
        nodes.append(NumaNode(nid, fields.get("MemTotal", 0), _node_hugetlb(node_dir)))
    return nodes


def _node_hugetlb(node_dir: Path) -> int:
    total = 0
    try:
        entries = sorted((node_dir / "hugepages").iterdir())
    except OSError:  # no hugetlbfs support or no such node directory
        return 0
    for entry in entries:
        m = re.fullmatch(r"hugepages-(\d+)kB", entry.name)
        count = _read_optional(entry / "nr_hugepages")
        if m and count and count.strip().isdigit():
            total += int(m.group(1)) * 1024 * int(count.strip())
    return total


# --- memblock -----------------------------------------------------------------------------------

def parse_memblock(text: str, source: str = "memblock/reserved") -> list[MemblockRegion] | None:
    """Parse a memblock debugfs file; None for the pre-6.4 form that carries no node or flags.

    A line in neither form raises AgentError naming the line: a format this code does not know
    must not be silently counted as "no kernel reservations".
    """
    regions: list[MemblockRegion] = []
    old_form = 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _MEMBLOCK_LINE.match(line)
        if m is None:
            if _MEMBLOCK_OLD_LINE.match(line):
                old_form += 1
                continue
            raise AgentError(f"{source} line {n}: {line.strip()!r} is not in the memblock debugfs "
                             "format 'N: 0xBASE..0xEND NID FLAG'; this kernel prints something "
                             "this agent does not know, so kernel-reserved memory is unknown")
        base, end = int(m["base"], 16), int(m["end"], 16)
        # The kernel prints base + size - 1 in phys_addr_t arithmetic, so the empty dummy region
        # of an empty array (size 0) reads as base..base-1, wrapped at the printed width.
        if (end + 1) % (1 << (4 * len(m["end"]))) == base:
            continue
        if end < base:
            raise AgentError(f"{source} line {n}: {line.strip()!r} ends before it starts")
        nid = None if m["nid"] == "x" or int(m["nid"]) < 0 else int(m["nid"])
        flag = m["flags"]
        flags: tuple[str, ...] = () if flag == "NONE" else tuple(flag.split("|"))
        regions.append(MemblockRegion(base, end - base + 1, nid, flags))
    if old_form and regions:
        raise AgentError(f"{source} mixes the old and the new memblock line formats; the file is "
                         "corrupt")
    if old_form:
        return None
    return regions


def _read_memblock(root: Path, warnings: list[str]) -> list[MemblockRegion] | None:
    path = root / MEMBLOCK_RESERVED
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None  # no debugfs, or CONFIG_ARCH_KEEP_MEMBLOCK off (x86 without TDX host)
    except PermissionError:
        warnings.append(f"{path}: permission denied (debugfs is root-only); kernel-reserved "
                        "memory is estimated instead")
        return None
    except OSError as exc:
        warnings.append(f"cannot read {path}: {errno_text(exc)}; kernel-reserved memory is "
                        "estimated instead")
        return None
    return parse_memblock(text, str(path))


# --- other facts --------------------------------------------------------------------------------

def _page_size(root: Path) -> int:
    """The kernel's page size: the first KernelPageSize in proc/self/smaps under the root (a fake
    root can state it), else this machine's."""
    try:
        with (root / "proc/self/smaps").open(encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("KernelPageSize:"):
                    parts = line.split()
                    if len(parts) >= 2 and parts[1].isdigit():
                        return int(parts[1]) * 1024
    except OSError:  # no smaps under this root: fall back to the local page size
        pass
    return os.sysconf("SC_PAGE_SIZE")


def _lockdown(root: Path) -> str | None:
    text = _read_optional(root / "sys/kernel/security/lockdown")
    if text is None:
        return None
    m = re.search(r"\[([^\]]+)\]", text)
    return m.group(1) if m else None


def _load_kexec(root: Path) -> bool | None:
    """Debian's kexec-load init script loads a kernel at shutdown only when LOAD_KEXEC is exactly
    `true` after sourcing etc/default/kexec (`test "x$LOAD_KEXEC" = xtrue`)."""
    text = _read_optional(root / "etc/default/kexec")
    if text is None:
        return None
    value: str | None = None
    for line in text.splitlines():
        m = re.match(r"""^\s*(?:export\s+)?LOAD_KEXEC=(["']?)([^"'#\s]*)\1\s*(?:#.*)?$""", line)
        if m:
            value = m.group(2)
    return value == "true"


# Where systemd's shared library lives (its name carries the version) on a root that is not
# the running one: upstream's layout and Debian's multiarch one.
SHARED_LIBRARY_GLOBS = ("usr/lib/systemd/libsystemd-shared-*.so",
                        "usr/lib/*/systemd/libsystemd-shared-*.so",
                        "lib/systemd/libsystemd-shared-*.so")


def _systemd_version(root: Path, pid1: str | None) -> int | None:
    if pid1 != "systemd":
        return None
    if root.resolve() != Path("/"):
        # another root (an image, the simulator's): no systemctl to ask, its library tells
        for pattern in SHARED_LIBRARY_GLOBS:
            for lib in sorted(root.glob(pattern)):
                m = re.search(r"libsystemd-shared-(\d+)", lib.name)
                if m:
                    return int(m.group(1))
        return None
    try:
        out = subprocess.run(["systemctl", "--version"], capture_output=True, text=True,
                             timeout=SYSTEMCTL_TIMEOUT, check=True).stdout
    except (OSError, subprocess.SubprocessError):  # not installed, failed or hung: unknown
        return None
    m = re.match(r"systemd (\d+)", out)
    return int(m.group(1)) if m else None


def _machine(root: Path) -> str:
    arch = _read_optional(root / "proc/sys/kernel/arch")
    if arch and arch.strip():
        return arch.strip()
    return os.uname().machine


def read_boot_id(root: Path) -> str:
    """This boot's id alone (proc/sys/kernel/random/boot_id): one file, where read_sysinfo reads
    every fact (and on the running root forks `systemctl --version`)."""
    return _read_mandatory(Path(root), "proc/sys/kernel/random/boot_id", "the boot id").strip()


def read_sysinfo(root: Path) -> SysInfo:
    """Read the host facts under `root` (see the module docstring for what is mandatory)."""
    root = Path(root)
    warnings: list[str] = []
    release = _read_mandatory(root, "proc/sys/kernel/osrelease", "the kernel release").strip()
    cmdline = _read_mandatory(root, "proc/cmdline", "the kernel command line").strip()
    boot_id = read_boot_id(root)
    meminfo_text = _read_mandatory(root, "proc/meminfo", "the memory totals")
    meminfo = _kib_fields(meminfo_text)
    if "MemTotal" not in meminfo:
        raise AgentError(f"{root / 'proc/meminfo'} has no MemTotal line; it is not a Linux "
                         "/proc/meminfo")
    hugetlb = meminfo.get("Hugetlb")
    if hugetlb is None:  # kernels before 4.16 have no Hugetlb line: default page size only
        hugetlb = meminfo.get("HugePages_Total", 0) * meminfo.get("Hugepagesize", 0)
    pid1_text = _read_optional(root / "proc/1/comm")
    pid1 = pid1_text.strip() if pid1_text else None
    return SysInfo(
        release=release,
        cmdline=cmdline,
        params=parse_cmdline(cmdline),
        boot_id=boot_id,
        machine=_machine(root),
        page_size=_page_size(root),
        mem_total=meminfo["MemTotal"],
        mem_available=meminfo.get("MemAvailable", meminfo.get("MemFree", 0)),
        hugepages_total=hugetlb,
        cma_total=meminfo.get("CmaTotal"),
        nodes=_read_nodes(root, warnings),
        memblock_reserved=_read_memblock(root, warnings),
        pid1=pid1,
        systemd_version=_systemd_version(root, pid1),
        load_kexec_at_shutdown=_load_kexec(root),
        lockdown=_lockdown(root),
        warnings=warnings,
        version=_stripped(_read_optional(root / "proc/sys/kernel/version")),
    )


def _stripped(text: str | None) -> str | None:
    """A one-line file's value; None for a missing or empty one."""
    if text is None:
        return None
    return text.strip() or None
