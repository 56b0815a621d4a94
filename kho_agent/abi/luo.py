"""The `LUO` KHO subtree: pick the version's record from the blob itself.

Up to 7.1 the blob is an FDT (`luo-v1`); from 7.2 it is a raw `struct luo_ser` whose first bytes
are the compatible string (`luo-v5`). Each version is a record in registry.LUO_FORMATS.
"""

from __future__ import annotations

from . import composite, registry
from .context import DecodeContext, Side, cstr
from .fdt import FDT_MAGIC
from .luo_common import LuoState

SUBTREE_NAME = "LUO"
# The raw compatible field is sized from its string (ALIGN(sizeof, 8)); a composite string is
# read up to its NUL within this many bytes.
MAX_COMPAT_LEN = 64
MISMATCH = "a kernel that speaks another LUO version panics at boot on it"


def decode(blob: bytes, ctx: DecodeContext, path: str) -> LuoState | None:
    if len(blob) >= 4 and int.from_bytes(blob[:4], "big") == FDT_MAGIC:
        fdt_era = next((f for f in registry.LUO_FORMATS if f.blob_is_fdt), None)
        if fdt_era is not None:
            return fdt_era.decode(blob, ctx, path)
    head, _ = cstr(blob[:8])
    for fmt in registry.LUO_FORMATS:
        if not fmt.blob_is_fdt and head == fmt.compatible:
            return fmt.decode(blob, ctx, path)
    if head.startswith("luo-"):
        full, _ = cstr(blob[:MAX_COMPAT_LEN])
        if composite.is_composite(full):
            composite.findings(ctx, path, full, "LUO", MISMATCH)
            return None
        known = ", ".join(sorted(registry.versions("luo")))
        ctx.add("compatible-unknown", path,
                f"LUO compatible {head!r} is unknown to this decoder (known: {known}); {MISMATCH}")
        return None
    if ctx.side is Side.IN:
        ctx.add("luo-blob-freed", path,
                "the incoming LUO blob no longer holds a luo_ser: the kernel frees it during "
                "boot and the page is reused; sessions are read through /dev/liveupdate instead")
        return None
    ctx.add("blob-malformed", path, "LUO blob is neither a luo-v1 FDT nor a raw luo_ser; a "
            "kernel with LUO enabled panics at boot on it")
    return None
