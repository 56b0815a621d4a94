"""Physical-memory readers: an ELF core whose PT_LOAD segments carry physical addresses in
`p_paddr` (the layout of /proc/kcore and of our memory extracts), and a raw image file.

Both implement kho_agent.abi.memory.PhysicalMemory and read lazily with pread, so /proc/kcore's
terabyte-sized virtual layout costs nothing until a page is asked for.
"""

from __future__ import annotations

import bisect
import os
import struct
from dataclasses import dataclass
from types import TracebackType

from ..abi.errors import AbiError, MemoryUnavailable

ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
KCORE_PATH = "/proc/kcore"
NO_PADDR = (1 << 64) - 1  # kcore marks segments without a physical address with -1


@dataclass(frozen=True)
class Segment:
    phys: int
    size: int
    offset: int


def parse_elf_segments(header: bytes, read_at: int | None = None) -> list[Segment]:
    """PT_LOAD segments of a little-endian ELF64 core that have a physical address."""
    if len(header) < 64 or header[:4] != ELF_MAGIC:
        raise AbiError("not an ELF file (a memory core must be an ELF64 core like /proc/kcore)")
    if header[4] != 2 or header[5] != 1:
        raise AbiError("only little-endian ELF64 cores are supported")
    del read_at
    phoff, = struct.unpack_from("<Q", header, 32)
    phentsize, phnum = struct.unpack_from("<HH", header, 54)
    if phentsize < 56:
        raise AbiError(f"ELF program header size {phentsize} is too small")
    segs: list[Segment] = []
    for i in range(phnum):
        off = phoff + i * phentsize
        if off + 56 > len(header):
            raise AbiError("ELF program headers run past the end of the file")
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz = struct.unpack_from("<IIQQQQ",
                                                                                 header, off)
        if p_type == PT_LOAD and p_filesz and p_paddr != NO_PADDR:
            segs.append(Segment(p_paddr, p_filesz, p_offset))
    segs.sort(key=lambda s: s.phys)
    return segs


class ElfCoreMemory:
    """Physical memory from an ELF core (`/proc/kcore`, or a memory extract of that layout)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            head = os.pread(self._fd, 64, 0)
            if len(head) < 64 or head[:4] != ELF_MAGIC:
                raise AbiError(f"{path} is not an ELF core")
            phoff, = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            table = os.pread(self._fd, phoff + phentsize * phnum, 0)
            self.segments = parse_elf_segments(table)
        except BaseException:
            os.close(self._fd)
            raise
        self._starts = [s.phys for s in self.segments]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ElfCoreMemory:
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def read(self, phys: int, length: int) -> bytes:
        out = bytearray()
        pos = phys
        while len(out) < length:
            i = bisect.bisect_right(self._starts, pos) - 1
            if i < 0 or pos >= self.segments[i].phys + self.segments[i].size:
                raise MemoryUnavailable(phys, length, f"no segment of {self.path} holds {pos:#x}")
            seg = self.segments[i]
            n = min(length - len(out), seg.phys + seg.size - pos)
            try:
                chunk = os.pread(self._fd, n, seg.offset + pos - seg.phys)
            except OSError as exc:
                # /proc/kcore refuses some ranges (e.g. not-present or hwpoisoned pages)
                raise MemoryUnavailable(phys, length, f"{self.path}: {exc.strerror}") from exc
            if len(chunk) != n:
                raise MemoryUnavailable(phys, length, f"{self.path} is shorter than its headers "
                                        "say")
            out += chunk
            pos += n
        return bytes(out)


class RawImageMemory:
    """Physical memory from a flat image file whose byte 0 is physical address `base`."""

    def __init__(self, path: str, base: int = 0) -> None:
        self.path = path
        self.base = base
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.size = os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read(self, phys: int, length: int) -> bytes:
        off = phys - self.base
        if off < 0 or off + length > self.size:
            raise MemoryUnavailable(phys, length, f"outside image {self.path}")
        return os.pread(self._fd, length, off)
