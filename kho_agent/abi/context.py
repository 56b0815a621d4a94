"""What every decoder gets: the memory source, which side of a kexec this is, and where findings
and memory references go.

Decoders record each structure that must survive the kexec as a MemRef; checks.py later compares
those with the preserved-memory map and the scratch areas, so that decoding stays one pass and the
checks stay separate.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .errors import MemoryUnavailable
from .findings import Finding, Severity, make
from .memory import PhysicalMemory


class Side(enum.Enum):
    OUT = "out"  # the running kernel's outgoing state, before the kexec
    IN = "in"    # the state a kernel received, after the kexec


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 3x, and a decode makes 400k of these
class MemRef:
    phys: int
    length: int
    path: str
    what: str


@dataclass
class DecodeContext:
    memory: PhysicalMemory | None
    side: Side = Side.OUT
    page_shift: int = 12
    findings: list[Finding] = field(default_factory=list)
    refs: list[MemRef] = field(default_factory=list)
    missing: int = 0  # reads the memory source could not serve
    # page frame number -> path of the chain (block chain, vmalloc chunk chain) that owns the
    # page. The kernel restores each such page once, so a page reached from two owners is a
    # defect, and not following it again keeps a decode linear in the input (a shared chain
    # would otherwise be walked once per referrer). Keyed by frame number, not address: an
    # int hashes to itself, and page addresses, whose low 12 bits are all 0, collide in a dict
    # (inserting 100k of them cost 2.7x as much). Only page-aligned addresses are claimed.
    owners: dict[int, str] = field(default_factory=dict)

    @property
    def page_size(self) -> int:
        return 1 << self.page_shift

    def add(self, code: str, path: str, message: str, severity: Severity | None = None) -> None:
        self.findings.append(make(code, path, message, severity))

    def ref(self, phys: int, length: int, path: str, what: str) -> None:
        self.refs.append(MemRef(phys, length, path, what))

    def claim(self, phys: int, path: str, what: str) -> bool:
        """Mark a chain page (page-aligned `phys`) as owned by `path`; if another owner has it,
        report chain-cycle and return False (the caller stops following that chain)."""
        pfn = phys >> self.page_shift
        owner = self.owners.get(pfn)
        if owner is None:
            self.owners[pfn] = path
            return True
        self.add("chain-cycle", path, f"{what} at {phys:#x} already belongs to {owner}; the next "
                 "kernel restores a page once, so the second restore fails")
        return False

    def read(self, phys: int, length: int, path: str, what: str) -> bytes | None:
        """Read from the memory source; a miss becomes one info finding and returns None."""
        if self.memory is None:
            self.missing += 1
            self.add("memory-unavailable", path,
                     f"{what} at {phys:#x} was not read: no memory source was given (pass "
                     "--memory CORE or --kcore to decode and check it)")
            return None
        try:
            return self.memory.read(phys, length)
        except MemoryUnavailable:
            self.unavailable(phys, length, path, what)
            return None

    def unavailable(self, phys: int, length: int, path: str, what: str) -> None:
        """Record a read the memory source could not serve (read() does, and decoders that call
        the memory source directly on a hot path)."""
        self.missing += 1
        self.add("memory-unavailable", path,
                 f"{what} at {phys:#x}+{length:#x} is not in the memory source; it was not "
                 "decoded or checked")


def cstr(raw: bytes) -> tuple[str, bool]:
    """Decode a fixed-size NUL-padded name; return (text, had_nul). Undecodable bytes are shown
    with backslash escapes so that a corrupt name is still printable."""
    nul = raw.find(b"\0")
    text = raw if nul < 0 else raw[:nul]
    return text.decode("utf-8", errors="backslashreplace"), nul >= 0
