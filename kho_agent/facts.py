"""Gathering what the engine decides on: the running kernel's KHO state and ABI, the target
image's ABI, and the files a client wants preserved.

This is the I/O half of planning; `preflight.py`, `scratch.py` and `manifest.py` are pure and
work on what is gathered here. Everything reads through a `Host`, so the simulated kernel's root
stands in for the real one.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .abi import KhoInput, KhoState, Side, decode_state
from .abi.compat import (
    CompatReport,
    KernelAbi,
    abi_from_payload,
    abi_from_state,
    compare,
    merge,
)
from .abi.luo_common import LuoState
from .abi.state import ScratchArea, scratch_roles
from .errors import InvalidArgument, NotFound
from .kernel import debugfs
from .kernel.fsmagic import HUGETLBFS_MAGIC, TMPFS_MAGIC, fs_magic
from .kernel.host import Host
from .kernel.image import ImageError, ImageInfo, read_image
from .scratch import image_memory_size


@dataclass
class KhoView:
    """One side of the KHO debugfs tree, decoded (None fields: not available here)."""

    side: Side
    directory: str | None
    state: KhoState | None
    sub_blob_sizes: dict[str, int] = field(default_factory=dict)
    scratch: list[ScratchArea] = field(default_factory=list)
    problem: str | None = None  # why the view is missing

    @property
    def luo(self) -> LuoState | None:
        if self.state is None:
            return None
        for sub in self.state.subtrees:
            if sub.name == "LUO" and isinstance(sub.decoded, LuoState):
                return sub.decoded
        return None


def kho_view(host: Host, side: Side, *, with_memory: bool = True) -> KhoView:
    """Decode `kho/out` or `kho/in`. A missing tree is a view with a problem, not an error:
    debugfs is optional, and `in` exists only after a KHO boot."""
    # After the kexec the incoming map's pages are no longer reserved and LUO's page was freed:
    # reading memory for the incoming side would read whatever reused it.
    with_memory = with_memory and side is Side.OUT
    host.sync(with_memory)
    name = "out" if side is Side.OUT else "in"
    try:
        directory = debugfs.kho_dir(host.debugfs, name)
        snap = debugfs.read_snapshot(directory)
    except debugfs.DebugfsError as exc:
        return KhoView(side, None, None, problem=str(exc))
    scratch = [ScratchArea(p, n, role) for p, n, role in
               zip(snap.scratch_phys, snap.scratch_len, scratch_roles(len(snap.scratch_phys)),
                   strict=True)]
    memory = host.memory() if with_memory else None
    state = decode_state(KhoInput(snap.fdt, snap.sub_blobs, scratch, memory, side))
    sizes = {n: len(b) for n, b in snap.sub_blobs.items()}
    return KhoView(side, directory, state, sizes, scratch)


@dataclass
class TargetImage:
    path: Path
    info: ImageInfo
    abi: KernelAbi
    size: int           # bytes of the file
    memory_size: int    # bytes kexec reserves for it (bzImage init_size), at least `size`


def target_image(path: Path) -> TargetImage:
    try:
        image = read_image(str(path))
    except ImageError as exc:
        raise InvalidArgument(f"target kernel: {exc}") from exc
    info = image.info
    size = path.stat().st_size
    with path.open("rb") as fh:
        sized = image_memory_size(fh.read(4096), size)
    return TargetImage(path, info, abi_from_payload(image.payload, f"image {path}", info.release),
                       size, max(sized[0], size) if sized else size)


def file_size(path: Path | None, what: str) -> int:
    if path is None:
        return 0
    try:
        return path.stat().st_size
    except FileNotFoundError as exc:
        raise NotFound(f"{what} {path} does not exist") from exc


def running_abi(host: Host, release: str, out: KhoView | None = None,
                incoming: KhoView | None = None) -> KernelAbi:
    """What the running kernel speaks: its outgoing KHO state (what will be handed over), else
    what it received, plus its own image in /boot for the file handlers (LUO writes those only
    inside reboot())."""
    out = out or kho_view(host, Side.OUT, with_memory=False)
    if out.state is not None:
        inc_state = None
        if out.state.compatible is None:
            incoming = incoming or kho_view(host, Side.IN)
            inc_state = incoming.state
        abi = abi_from_state(out.state, inc_state, f"debugfs {out.directory}")
    else:
        abi = KernelAbi(source="none", notes=[f"KHO state not readable: {out.problem}"])
    abi.release = abi.release or release
    return with_running_image(abi, host.path(f"boot/vmlinuz-{release}"), release)[0]


def with_running_image(abi: KernelAbi, path: Path, release: str, hint: str = ""
                       ) -> tuple[KernelAbi, ImageInfo | None]:
    """Add what the running kernel's own image says (the file handler versions) to what its
    KHO state says; a missing or unreadable image is a note, not an error."""
    if not path.exists():
        abi.notes.append(f"{path} does not exist: file handler versions of the running kernel "
                         f"are not known{hint}")
        return abi, None
    try:
        image = read_image(str(path))
    except ImageError as exc:
        abi.notes.append(f"running kernel image not used: {exc}")
        return abi, None
    return merge(abi, abi_from_payload(image.payload, f"image {path}", release)), image.info


def compat_report(host: Host, release: str, target: TargetImage) -> CompatReport:
    return compare(running_abi(host, release), target.abi)


@dataclass
class FileFacts:
    """What preflight needs to know about a file a client wants preserved."""

    fd: int
    size: int
    allocated: int      # bytes backed by pages now; the rest are holes preservation allocates
    shmem: bool         # tmpfs/shmem (memfd or unlinked tmpfs file): what LUO's memfd handler takes
    hugetlb: bool
    linked: bool        # still has a name in a filesystem (LUO wants nlink == 0)


def file_facts(fd: int) -> FileFacts:
    try:
        st = os.fstat(fd)
        magic = fs_magic(fd)
    except OSError as exc:
        raise InvalidArgument(f"fd {fd} cannot be inspected: {exc.strerror}") from exc
    return FileFacts(fd, st.st_size, st.st_blocks * 512, stat.S_ISREG(st.st_mode)
                     and magic == TMPFS_MAGIC, magic == HUGETLBFS_MAGIC, st.st_nlink > 0)
