"""Gathering what the engine decides on: the running kernel's KHO state and ABI, the target
image's ABI, and the files a client wants preserved.

This is the I/O half of planning; `engine/preflight.py`, `engine/scratch_plan.py` and
`engine/manifest/` are pure and work on what is gathered here. Everything reads through a
`Host`, so the simulated kernel's root stands in for the real one.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from .abi import KhoInput, KhoState, Side, decode_state
from .abi.compat import (
    CompatReport,
    KernelAbi,
    abi_from_payload,
    abi_from_state,
    abi_from_strings,
    compare,
    merge,
    payload_strings,
)
from .abi.kho_state import ScratchArea, scratch_roles
from .abi.luo_common import LuoState
from .errors import AgentError, InvalidArgument, errno_text
from .imagestrings import ImageStrings, image_digest
from .kernel import debugfs
from .kernel.callerfile import FileIdentity, RegularFile, open_regular
from .kernel.fsmagic import HUGETLBFS_MAGIC, TMPFS_MAGIC, fs_magic
from .kernel.host import Host
from .kernel.image import (
    ImageError,
    ImageInfo,
    image_memory_size,
    parse_image,
    read_image,
    setup_cmdline_size,
)


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
    try:
        state = decode_state(KhoInput(snap.fdt, snap.sub_blobs, scratch, memory, side))
    finally:
        close = getattr(memory, "close", None)  # the decoded state keeps no reference to it
        if close is not None:
            close()
    sizes = {n: len(b) for n, b in snap.sub_blobs.items()}
    return KhoView(side, directory, state, sizes, scratch)


# A target image is read whole to find the ABI strings in its payload. kexec_file_load itself
# takes at most INT_MAX, but a bootable image (bzImage, arm64 Image) is tens of MiB; an
# uncompressed vmlinux with debug information can pass 256 MiB, and that is not bootable by
# kexec_file_load anyway (compat reads those, with its own bound).
TARGET_IMAGE_MAX = 256 << 20


@dataclass
class TargetImage:
    path: Path
    info: ImageInfo
    abi: KernelAbi
    size: int           # bytes of the file
    memory_size: int    # bytes kexec reserves for it (bzImage init_size), at least `size`
    cmdline_size: int | None = None  # x86 setup_header.cmdline_size; None: COMMAND_LINE_SIZE
    digest: str = ""    # BLAKE3 of the file (imagestrings.py keys the strings below by it)
    strings: dict[str, list[str]] = field(default_factory=dict)  # payload_strings() of it


@dataclass
class TargetFiles:
    """The next kernel's files, open: read for planning and handed to kexec_file_load as they
    are, so what was checked is what is loaded."""

    kernel: RegularFile
    initrd: RegularFile | None = None

    @classmethod
    def open(cls, kernel: Path, initrd: Path | None) -> TargetFiles:
        """Open by name, with this process's rights (root's own calls, the local CLI)."""
        image = open_regular(kernel, "target kernel", max_size=TARGET_IMAGE_MAX)
        try:
            ramdisk = open_regular(initrd, "initrd") if initrd is not None else None
        except AgentError:
            image.close()
            raise
        return cls(image, ramdisk)

    @property
    def initrd_size(self) -> int:
        return self.initrd.size if self.initrd is not None else 0

    def close(self) -> None:
        self.kernel.close()
        if self.initrd is not None:
            self.initrd.close()

    def __enter__(self) -> TargetFiles:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def target_image(file: RegularFile) -> TargetImage:
    """Read and decode an open target kernel image (bounded by TARGET_IMAGE_MAX)."""
    data = file.read_all(TARGET_IMAGE_MAX)
    try:
        image = parse_image(data, file.name)
    except ImageError as exc:
        raise InvalidArgument(f"target kernel: {exc}") from exc
    info = image.info
    head = data[:4096]
    sized = image_memory_size(head, len(data))
    path = Path(file.resolved_path())
    strings = payload_strings(image.payload)
    return TargetImage(path, info, abi_from_strings(strings, f"image {path}", info.release),
                       len(data), max(sized[0], len(data)) if sized else len(data),
                       setup_cmdline_size(head), image_digest(data), strings)


class TargetImageCache:
    """Decoded target images by file identity (device, inode, size, times): a hundred Preflight
    calls naming the same kernel decode it once. Bounded; safe to share between threads."""

    def __init__(self, entries: int = 4) -> None:
        self._entries = entries
        self._cache: OrderedDict[FileIdentity, TargetImage] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, file: RegularFile) -> TargetImage:
        with self._lock:
            hit = self._cache.get(file.identity)
            if hit is not None:
                self._cache.move_to_end(file.identity)
                return hit
        image = target_image(file)
        with self._lock:
            self._cache[file.identity] = image
            while len(self._cache) > self._entries:
                self._cache.popitem(last=False)
        return image


def running_abi(host: Host, release: str, out: KhoView | None = None,
                incoming: KhoView | None = None, known: ImageStrings | None = None
                ) -> KernelAbi:
    """What the running kernel speaks: its outgoing KHO state (what will be handed over), else
    what it received, plus its own image in /boot for the file handlers (LUO writes those only
    inside reboot()). With `known`, an image whose strings were recorded (by the prepare that
    chose it as the target) is not decompressed again."""
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
    path = host.path(f"boot/vmlinuz-{release}")
    if known is not None:
        recorded = _recorded_strings(path, known)
        if recorded is not None:
            return merge(abi, abi_from_strings(recorded, f"image {path}", release))
    return with_running_image(abi, path, release)[0]


def _recorded_strings(path: Path, known: ImageStrings) -> dict[str, list[str]] | None:
    """The strings recorded for the image now at `path` (read whole and digested: far cheaper
    than decompressing and scanning it), or None."""
    try:
        with open_regular(path, "running kernel image", max_size=TARGET_IMAGE_MAX) as file:
            data = file.read_all(TARGET_IMAGE_MAX)
    except AgentError:
        return None  # with_running_image says what is wrong with it
    return known.lookup(image_digest(data))


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
        raise InvalidArgument(f"fd {fd} cannot be inspected: {errno_text(exc)}") from exc
    return FileFacts(fd, st.st_size, st.st_blocks * 512, stat.S_ISREG(st.st_mode)
                     and magic == TMPFS_MAGIC, magic == HUGETLBFS_MAGIC, st.st_nlink > 0)
