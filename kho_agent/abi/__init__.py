"""The bundled KHO/LUO ABI decoder: bytes (and a physical-memory reader) in, typed records and
findings out. No other I/O. Every format version is one record in its own module (formats/),
listed once in registry.FORMATS; the decoder, the simulator and preflight read those records.
"""

from .context import Side
from .errors import AbiError, FdtTruncated, MemoryUnavailable
from .findings import CODES, Finding, Severity
from .kho_state import KhoInput, KhoState, ScratchArea, decode_state

__all__ = ["CODES", "AbiError", "FdtTruncated", "Finding", "KhoInput", "KhoState",
           "MemoryUnavailable", "ScratchArea", "Severity", "Side", "decode_state"]
