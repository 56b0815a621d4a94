"""The bundled KHO/LUO ABI decoder: bytes (and a physical-memory reader) in, typed records and
findings out. No other I/O. Every format is keyed by its compatible string or version and lives in
its own module; see ROOT_FORMATS, MEMMAP_FORMATS, SUBTREE_DECODERS, luo.RAW_FORMATS, FILE_HANDLERS.
"""

from . import memmap_chunks as _memmap_chunks  # noqa: F401  (registers the kho-v1 walkers)
from . import radix as _radix  # noqa: F401  (registers the radix memory-map walkers)
from .context import Side
from .errors import AbiError, FdtTruncated, MemoryUnavailable
from .findings import CODES, Finding, Severity
from .state import KhoInput, KhoState, ScratchArea, decode_state

__all__ = ["CODES", "AbiError", "FdtTruncated", "Finding", "KhoInput", "KhoState",
           "MemoryUnavailable", "ScratchArea", "Severity", "Side", "decode_state"]
