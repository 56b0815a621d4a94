"""LUO records and the entry layouts both LUO eras share (include/linux/kho/abi/luo.h).

    struct luo_session_ser { char name[64]; struct luo_file_set_ser file_set_ser; };  // 80 bytes
    struct luo_file_set_ser { u64 files; u64 count; };                              // 16 bytes
    struct luo_file_ser { char compatible[48]; u64 data; u64 token; };              // 64 bytes
    struct luo_flb_header_ser { u64 pgcnt; u64 count; };                            // 16 bytes
    struct luo_flb_ser { char name[48]; u64 data; u64 count; };                     // 64 bytes

In the FDT era (`luo-v1`) sessions and files sit in contiguous arrays; in `luo-v5` they sit in KHO
block chains. Both end up as the same records, checked by the same rules.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from .context import DecodeContext, cstr
from .structs import layout

SESSION_NAME_LENGTH = 64
HNDL_COMPAT_LENGTH = 48
FLB_COMPAT_LENGTH = 48
SESSION_SER = layout("<64sQQ", 80)   # luo_session_ser
FILE_SER = layout("<48sQQ", 64)      # luo_file_ser
FLB_HEADER = layout("<QQ", 16)       # luo_flb_header_ser
FLB_SER = layout("<48sQQ", 64)       # luo_flb_ser
SESSION_SER_SIZE = SESSION_SER.size
FILE_SER_SIZE = FILE_SER.size
FLB_HEADER_SIZE = FLB_HEADER.size
FLB_SER_SIZE = FLB_SER.size

# A file handler's decoder takes (ctx, luo_file_ser.data, path) and returns its record (memfd:
# MemfdState), or None when nothing could be read.
FileDecoder = Callable[[DecodeContext, int, str], object | None]


def file_handlers() -> Mapping[str, FileDecoder]:
    """The file handlers of the registry, by compatible; a LUO decode takes them once. Imported
    here, at call time: the registry imports every format module, and the LUO ones import this
    module."""
    from .registry import FILE_HANDLERS
    return FILE_HANDLERS


@dataclass(slots=True)
class LuoFile:
    index: int
    compatible: str
    token: int
    data: int
    handler: object | None = None  # the handler's decoded state (memfd: MemfdState)


@dataclass(slots=True)
class LuoSession:
    name: str
    file_count: int
    files_phys: int
    files: list[LuoFile] = field(default_factory=list)


@dataclass
class LuoFlb:
    name: str
    data: int
    count: int


@dataclass
class LuoState:
    compatible: str
    liveupdate_number: int
    sessions_phys: int
    flbs_phys: int
    sessions_serialized: bool
    sessions: list[LuoSession] = field(default_factory=list)
    flbs: list[LuoFlb] = field(default_factory=list)
    flb_pgcnt: int | None = None
    session_compatible: str | None = None  # luo-v1 only: the luo-session node
    flb_compatible: str | None = None      # luo-v1 only: the luo-flb node


def session_path(base: str, name: str) -> str:
    return f"{base}/session[{name}]"


def file_path(spath: str, token: int) -> str:
    return f"{spath}/file[{token:#x}]"


def unpack_session(ctx: DecodeContext, raw: bytes, base: str, index: int) -> LuoSession:
    name, had_nul = cstr(raw[:SESSION_NAME_LENGTH])
    files, count = struct.unpack_from("<QQ", raw, SESSION_NAME_LENGTH)
    spath = session_path(base, name or f"#{index}")
    if not had_nul:
        ctx.add("name-unterminated", spath, f"session #{index} name has no NUL in its 64 bytes; "
                "the kernel would never have written it")
    elif not name:
        ctx.add("name-empty", spath, f"session #{index} has an empty name; CREATE_SESSION "
                "refuses empty names, so this state is corrupt")
    return LuoSession(name, count, files)


def unpack_file(ctx: DecodeContext, raw: bytes, spath: str, index: int,
                handlers: Mapping[str, FileDecoder]) -> LuoFile:
    compatible, had_nul = cstr(raw[:HNDL_COMPAT_LENGTH])
    data, token = struct.unpack_from("<QQ", raw, HNDL_COMPAT_LENGTH)
    f = LuoFile(index, compatible, token, data)
    fpath = f"{spath}/file[{token:#x}]"  # file_path() inlined: this runs for every file
    if not had_nul:
        ctx.add("name-unterminated", fpath, "file handler compatible has no NUL in its 48 bytes")
    decoder = handlers.get(compatible)
    if decoder is None:
        ctx.add("handler-unknown", fpath,
                f"file handler {compatible!r} is unknown to this decoder (known: "
                f"{', '.join(sorted(handlers))}); a kernel without that handler fails "
                "every open of /dev/liveupdate with EIO")
    else:
        f.handler = decoder(ctx, data, fpath)
    return f


def unpack_files(ctx: DecodeContext, entries: Iterable[bytes], spath: str,
                 handlers: Mapping[str, FileDecoder]) -> list[LuoFile]:
    """unpack_file() of each entry of one session's file list, in order. The loop is here, its
    lookups bound once, because it runs for every file (100k in a large state)."""
    files: list[LuoFile] = []
    append = files.append
    add = ctx.add
    unpack = FILE_SER.unpack_from
    # raw compatible field -> cstr() of it: a session's files name a handful of handlers, and
    # the cache lives for one session, so it cannot grow beyond the session's entries
    names: dict[bytes, tuple[str, bool]] = {}
    for index, raw in enumerate(entries):
        raw_compatible, data, token = unpack(raw)
        name = names.get(raw_compatible)
        if name is None:
            name = names[raw_compatible] = cstr(raw_compatible)
        compatible, had_nul = name
        fpath = f"{spath}/file[{token:#x}]"  # file_path() inlined
        if not had_nul:
            add("name-unterminated", fpath, "file handler compatible has no NUL in its 48 bytes")
        decoder = handlers.get(compatible)
        if decoder is None:
            add("handler-unknown", fpath,
                f"file handler {compatible!r} is unknown to this decoder (known: "
                f"{', '.join(sorted(handlers))}); a kernel without that handler fails "
                "every open of /dev/liveupdate with EIO")
            append(LuoFile(index, compatible, token, data))
        else:
            append(LuoFile(index, compatible, token, data, decoder(ctx, data, fpath)))
    return files


def check_sessions(ctx: DecodeContext, state: LuoState, base: str) -> None:
    """Rules the kernel enforces on the way in: unique session names, unique tokens per session,
    file counts that match the files."""
    seen: set[str] = set()
    for s in state.sessions:
        spath = session_path(base, s.name)
        if s.name in seen:
            ctx.add("session-duplicate-name", spath,
                    f"session name {s.name!r} appears twice; the next kernel fails every open of "
                    "/dev/liveupdate with EIO (duplicate incoming session)")
        seen.add(s.name)
        tokens: set[int] = set()
        for f in s.files:
            if f.token in tokens:
                ctx.add("token-duplicate", file_path(spath, f.token),
                        f"token {f.token:#x} appears twice in session {s.name!r}")
            tokens.add(f.token)


def decode_flbs(ctx: DecodeContext, state: LuoState, phys: int, base: str) -> None:
    if phys == 0:
        return
    fpath = f"{base}/flbs"
    ps = ctx.page_size
    if phys % ps:
        ctx.add("misaligned", fpath, f"FLB page {phys:#x} is not page aligned")
        return
    ctx.ref(phys, ps, fpath, "FLB page")
    head = ctx.read(phys, FLB_HEADER_SIZE, fpath, "FLB header")
    if head is None:
        return
    pgcnt, count = struct.unpack("<QQ", head)
    state.flb_pgcnt = pgcnt
    if pgcnt == 0 or pgcnt > 64:
        ctx.add("property-malformed", fpath, f"FLB header pgcnt {pgcnt} is not plausible (the "
                "kernel writes 1)")
        return
    cap = (pgcnt * ps - FLB_HEADER_SIZE) // FLB_SER_SIZE
    if count > cap:
        ctx.add("count-mismatch", fpath, f"FLB header count {count} exceeds the {cap} entries "
                f"that fit in {pgcnt} page(s); the next kernel would read past the area")
        count = cap
    if count == 0:
        return
    raw = ctx.read(phys + FLB_HEADER_SIZE, count * FLB_SER_SIZE, fpath, "FLB entries")
    if raw is None:
        return
    names: set[str] = set()
    for i in range(count):
        entry = raw[i * FLB_SER_SIZE:(i + 1) * FLB_SER_SIZE]
        name, had_nul = cstr(entry[:FLB_COMPAT_LENGTH])
        data, fcount = struct.unpack_from("<QQ", entry, FLB_COMPAT_LENGTH)
        epath = f"{base}/flb[{name}]"
        if not had_nul:
            ctx.add("name-unterminated", epath, "FLB name has no NUL in its 48 bytes")
        if name in names:
            ctx.add("fdt-duplicate", epath, f"FLB {name!r} appears twice")
        names.add(name)
        state.flbs.append(LuoFlb(name, data, fcount))


def pack_session(s: LuoSession) -> bytes:
    return SESSION_SER.pack(s.name.encode(), s.files_phys, s.file_count)


def pack_file(f: LuoFile) -> bytes:
    return FILE_SER.pack(f.compatible.encode(), f.data, f.token)


def pack_flbs(flbs: list[LuoFlb], page_size: int) -> bytes:
    out = bytearray(FLB_HEADER.pack(1, len(flbs)))
    for flb in flbs:
        out += FLB_SER.pack(flb.name.encode(), flb.data, flb.count)
    return bytes(out.ljust(page_size, b"\0"))
