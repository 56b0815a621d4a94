"""LUO file handlers, keyed by the compatible string found in `luo_file_ser.compatible`.

LUO itself does not know what a file's `data` points at; each handler contract does. Mainline has
only memfd; in-flight handlers (guest_memfd, KVM, VFIO) get a row here when they land.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from . import memfd
from .context import DecodeContext

# A decoder takes (ctx, data, path) and returns a record, or None when nothing could be read.
FileDecoder = Callable[[DecodeContext, int, str], object | None]


FILE_HANDLERS: dict[str, FileDecoder] = {
    name: functools.partial(memfd.decode, name) for name in memfd.FORMATS
}
