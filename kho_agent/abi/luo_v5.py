"""LUO raw-struct era: `luo-v5` (7.2-rc1 ..; include/linux/kho/abi/luo.h).

The `LUO` KHO subtree is a bare

    struct luo_ser { char compatible[8]; u64 liveupdate_num; u64 sessions_pa; u64 flbs_pa; };  // 32

compared by the next kernel with strncmp over the 8-byte field; a mismatch panics it. Sessions
live in a KHO block chain (80-byte entries) at `sessions_pa`, each session's files in another chain
(64-byte entries). `sessions_pa` stays 0 until reboot() serializes the sessions.
"""

from __future__ import annotations

import struct

from .block import encode_blocks, walk_blocks
from .context import DecodeContext, Side, cstr
from .luo_common import (
    FILE_SER_SIZE,
    SESSION_SER_SIZE,
    LuoState,
    check_sessions,
    decode_flbs,
    pack_file,
    pack_flbs,
    pack_session,
    session_path,
    unpack_file,
    unpack_session,
)
from .memory import PageAllocator, SparseMemory

COMPATIBLE = "luo-v5"
COMPAT_LEN = 8  # ALIGN(sizeof("luo-v5"), 8)
SER_SIZE = 32
REQUIRES_KHO = "kho-v4"  # block chains are a kho-v4 contract


def decode(blob: bytes, ctx: DecodeContext, path: str) -> LuoState | None:
    if len(blob) < SER_SIZE:
        ctx.add("blob-malformed", path, f"luo_ser is {len(blob)} bytes, needs {SER_SIZE}; the "
                "next kernel panics at boot on this LUO state")
        return None
    compatible, _ = cstr(blob[:COMPAT_LEN])
    num, sessions_pa, flbs_pa = struct.unpack_from("<QQQ", blob, COMPAT_LEN)
    state = LuoState(compatible, num, sessions_pa, flbs_pa,
                     sessions_serialized=sessions_pa != 0 or ctx.side is Side.IN)
    if sessions_pa == 0:
        if ctx.side is Side.OUT:
            ctx.add("sessions-not-serialized", path,
                    "sessions_pa is 0: LUO writes sessions only inside reboot(), so this outgoing "
                    "state lists none yet; the agent checks its sessions from its own records")
    else:
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
            for j, fraw in enumerate(files.entries):
                session.files.append(unpack_file(ctx, fraw, spath, j))
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
    return struct.pack("<8sQQQ", state.compatible.encode(), state.liveupdate_number, sessions_pa,
                       flbs_pa)
