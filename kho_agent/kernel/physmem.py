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
from ..errors import errno_text
from .callerfile import open_regular

ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
KCORE_PATH = "/proc/kcore"
NO_PADDR = (1 << 64) - 1  # kcore marks segments without a physical address with -1
DIRECT_MAP = 0xFFFF888000000000  # x86-64 page_offset_base without KASLR, as in our extracts
MAX_FILE_OFFSET = (1 << 63) - 1  # off_t: pread cannot reach beyond it
ELF_HEADER_SIZE = 64  # Elf64_Ehdr
# An ELF64 program header (Elf64_Phdr) is 56 bytes: the kernel's own ELF loader (binfmt_elf)
# refuses any other e_phentsize, and /proc/kcore writes sizeof(struct elf_phdr).
ELF64_PHDR_SIZE = 56
# e_phnum is 16 bits, and 0xFFFF (PN_XNUM) means that the real count is in section header 0,
# which /proc/kcore never writes (its count is its kcore_list entries + 1). So the program header
# table of a core read here is at most 65534 * 56 bytes (3.5 MiB), wherever e_phoff points; the
# file itself (kcore's apparent size is the whole kernel address space) is never bounded, its
# segments are read on demand.
PN_XNUM = 0xFFFF
MAX_PHDR_TABLE = (PN_XNUM - 1) * ELF64_PHDR_SIZE


@dataclass(frozen=True)
class Segment:
    phys: int
    size: int
    offset: int


def elf_header(header: bytes) -> tuple[int, int]:
    """(e_phoff, e_phnum) of a little-endian ELF64 core's 64-byte header, checked: the program
    header table it describes is at most MAX_PHDR_TABLE bytes."""
    if len(header) < ELF_HEADER_SIZE or header[:4] != ELF_MAGIC:
        raise AbiError("not an ELF file (a memory core must be an ELF64 core like /proc/kcore)")
    if header[4] != 2 or header[5] != 1:
        raise AbiError("only little-endian ELF64 cores are supported")
    phoff, = struct.unpack_from("<Q", header, 32)
    phentsize, phnum = struct.unpack_from("<HH", header, 54)
    if phentsize != ELF64_PHDR_SIZE:
        raise AbiError(f"ELF program header size {phentsize} is not the {ELF64_PHDR_SIZE} bytes "
                       "of an ELF64 core")
    if phnum == PN_XNUM:
        raise AbiError("the ELF core counts its program headers in a section header (PN_XNUM), "
                       "which no kernel core does")
    if phoff + phentsize * phnum > MAX_FILE_OFFSET:
        raise AbiError(f"ELF program headers at {phoff:#x} lie beyond any file")
    return phoff, phnum


def parse_elf_segments(header: bytes, table: bytes) -> list[Segment]:
    """PT_LOAD segments with a physical address, from a little-endian ELF64 core's 64-byte
    header and its program-header table."""
    _phoff, phnum = elf_header(header)
    phentsize = ELF64_PHDR_SIZE
    if len(table) < phentsize * phnum:
        raise AbiError("ELF program headers run past the end of the file")
    segs: list[Segment] = []
    for i in range(phnum):
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz = struct.unpack_from(
            "<IIQQQQ", table, i * phentsize)
        if p_type == PT_LOAD and p_filesz and p_paddr != NO_PADDR:
            if p_offset + p_filesz > MAX_FILE_OFFSET:
                raise AbiError(f"ELF segment {i} at file offset {p_offset:#x}+{p_filesz:#x} "
                               "lies beyond any file")
            segs.append(Segment(p_paddr, p_filesz, p_offset))
    segs.sort(key=lambda s: s.phys)
    return segs


class ElfCoreMemory:
    """Physical memory from an ELF core (`/proc/kcore`, or a memory extract of that layout)."""

    def __init__(self, path: str) -> None:
        """Open a core by name: only a regular file, opened without blocking (a FIFO, a device,
        a directory or a dangling symlink raise NotFound/PermissionDenied/InvalidArgument from
        kernel/callerfile.py); a malformed one raises AbiError."""
        self.path = path
        self._file = open_regular(path, "memory core")
        self._fd = self._file.fd
        opened = False
        try:
            head = self._file.read_at(0, ELF_HEADER_SIZE)
            if len(head) < ELF_HEADER_SIZE or head[:4] != ELF_MAGIC:
                raise AbiError(f"{path} is not an ELF core")
            try:
                phoff, phnum = elf_header(head)  # checked before the table is read
            except AbiError as exc:
                raise AbiError(f"{path}: {exc}") from exc
            table = self._file.read_at(phoff, ELF64_PHDR_SIZE * phnum)  # <= MAX_PHDR_TABLE
            self.segments = parse_elf_segments(head, table)
            opened = True
        finally:
            if not opened:  # do not leak the descriptor when the file is not a usable core
                self._file.close()
        self._starts = [s.phys for s in self.segments]

    def close(self) -> None:
        self._file.close()
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
                raise MemoryUnavailable(phys, length, f"{self.path}: {errno_text(exc)}") \
                    from exc
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
        # a regular file only (kernel/callerfile.py); its size bounds every read below
        self._file = open_regular(path, "memory image")
        self._fd = self._file.fd
        self.size = self._file.size

    def close(self) -> None:
        self._file.close()
        self._fd = -1

    def read(self, phys: int, length: int) -> bytes:
        off = phys - self.base
        if off < 0 or off + length > self.size:
            raise MemoryUnavailable(phys, length, f"outside image {self.path}")
        try:
            data = os.pread(self._fd, length, off)
        except OSError as exc:
            raise MemoryUnavailable(phys, length, f"{self.path}: {errno_text(exc)}") from exc
        if len(data) != length:
            raise MemoryUnavailable(phys, length, f"{self.path} shrank while it was read")
        return data


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
