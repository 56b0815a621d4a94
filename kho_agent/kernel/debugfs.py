"""The KHO debugfs tree (`/sys/kernel/debug/kho/{out,in}`), read as plain files.

    out/fdt            root FDT (cold boot only; cut short once subtrees grow it, a 7.2/7.3 defect)
    out/scratch_phys   one "0x%llx" line per scratch area: lowmem, global, one per node
    out/scratch_len
    out/sub_fdts/NAME  each subtree blob, at the size given to kho_add_subtree()
    in/fdt             the root FDT this kernel received (KHO boot only)
    in/sub_fdts/NAME   received blobs (in/sub_fdts/LUO points at a page freed during boot)

debugfs reports size 0 in stat, so every file is read to EOF. The same layout is accepted from a
copy on disk (a snapshot or a test case directory), so decode and check work offline.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_DEBUGFS = "/sys/kernel/debug"
MAX_BLOB = 16 << 20  # debugfs KHO blobs are pages; refuse to slurp something absurd


class DebugfsError(Exception):
    """The KHO debugfs tree cannot be read; the message says why and what to do."""


@dataclass
class KhoDebugfsSnapshot:
    path: str
    fdt: bytes | None
    sub_blobs: dict[str, bytes] = field(default_factory=dict)
    scratch_phys: list[int] = field(default_factory=list)
    scratch_len: list[int] = field(default_factory=list)


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(MAX_BLOB + 1)
    if len(data) > MAX_BLOB:
        raise DebugfsError(f"{path} is larger than {MAX_BLOB} bytes; not a KHO blob")
    return data


def _hex_lines(path: str) -> list[int]:
    if not os.path.exists(path):
        return []
    out = []
    for n, line in enumerate(_read(path).decode("ascii", errors="replace").split(), 1):
        try:
            out.append(int(line, 16))
        except ValueError as exc:
            raise DebugfsError(f"{path} line {n}: {line!r} is not a hex number") from exc
    return out


def kho_dir(debugfs: str, side: str) -> str:
    """Locate kho/<side> under a debugfs mount, or raise DebugfsError saying what is missing."""
    if not os.path.isdir(debugfs):
        raise DebugfsError(f"{debugfs} does not exist: debugfs is not available on this host")
    kho = os.path.join(debugfs, "kho")
    if not os.path.isdir(kho):
        if not os.listdir(debugfs):
            raise DebugfsError(f"debugfs is not mounted at {debugfs}; mount it with "
                               f"'mount -t debugfs none {debugfs}' and try again")
        raise DebugfsError(f"{kho} does not exist: KHO is off (boot with kho=on) or the kernel "
                           "lacks CONFIG_KEXEC_HANDOVER_DEBUGFS")
    path = os.path.join(kho, side)
    if not os.path.isdir(path):
        if side == "in":
            raise DebugfsError(f"{path} does not exist: this boot did not come through KHO, so "
                               "there is no incoming state")
        raise DebugfsError(f"{path} does not exist: KHO did not start on this kernel")
    return path


def read_snapshot(path: str) -> KhoDebugfsSnapshot:
    """Read a kho/out or kho/in directory (live or a copy)."""
    fdt_path = os.path.join(path, "fdt")
    try:
        fdt = _read(fdt_path) if os.path.exists(fdt_path) else None
        snap = KhoDebugfsSnapshot(path, fdt)
        subs = os.path.join(path, "sub_fdts")
        if os.path.isdir(subs):
            for name in sorted(os.listdir(subs)):
                full = os.path.join(subs, name)
                if os.path.isfile(full):
                    snap.sub_blobs[name] = _read(full)
        snap.scratch_phys = _hex_lines(os.path.join(path, "scratch_phys"))
        snap.scratch_len = _hex_lines(os.path.join(path, "scratch_len"))
    except PermissionError as exc:
        raise DebugfsError(f"{exc.filename}: permission denied; KHO debugfs files are root-only "
                           "(0400): run as root") from exc
    except OSError as exc:
        raise DebugfsError(f"cannot read {exc.filename or path}: {exc.strerror}") from exc
    if len(snap.scratch_phys) != len(snap.scratch_len):
        raise DebugfsError(f"{path}: scratch_phys has {len(snap.scratch_phys)} lines but "
                           f"scratch_len has {len(snap.scratch_len)}")
    return snap
