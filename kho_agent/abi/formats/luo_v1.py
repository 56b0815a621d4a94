"""LUO FDT era: `luo-v1` with `luo-session-v2` and `luo-flb-v1` (6.19 .. 7.1).

    / { compatible = "luo-v1"; liveupdate-number = <u64>;
        luo-session { compatible = "luo-session-v2"; luo-session-header = <u64 phys>; };
        luo-flb { compatible = "luo-flb-v1"; luo-flb-header = <u64 phys>; };   // 7.0+
    };

`luo-session-header` points at `struct luo_session_header_ser { u64 count; }` followed directly by
`count` 80-byte `luo_session_ser` (16 pages: at most 819 sessions); each session's files are a
contiguous array of 64-byte `luo_file_ser` (2 pages: at most 128 files). A mismatch in any of
these panics the next kernel (early_initcall).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from ..context import DecodeContext
from ..errors import AbiError
from ..fdt import FdtWriter, parse_fdt
from ..luo_common import (
    FILE_SER_SIZE,
    SESSION_SER_SIZE,
    FileDecoder,
    LuoState,
    check_sessions,
    decode_flbs,
    file_handlers,
    pack_file,
    pack_flbs,
    pack_session,
    session_path,
    unpack_file,
    unpack_session,
)
from ..memory import PageAllocator, SparseMemory
from .records import LuoLimits, LuoVersion

COMPATIBLE = "luo-v1"
SESSION_COMPATIBLE = "luo-session-v2"
FLB_COMPATIBLE = "luo-flb-v1"
SESSION_PGCNT = 16
FILE_PGCNT = 2


def _u64(raw: bytes | None) -> int | None:
    return struct.unpack("<Q", raw)[0] if raw is not None and len(raw) == 8 else None


def _str(raw: bytes | None) -> str:
    return (raw or b"").split(b"\0")[0].decode("ascii", errors="backslashreplace")


def decode(blob: bytes, ctx: DecodeContext, path: str) -> LuoState | None:
    try:
        fdt = parse_fdt(blob)
    except AbiError as exc:
        ctx.add("blob-malformed", path, f"LUO FDT is malformed: {exc}; the next kernel panics")
        return None
    compatible = _str(fdt.root.prop("compatible"))
    if compatible != COMPATIBLE:
        ctx.add("compatible-unknown", path, f"LUO FDT compatible {compatible!r} is not "
                f"{COMPATIBLE!r}; a kernel that speaks another LUO version panics at boot")
        return None
    num = _u64(fdt.root.prop("liveupdate-number"))
    if num is None:
        ctx.add("property-missing", path, "LUO FDT lacks an 8-byte 'liveupdate-number'; the "
                "next kernel panics at boot")
    state = LuoState(compatible, num or 0, 0, 0, sessions_serialized=True)
    node = fdt.root.child("luo-session")
    if node is None:
        ctx.add("property-missing", path, "LUO FDT lacks the 'luo-session' node; the next "
                "kernel panics at boot")
    else:
        state.session_compatible = _str(node.prop("compatible"))
        if state.session_compatible != SESSION_COMPATIBLE:
            ctx.add("compatible-unknown", f"{path}/luo-session", f"session compatible "
                    f"{state.session_compatible!r} is not {SESSION_COMPATIBLE!r}")
        header = _u64(node.prop("luo-session-header"))
        if header is None:
            ctx.add("property-missing", f"{path}/luo-session", "no 8-byte 'luo-session-header'")
        elif header:
            state.sessions_phys = header
            _decode_sessions(ctx, state, header, path, file_handlers())
    flb = fdt.root.child("luo-flb")
    if flb is not None:
        state.flb_compatible = _str(flb.prop("compatible"))
        if state.flb_compatible != FLB_COMPATIBLE:
            ctx.add("compatible-unknown", f"{path}/luo-flb", f"FLB compatible "
                    f"{state.flb_compatible!r} is not {FLB_COMPATIBLE!r}")
        state.flbs_phys = _u64(flb.prop("luo-flb-header")) or 0
        decode_flbs(ctx, state, state.flbs_phys, path)
    return state


def _decode_sessions(ctx: DecodeContext, state: LuoState, header: int, path: str,
                     handlers: Mapping[str, FileDecoder]) -> None:
    ps = ctx.page_size
    hpath = f"{path}/luo-session"
    ctx.ref(header, SESSION_PGCNT * ps, hpath, "LUO session array")
    head = ctx.read(header, 8, hpath, "LUO session header")
    if head is None:
        return
    (count,) = struct.unpack("<Q", head)
    cap = (SESSION_PGCNT * ps - 8) // SESSION_SER_SIZE
    if count > cap:
        ctx.add("count-mismatch", hpath, f"session count {count} exceeds the {cap} sessions "
                "the array holds")
        count = cap
    raw = ctx.read(header + 8, count * SESSION_SER_SIZE, hpath, "LUO session array")
    if raw is None:
        return
    file_cap = FILE_PGCNT * ps // FILE_SER_SIZE
    for i in range(count):
        session = unpack_session(ctx, raw[i * SESSION_SER_SIZE:(i + 1) * SESSION_SER_SIZE],
                                 path, i)
        state.sessions.append(session)
        spath = session_path(path, session.name)
        if session.file_count == 0:
            continue
        if session.file_count > file_cap:
            ctx.add("count-mismatch", spath, f"file count {session.file_count} exceeds the "
                    f"{file_cap} files a session array holds")
            continue
        if session.files_phys == 0:
            ctx.add("count-mismatch", spath, f"session has {session.file_count} files but no "
                    "file array")
            continue
        ctx.ref(session.files_phys, session.file_count * FILE_SER_SIZE, spath, "LUO file array")
        # Each session has its own array; one shared by sessions (or overlapping another
        # structure) is decoded once, as in luo-v5 block chains, so that a decode stays linear in
        # the input (818 sessions on one array would otherwise decode 818 x 128 files).
        first = session.files_phys // ps
        last = (session.files_phys + session.file_count * FILE_SER_SIZE - 1) // ps
        if not all(ctx.claim(page * ps, spath, "LUO file array page")
                   for page in range(first, last + 1)):
            continue
        fraw = ctx.read(session.files_phys, session.file_count * FILE_SER_SIZE, spath,
                        "LUO file array")
        if fraw is None:
            continue
        for j in range(session.file_count):
            session.files.append(unpack_file(ctx, fraw[j * FILE_SER_SIZE:(j + 1) * FILE_SER_SIZE],
                                             spath, j, handlers))
    check_sessions(ctx, state, path)


def encode(state: LuoState, memory: SparseMemory, alloc: PageAllocator, *,
           serialize_sessions: bool = True) -> bytes:
    """Write the session and file arrays and the FLB page; return the one-page LUO FDT.

    luo-v1 has no unserialized form: its FDT points at the session array from boot on, so
    serialize_sessions changes nothing (it is there for the record's common signature)."""
    ps = memory.page_size
    header = alloc.alloc(SESSION_PGCNT * ps)
    sessions = bytearray(struct.pack("<Q", len(state.sessions)))
    for s in state.sessions:
        s.file_count = len(s.files)
        if s.files:
            s.files_phys = alloc.alloc(FILE_PGCNT * ps)
            memory.write(s.files_phys, b"".join(pack_file(f) for f in s.files)
                         .ljust(FILE_PGCNT * ps, b"\0"))
        else:
            s.files_phys = 0
        sessions += pack_session(s)
    memory.write(header, bytes(sessions).ljust(SESSION_PGCNT * ps, b"\0"))
    state.sessions_phys = header
    flbs = state.flbs_phys or alloc.alloc(ps)
    memory.write(flbs, pack_flbs(state.flbs, ps))
    state.flbs_phys = flbs
    w = FdtWriter().begin_node("").property_string("compatible", state.compatible)
    w.property_u64("liveupdate-number", state.liveupdate_number)
    w.begin_node("luo-session").property_string("compatible", SESSION_COMPATIBLE)
    w.property_u64("luo-session-header", header).end_node()
    w.begin_node("luo-flb").property_string("compatible", FLB_COMPATIBLE)
    w.property_u64("luo-flb-header", flbs).end_node()
    return w.end_node().finish()


def early_startup(blob: bytes, ctx: DecodeContext) -> int | str:
    """luo_early_startup() of a luo-v1 kernel: the FDT, its liveupdate-number and its session
    node must be there and of this version (the session arrays are read at the first open)."""
    state = decode(blob, ctx, "/LUO")
    if state is None or any(f.code in ("property-missing", "compatible-unknown")
                            for f in ctx.findings):
        return "luo: the incoming LUO FDT is incomplete"
    return state.liveupdate_number


LUO_V1 = LuoVersion(
    compatible=COMPATIBLE,
    releases="6.19 .. 7.1",
    blob_is_fdt=True,
    sessions_in_blocks=False,
    limits=LuoLimits(
        sessions=(SESSION_PGCNT * 4096 - 8) // SESSION_SER_SIZE,    # 819
        files_per_session=FILE_PGCNT * 4096 // FILE_SER_SIZE,      # 128
        sessions_errno="ENOMEM", files_errno="ENOSPC",
        sessions_why=f"{SESSION_PGCNT} pages of {SESSION_SER_SIZE}-byte entries",
        files_why=f"{FILE_PGCNT} pages of {FILE_SER_SIZE}-byte entries"),
    shipped_with_kho=frozenset({"kho-v1", "kho-v2", "kho-v3"}),
    image_strings=(SESSION_COMPATIBLE, FLB_COMPATIBLE),
    decode=decode,
    encode=encode,
    early_startup=early_startup,
)
assert LUO_V1.limits.sessions == 819 and LUO_V1.limits.files_per_session == 128
