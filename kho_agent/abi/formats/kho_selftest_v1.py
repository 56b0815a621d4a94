"""`kho_test` subtree of lib/test_kho.c (`kho-test-v1`, only with CONFIG_TEST_KEXEC_HANDOVER):
the kernel's KHO self-test, decoded here like any other subtree.

    / { compatible = "kho-test-v1"; magic = <u32 0x4b484f21>;
        data { nr_folios = <u32>; folios_info = <struct kho_vmalloc>; csum = <u32>; }; };

Decoded so that test kernels do not show an unknown subtree; its folios are the kernel's business.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ..context import DecodeContext
from ..errors import AbiError
from ..fdt import FdtWriter, parse_fdt
from ..vmalloc import VmallocDesc, read_vmalloc
from .records import KHO_TEST, SubtreeVersion

SUBTREE_NAME = "kho_test"
COMPATIBLE = "kho-test-v1"
MAGIC = 0x4B484F21  # "KHO!"


@dataclass
class KhoTestState:
    compatible: str
    magic: int | None
    nr_folios: int | None
    csum: int | None
    folios_info: VmallocDesc | None


def decode(blob: bytes, ctx: DecodeContext, path: str) -> KhoTestState | None:
    try:
        fdt = parse_fdt(blob)
    except AbiError as exc:
        ctx.add("blob-malformed", path, f"kho_test subtree is not a valid FDT: {exc}")
        return None
    compatible = (fdt.root.prop("compatible") or b"").rstrip(b"\0").decode("ascii", "replace")
    if compatible != COMPATIBLE:
        ctx.add("compatible-unknown", path, f"kho_test compatible {compatible!r} is not "
                f"{COMPATIBLE!r}")
        return KhoTestState(compatible, None, None, None, None)

    def u32(raw: bytes | None) -> int | None:
        return struct.unpack("<I", raw)[0] if raw is not None and len(raw) == 4 else None

    data = fdt.root.child("data")
    state = KhoTestState(compatible, u32(fdt.root.prop("magic")), None, None, None)
    if state.magic != MAGIC:
        ctx.add("property-malformed", path, f"kho_test magic is not {MAGIC:#x}")
    if data is None:
        ctx.add("property-missing", path, "kho_test has no 'data' node")
        return state
    state.nr_folios = u32(data.prop("nr_folios"))
    state.csum = u32(data.prop("csum"))
    info = data.prop("folios_info")
    if info is not None and len(info) == 16:
        state.folios_info = VmallocDesc.unpack(info)
        read_vmalloc(ctx, state.folios_info, path, "kho_test folio list")
    return state


def encode(state: KhoTestState) -> bytes:
    w = FdtWriter().begin_node("").property_string("compatible", state.compatible)
    w.property_u32("magic", state.magic or MAGIC).begin_node("data")
    w.property_u32("nr_folios", state.nr_folios or 0)
    w.property("folios_info", (state.folios_info or VmallocDesc(0, 0, 0, 0)).pack())
    w.property_u32("csum", state.csum or 0)
    return w.end_node().end_node().finish()


KHO_TEST_V1 = SubtreeVersion(
    family=KHO_TEST,
    compatible=COMPATIBLE,
    subtree_name=SUBTREE_NAME,
    releases="6.16 .. (CONFIG_TEST_KEXEC_HANDOVER)",
    decode=decode,
)
