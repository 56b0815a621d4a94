"""LUO file handlers, keyed by the compatible string found in `luo_file_ser.compatible`.

LUO itself does not know what a file's `data` points at; each handler contract does. Mainline has
only memfd; in-flight handlers (guest_memfd, KVM, VFIO) get a row here when they land.
"""

from __future__ import annotations

from collections.abc import Callable

from . import memfd
from .context import DecodeContext

# A decoder takes (ctx, data, path) and returns a record, or None when nothing could be read.
FileDecoder = Callable[[DecodeContext, int, str], object | None]


def _memfd(compatible: str) -> FileDecoder:
    def decode(ctx: DecodeContext, data: int, path: str) -> object | None:
        return memfd.decode(compatible, ctx, data, path)
    return decode


FILE_HANDLERS: dict[str, FileDecoder] = {name: _memfd(name) for name in memfd.FORMATS}
