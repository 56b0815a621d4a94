"""The `LUO` KHO subtree: pick the era's decoder from the blob itself.

Up to 7.1 the blob is an FDT (`luo-v1`, see luo_v1.py); from 7.2 it is a raw `struct luo_ser` whose
first bytes are the compatible string (`luo-v5`, see luo_v5.py). Future raw versions land in
RAW_FORMATS beside it.
"""

from __future__ import annotations

from collections.abc import Callable

from . import luo_v1, luo_v5
from .context import DecodeContext, Side, cstr
from .fdt import FDT_MAGIC
from .luo_common import LuoState

SUBTREE_NAME = "LUO"

RawDecoder = Callable[[bytes, DecodeContext, str], LuoState | None]
RAW_FORMATS: dict[str, RawDecoder] = {luo_v5.COMPATIBLE: luo_v5.decode}
KNOWN = sorted([*RAW_FORMATS, luo_v1.COMPATIBLE])


def decode(blob: bytes, ctx: DecodeContext, path: str) -> LuoState | None:
    if len(blob) >= 4 and int.from_bytes(blob[:4], "big") == FDT_MAGIC:
        return luo_v1.decode(blob, ctx, path)
    head, _ = cstr(blob[:8])
    if head in RAW_FORMATS:
        return RAW_FORMATS[head](blob, ctx, path)
    if head.startswith("luo-"):
        ctx.add("compatible-unknown", path,
                f"LUO compatible {head!r} is unknown to this decoder (known: {', '.join(KNOWN)}); "
                "a kernel that speaks another LUO version panics at boot on it")
        return None
    if ctx.side is Side.IN:
        ctx.add("luo-blob-freed", path,
                "the incoming LUO blob no longer holds a luo_ser: the kernel frees it during "
                "boot and the page is reused; sessions are read through /dev/liveupdate instead")
        return None
    ctx.add("blob-malformed", path, "LUO blob is neither a luo-v1 FDT nor a raw luo_ser; a "
            "kernel with LUO enabled panics at boot on it")
    return None
