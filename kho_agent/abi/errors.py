"""The decoder's own error types: the only exceptions anything under kho_agent.abi raises."""

from __future__ import annotations


class AbiError(Exception):
    """A structure could not be decoded or encoded.

    The message names what was being read and what was wrong with it, so that a caller can put it
    in front of a user unchanged.
    """


class MemoryUnavailable(AbiError):
    """The physical-memory source does not hold the requested bytes (not an ABI defect)."""

    def __init__(self, phys: int, length: int, detail: str = "") -> None:
        self.phys = phys
        self.length = length
        text = f"physical memory {phys:#x}+{length:#x} is not in the memory source"
        super().__init__(f"{text}: {detail}" if detail else text)


class FdtTruncated(AbiError):
    """An FDT blob is shorter than the totalsize its header announces."""

    def __init__(self, have: int, need: int) -> None:
        self.have = have
        self.need = need
        super().__init__(f"FDT is truncated: header says totalsize={need} but only {have} bytes "
                         "are present")
