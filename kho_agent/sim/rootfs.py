"""The fake root of a simulated host (`DIR/root`, the current boot's `root/`): the proc, sys and
debugfs files the real readers (`kernel.debugfs`, `kernel.physmem`, sysinfo) read, in the
kernel's formats.

A boot's root is written whole while the boot is built (write_boot, invisible until the switch,
boots.py); later changes within the boot (kexec_loaded, debugfs kho/out, kcore) replace one file
at a time, atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .boot import Memblock, MiB, memblock_debugfs
from .boot_record import BootState
from .images import UTS_VERSION, build_bzimage
from .memory import save_core
from .store import crash_point, tmp_path, write_atomic, write_new

KHO_DEBUGFS = "sys/kernel/debug/kho"


def _bytes(data: bytes | str) -> bytes:
    return data.encode() if isinstance(data, str) else data


def _put(root: Path, rel: str, data: bytes | str) -> None:
    """A file of a root being built."""
    write_new(root / rel, _bytes(data))


def _update(root: Path, rel: str, data: bytes | str) -> None:
    """A file of the running boot's root, replaced whole."""
    write_atomic(root / rel, _bytes(data))


def _kb(n: int) -> int:
    return n // 1024


def meminfo(state: BootState, mb: Memblock) -> str:
    """A /proc/meminfo subset, in show_val_kb()'s layout."""
    total = mb.total - sum(r.size for r in mb.reserved)
    cma = sum(s.size for s in state.scratch) if state.kho_enabled else 0

    def kb(label: str, value: int) -> str:
        return f"{label + ':':<16}{_kb(value):>8} kB\n"
    return (kb("MemTotal", total) + kb("MemFree", total * 9 // 10)
            + kb("MemAvailable", total * 9 // 10) + "HugePages_Total:       0\n"
            + "HugePages_Free:        0\n" + kb("Hugepagesize", 2 * MiB) + kb("CmaTotal", cma))


USERSPACE_FILE = "userspace.json"  # the machine's init system: carried from boot to boot


def write_userspace(directory: Path, systemd_version: int) -> None:
    write_new(directory / USERSPACE_FILE, json.dumps({"systemd_version": systemd_version})
              .encode())


def carry_userspace(old: Path, new: Path) -> None:
    """The init system outlives the boot: the new boot gets the old one's."""
    try:
        data = (old / USERSPACE_FILE).read_bytes()
    except FileNotFoundError:
        return
    write_new(new / USERSPACE_FILE, data)


def _userspace(root: Path) -> None:
    """PID 1 as read by sysinfo: `proc/1/comm`, and for systemd the shared library whose name
    carries its version (`usr/lib/systemd/libsystemd-shared-<N>.so`, as on a real root)."""
    try:
        version = json.loads((root.parent / USERSPACE_FILE).read_text())["systemd_version"]
    except FileNotFoundError:
        _put(root, "proc/1/comm", "sim-init\n")
        return
    _put(root, "proc/1/comm", "systemd\n")
    _put(root, f"usr/lib/systemd/libsystemd-shared-{int(version)}.so", b"")


def write_boot(root: Path, state: BootState, mb: Memblock,
               incoming: tuple[bytes, dict[str, bytes]] | None) -> None:
    """Everything that is fixed for a boot, written into the new boot's empty root."""
    _put(root, "proc/cmdline", state.cmdline + "\n")
    _put(root, "proc/sys/kernel/osrelease", state.release + "\n")
    _put(root, "proc/sys/kernel/version", UTS_VERSION + "\n")
    _put(root, "proc/sys/kernel/random/boot_id", state.boot_id + "\n")
    _put(root, "proc/meminfo", meminfo(state, mb))
    _userspace(root)
    _put(root, "sys/kernel/kexec_loaded", "0\n")
    nodes = len(mb.nodes)
    _put(root, "sys/devices/system/node/has_memory", "0\n" if nodes == 1 else f"0-{nodes - 1}\n")
    for nid, (base, size) in enumerate(mb.nodes):
        used = sum(r.size for r in mb.reserved if base <= r.base < base + size)
        _put(root, f"sys/devices/system/node/node{nid}/meminfo",
             f"Node {nid} MemTotal:       {_kb(size):>8} kB\n"
             f"Node {nid} MemFree:        {_kb(size - used) * 9 // 10:>8} kB\n"
             f"Node {nid} MemUsed:        {_kb(used):>8} kB\n"
             f"Node {nid} HugePages_Total:     0\n"
             f"Node {nid} HugePages_Free:      0\n")
    _put(root, "sys/kernel/debug/memblock/reserved", memblock_debugfs(mb))
    if state.luo_enabled:
        _put(root, "dev/liveupdate", b"")
    _put(root, f"boot/vmlinuz-{state.release}", build_bzimage(state.release, state.abi))
    if not state.kho_enabled:
        return
    _put(root, f"{KHO_DEBUGFS}/out/scratch_phys", "".join(f"0x{s.phys:x}\n"
                                                        for s in state.scratch))
    _put(root, f"{KHO_DEBUGFS}/out/scratch_len", "".join(f"0x{s.size:x}\n"
                                                       for s in state.scratch))
    crash_point()
    (root / KHO_DEBUGFS / "out/sub_fdts").mkdir(parents=True, exist_ok=True)
    if incoming is not None:
        fdt, blobs = incoming
        _put(root, f"{KHO_DEBUGFS}/in/fdt", fdt)
        crash_point()
        (root / KHO_DEBUGFS / "in/sub_fdts").mkdir(parents=True, exist_ok=True)
        for name, blob in blobs.items():
            _put(root, f"{KHO_DEBUGFS}/in/sub_fdts/{name}", blob)


def write_out(root: Path, fdt: bytes | None, blobs: dict[str, bytes]) -> None:
    base = root / KHO_DEBUGFS / "out"
    if not base.is_dir():
        return  # KHO is off in this boot
    if fdt is not None:
        _update(root, f"{KHO_DEBUGFS}/out/fdt", fdt)
    for name, blob in blobs.items():
        _update(root, f"{KHO_DEBUGFS}/out/sub_fdts/{name}", blob)


def write_core(root: Path, rel: str, pages: dict[int, bytes]) -> None:
    """An ELF core of `pages` (/proc/kcore), replaced whole."""
    path = root / rel
    tmp = tmp_path(path)
    crash_point()
    try:
        save_core(str(tmp), pages)
        crash_point()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def set_kexec_loaded(root: Path, loaded: bool) -> None:
    _update(root, "sys/kernel/kexec_loaded", "1\n" if loaded else "0\n")
