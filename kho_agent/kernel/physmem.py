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
DIRECT_MAP = 0xFFFF888000000000  # x86-64 page_offset_base without KASLR, as in our extracts


@dataclass(frozen=True)
class Segment:
    phys: int
    size: int
    offset: int


def parse_elf_segments(header: bytes, table: bytes) -> list[Segment]:
    """PT_LOAD segments with a physical address, from a little-endian ELF64 core's 64-byte
    header and its program-header table."""
    if len(header) < 64 or header[:4] != ELF_MAGIC:
        raise AbiError("not an ELF file (a memory core must be an ELF64 core like /proc/kcore)")
    if header[4] != 2 or header[5] != 1:
        raise AbiError("only little-endian ELF64 cores are supported")
    phentsize, phnum = struct.unpack_from("<HH", header, 54)
    if phentsize < 56:
        raise AbiError(f"ELF program header size {phentsize} is too small")
    if len(table) < phentsize * phnum:
        raise AbiError("ELF program headers run past the end of the file")
    segs: list[Segment] = []
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", table, i * phentsize)
        if p_type == PT_LOAD and p_filesz and p_paddr != NO_PADDR:
            segs.append(Segment(p_paddr, p_filesz, p_offset))
    segs.sort(key=lambda s: s.phys)
    return segs


class ElfCoreMemory:
    """Physical memory from an ELF core (`/proc/kcore`, or a memory extract of that layout)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        opened = False
        try:
            try:
                head = os.pread(self._fd, 64, 0)
            except OSError as exc:  # e.g. EISDIR: pread errors carry no file name
                raise OSError(exc.errno, exc.strerror, path) from exc
            if len(head) < 64 or head[:4] != ELF_MAGIC:
                raise AbiError(f"{path} is not an ELF core")
            phoff, = struct.unpack_from("<Q", head, 32)
            phentsize, phnum = struct.unpack_from("<HH", head, 54)
            # at most 65535 entries of phentsize bytes: a bounded read wherever phoff points
            table = os.pread(self._fd, phentsize * phnum, phoff)
            self.segments = parse_elf_segments(head, table)
            opened = True
        finally:
            if not opened:  # do not leak the descriptor when the file is not a usable core
                os.close(self._fd)
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


def write_elf_core(path: str, runs: list[tuple[int, bytes]]) -> None:
    """Write an ELF64 core in the /proc/kcore layout: one PT_LOAD per run, `p_paddr` = physical
    address, `p_vaddr` in the x86-64 direct map. Adjacent runs are merged into one segment."""
    merged: list[tuple[int, bytearray]] = []
    for phys, data in sorted(runs, key=lambda r: r[0]):
        if merged and merged[-1][0] + len(merged[-1][1]) == phys:
            merged[-1][1].extend(data)
        else:
            merged.append((phys, bytearray(data)))
    phnum = len(merged)
    if phnum > 0xFFFF:
        raise AbiError(f"{phnum} segments do not fit an ELF core's 16-bit count")
    header = bytearray(64)
    header[:16] = ELF_MAGIC + bytes([2, 1, 1]) + bytes(9)
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 4, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 0,
                     0, 0)  # ET_CORE, EM_X86_64
    offsets = []
    offset = (64 + 56 * phnum + 4095) // 4096 * 4096  # data page aligned, as kcore does
    for _, run in merged:
        offsets.append(offset)
        offset += (len(run) + 4095) // 4096 * 4096
    table = b"".join(struct.pack("<IIQQQQQQ", PT_LOAD, 6, off, DIRECT_MAP + start, start,
                                 len(run), len(run), 4096)
                     for (start, run), off in zip(merged, offsets, strict=True))
    with open(path, "wb") as fh:
        fh.write(header + table)
        for (_, run), off in zip(merged, offsets, strict=True):
            fh.seek(off)
            fh.write(run)
