"""Target=newest-compatible: the newest kernel installed in /boot that passes the gate; and the
initrd that goes with a configured kernel (Initrd=).

The choice itself (`newest_passing`) is pure: it takes the candidates and a gate (a callable that
returns why a candidate is refused, or None when it passes) and asks the gate about the
candidates newest first, stopping at the first that passes. kho-agentd's gate is the preflight
of prepare (ABI compatibility, scratch, command line), so the kernel chosen is one prepare would
take. Listing /boot is `installed_kernels` (names and kinds only: nothing is opened).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import PreflightFailed
from ..kernel.callerfile import list_directory
from .model import INITRD_AUTO, INITRD_NONE

KERNEL_PREFIX = "vmlinuz-"
INITRD_PREFIX = "initrd.img-"
# what package managers leave beside an installed kernel; never a candidate
_LEFTOVER = re.compile(r"\.(dpkg-\w+|old|bak|orig|rpmnew|rpmsave)$|~$")
MAX_CANDIDATES = 256   # /boot is bounded: beyond this many kernels something is wrong
MAX_BOOT_ENTRIES = 4096   # files of any kind in /boot (a few per kernel, plus the loader's)
_PART = re.compile(r"\d+|[^\d]+")


@dataclass(frozen=True)
class KernelCandidate:
    release: str
    kernel: Path
    initrd: Path | None = None


@dataclass(frozen=True)
class Selection:
    """The kernel chosen (None: none passed) and why each newer one was refused."""

    chosen: KernelCandidate | None
    refused: tuple[tuple[KernelCandidate, str], ...] = field(default=())

    def explain(self) -> str:
        """Why nothing was chosen, one candidate per clause (for the error message)."""
        if not self.refused:
            return "no kernel is installed (no vmlinuz-RELEASE in the boot directory)"
        return "; ".join(f"{c.release}: {why}" for c, why in self.refused)


def release_key(release: str) -> tuple[tuple[int, int | str], ...]:
    """Orders releases as versions: runs of digits by value, the text between them as text
    (6.12.10 after 6.12.9; 6.12.9-amd64 after 6.12.9). Text sorts after numbers at the same
    place, so 6.12-rc1 is newer than 6.12 here: pre-releases are not special-cased."""
    return tuple((0, int(part)) if part.isdigit() else (1, part)
                 for part in _PART.findall(release))


def newest_passing(candidates: Sequence[KernelCandidate],
                   gate: Callable[[KernelCandidate], str | None]) -> Selection:
    refused: list[tuple[KernelCandidate, str]] = []
    for candidate in sorted(candidates, key=lambda c: release_key(c.release), reverse=True):
        problem = gate(candidate)
        if problem is None:
            return Selection(candidate, tuple(refused))
        refused.append((candidate, problem))
    return Selection(None, tuple(refused))


def installed_kernels(boot_dir: Path) -> list[KernelCandidate]:
    """The regular files vmlinuz-RELEASE in `boot_dir`, each with initrd.img-RELEASE when that
    is a regular file too. Symbolic links are not followed (Debian's /vmlinuz links live in /).
    A boot directory that cannot be listed is refused as an unreadable kernel path is (NotFound,
    PermissionDenied, InvalidArgument), naming it and the errno."""
    entries = sorted(list_directory(boot_dir, "the boot directory (Target=newest-compatible)",
                                    MAX_BOOT_ENTRIES))
    names = set(entries)
    found: list[KernelCandidate] = []
    for name in entries:
        if not name.startswith(KERNEL_PREFIX) or _LEFTOVER.search(name):
            continue
        release = name[len(KERNEL_PREFIX):]
        if not release or not _regular(boot_dir / name):
            continue
        initrd_name = INITRD_PREFIX + release
        initrd = boot_dir / initrd_name
        found.append(KernelCandidate(release, boot_dir / name,
                                     initrd if initrd_name in names and _regular(initrd)
                                     else None))
        if len(found) > MAX_CANDIDATES:
            raise PreflightFailed(f"Target=newest-compatible: more than {MAX_CANDIDATES} "
                                  f"kernels in {boot_dir}")
    return found


def initrd_beside(kernel: Path) -> Path | None:
    """The initrd installed with a kernel named vmlinuz*: initrd.img* in the same directory
    (/boot/vmlinuz-6.12.9 -> /boot/initrd.img-6.12.9, Debian's /vmlinuz -> /initrd.img), when
    that is a regular file, links followed as the kernel's path is. None otherwise."""
    if not kernel.name.startswith("vmlinuz"):
        return None
    initrd = kernel.with_name("initrd.img" + kernel.name[len("vmlinuz"):])
    try:
        return initrd if stat.S_ISREG(os.stat(initrd).st_mode) else None
    except OSError:
        return None


def configured_initrd(kernel: Path, initrd: str) -> Path | None:
    """The initrd for Target=KERNEL by Initrd= (auto: the one beside it; none; a path)."""
    if initrd == INITRD_NONE:
        return None
    if initrd == INITRD_AUTO:
        return initrd_beside(kernel)
    return Path(initrd)


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False
