"""LUO raw-struct era: `luo-v5` (7.2-rc1 ..; include/linux/kho/abi/luo.h).

The `LUO` KHO subtree is a bare

    struct luo_ser { char compatible[8]; u64 liveupdate_num; u64 sessions_pa; u64 flbs_pa; };  // 32

compared by the next kernel with strncmp over the 8-byte field; a mismatch panics it. Sessions
live in a KHO block chain (80-byte entries) at `sessions_pa`, each session's files in another chain
(64-byte entries). `sessions_pa` stays 0 until reboot() serializes the sessions.
"""

from __future__ import annotations

from ..block import MAX_BLOCKS, capacity, encode_blocks, walk_blocks
from ..context import DecodeContext, Side, cstr
from ..findings import Severity
from ..luo_common import (
    FILE_SER_SIZE,
    SESSION_SER_SIZE,
    LuoState,
    check_sessions,
    decode_flbs,
    file_handlers,
    pack_file,
    pack_flbs,
    pack_session,
    session_path,
    unpack_files,
    unpack_session,
)
from ..memory import PageAllocator, SparseMemory
from ..structs import layout
from .records import LuoLimits, LuoVersion

COMPATIBLE = "luo-v5"
COMPAT_LEN = 8  # ALIGN(sizeof("luo-v5"), 8)
SER = layout("<8sQQQ", 32)  # struct luo_ser: compatible, liveupdate_num, sessions_pa, flbs_pa
SER_SIZE = SER.size


def decode(blob: bytes, ctx: DecodeContext, path: str) -> LuoState | None:
    if len(blob) < SER_SIZE:
        ctx.add("blob-malformed", path, f"luo_ser is {len(blob)} bytes, needs {SER_SIZE}; the "
                "next kernel panics at boot on this LUO state")
        return None
    raw_compatible, num, sessions_pa, flbs_pa = SER.unpack_from(blob)
    compatible, _ = cstr(raw_compatible)
    state = LuoState(compatible, num, sessions_pa, flbs_pa,
                     sessions_serialized=sessions_pa != 0 or ctx.side is Side.IN)
    if sessions_pa == 0:
        if ctx.side is Side.OUT:
            ctx.add("sessions-not-serialized", path,
                    "sessions_pa is 0: LUO writes sessions only inside reboot(), so this outgoing "
                    "state lists none yet; the agent checks its sessions from its own records")
    else:
        handlers = file_handlers()
        chain = walk_blocks(ctx, sessions_pa, SESSION_SER_SIZE, path, "sessions")
        for i, raw in enumerate(chain.entries):
            session = unpack_session(ctx, raw, path, i)
            state.sessions.append(session)
            spath = session_path(path, session.name)
            if session.files_phys == 0:
                if session.file_count:
                    ctx.add("count-mismatch", spath, f"session has file count "
                            f"{session.file_count} but no file blocks")
                continue
            files = walk_blocks(ctx, session.files_phys, FILE_SER_SIZE, spath, "files")
            session.files = unpack_files(ctx, files.entries, spath, handlers)
            if files.complete and len(files.entries) != session.file_count:
                ctx.add("count-mismatch", spath, f"session says {session.file_count} files but "
                        f"its blocks hold {len(files.entries)}; the next kernel fails every open "
                        "of /dev/liveupdate with EIO")
        check_sessions(ctx, state, path)
    decode_flbs(ctx, state, flbs_pa, path)
    return state


def encode(state: LuoState, memory: SparseMemory, alloc: PageAllocator, *,
           serialize_sessions: bool = True) -> bytes:
    """Write sessions, files and FLBs into memory; return the 32-byte luo_ser blob.

    With serialize_sessions=False the result is what the kernel shows before reboot():
    sessions_pa = 0 (the session and file blocks are not written).
    """
    sessions_pa = 0
    if serialize_sessions:
        entries = []
        for s in state.sessions:
            s.files_phys = encode_blocks([pack_file(f) for f in s.files], FILE_SER_SIZE, memory,
                                         alloc)
            s.file_count = len(s.files)
            entries.append(pack_session(s))
        sessions_pa = encode_blocks(entries, SESSION_SER_SIZE, memory, alloc)
    flbs_pa = state.flbs_phys or alloc.alloc(memory.page_size)
    memory.write(flbs_pa, pack_flbs(state.flbs, memory.page_size))
    state.flbs_phys = flbs_pa
    state.sessions_phys = sessions_pa
    return SER.pack(state.compatible.encode(), state.liveupdate_number, sessions_pa, flbs_pa)


def early_startup(blob: bytes, ctx: DecodeContext) -> int | str:
    """luo_early_startup() of a luo-v5 kernel: a whole luo_ser and an intact session chain (no
    cycle, no block of count 0 or above 51, at most 10000 blocks); the file chains are read at
    the first open of /dev/liveupdate."""
    if len(blob) < SER_SIZE:
        return "luo: luo_ser is too short"
    _, num, sessions_pa, _ = SER.unpack_from(blob)
    if sessions_pa:
        chain = walk_blocks(ctx, sessions_pa, SESSION_SER_SIZE, "/LUO", "sessions")
        if any(c == 0 for _, c in chain.blocks):
            return "luo: Block contains invalid entry count: 0"
        if any(f.severity is Severity.ERROR for f in ctx.findings):
            return "luo: the incoming session chain is broken"
    return int(num)


SESSIONS_PER_BLOCK = capacity(SESSION_SER_SIZE)  # 51 at 4 KiB pages
FILES_PER_BLOCK = capacity(FILE_SER_SIZE)        # 63

LUO_V5 = LuoVersion(
    compatible=COMPATIBLE,
    releases="7.2-rc1 .. 7.3",
    blob_is_fdt=False,
    sessions_in_blocks=True,
    limits=LuoLimits(
        sessions=MAX_BLOCKS * SESSIONS_PER_BLOCK,      # 510,000
        files_per_session=MAX_BLOCKS * FILES_PER_BLOCK,  # 630,000
        sessions_errno="ENOSPC", files_errno="ENOSPC",
        sessions_why=f"{MAX_BLOCKS} blocks of {SESSIONS_PER_BLOCK}",
        files_why=f"{MAX_BLOCKS} blocks of {FILES_PER_BLOCK}"),
    shipped_with_kho=frozenset({"kho-v4"}),  # block chains are a kho-v4 contract
    image_strings=(),
    decode=decode,
    encode=encode,
    early_startup=early_startup,
)
assert LUO_V5.limits.sessions == 510_000 and LUO_V5.limits.files_per_session == 630_000
