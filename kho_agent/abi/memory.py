"""Physical memory as the decoder sees it: a protocol, and a sparse in-memory implementation.

Real sources (/proc/kcore, an ELF core extract, a raw image file) live in kho_agent.kernel.physmem;
the encoders and the simulated kernel write into SparseMemory.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from .errors import MemoryUnavailable


class PhysicalMemory(Protocol):
    def read(self, phys: int, length: int) -> bytes:
        """Return exactly `length` bytes at physical address `phys`, or raise MemoryUnavailable."""
        ...


class SparseMemory:
    """Physical memory made of pages that exist only where something was written.

    Unwritten bytes inside a written page read as zero; a read touching a page never written raises
    MemoryUnavailable, like a core file that lacks it.
    """

    def __init__(self, page_size: int = 4096) -> None:
        self.page_size = page_size
        self._pages: dict[int, bytearray] = {}

    def write(self, phys: int, data: bytes) -> None:
        ps = self.page_size
        pos = 0
        while pos < len(data):
            page, off = divmod(phys + pos, ps)
            n = min(ps - off, len(data) - pos)
            buf = self._pages.get(page)
            if buf is None:
                buf = self._pages[page] = bytearray(ps)
            buf[off:off + n] = data[pos:pos + n]
            pos += n

    def read(self, phys: int, length: int) -> bytes:
        ps = self.page_size
        page, off = phys // ps, phys % ps
        if off + length <= ps:  # the common case: inside one page
            buf = self._pages.get(page)
            if buf is None:
                raise MemoryUnavailable(phys, length)
            if length == ps:
                return bytes(buf)  # a whole page: one copy instead of slice-then-copy
            return bytes(buf[off:off + length])
        out = bytearray()
        pos = 0
        while pos < length:
            page, off = divmod(phys + pos, ps)
            n = min(ps - off, length - pos)
            buf = self._pages.get(page)
            if buf is None:
                raise MemoryUnavailable(phys, length)
            out += buf[off:off + n]
            pos += n
        return bytes(out)

    def drop(self, phys: int, length: int) -> None:
        """Forget the pages covering [phys, phys+length): they read as unavailable afterwards."""
        ps = self.page_size
        for page in range(phys // ps, (phys + length + ps - 1) // ps):
            self._pages.pop(page, None)

    def pages(self) -> Iterator[tuple[int, bytes]]:
        for page in sorted(self._pages):
            yield page * self.page_size, bytes(self._pages[page])

    def __len__(self) -> int:
        return len(self._pages)


class PageAllocator:
    """Hands out page-aligned physical addresses for encoders (and the simulated kernel)."""

    def __init__(self, start: int = 0x1000_0000, page_size: int = 4096) -> None:
        if start % page_size:
            raise ValueError("allocator start must be page aligned")
        self.page_size = page_size
        self.next = start

    def alloc(self, nbytes: int = 0, *, align: int | None = None) -> int:
        ps = self.page_size
        align = max(align or ps, ps)
        self.next = (self.next + align - 1) // align * align
        phys = self.next
        self.next += max(1, (nbytes + ps - 1) // ps) * ps
        return phys
