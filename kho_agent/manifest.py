"""The manifest: what a live update is expected to carry, and the check of what came back.

Written before the kexec in two places (design decision 2): atomically on disk in the state
directory, and as a sealed memfd preserved at token 0 of the agent's own LUO session, so that
verification after the reboot does not depend on the disk. `compare_manifest()` lines the
manifest up with an `Observation` gathered on the new boot and gives a verdict per item: proof
that this boot came through the live update (decision 3), ABI, sessions, tokens, sizes, digests,
seals, KHO subtrees and the network.

Everything here is pure except the small I/O helpers (`write_atomic`, `read_manifest`,
`manifest_memfd`, `manifest_from_fd`). Reading validates everything and fails with a
`StateCorrupt` that names the JSON path of the first problem, never with a KeyError.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import NoReturn

from .errors import AgentError, InvalidArgument, KernelRefused, NotFound, StateCorrupt
from .kernel.callerfile import Dangling, read_if_present
from .netstate import NetState, NetStateFormatError
from .netstate import diff as netstate_diff

SCHEMA_VERSION = 1
MANIFEST_TOKEN = 0
AGENT_SESSION = "kho-agent"

SESSION_NAME_MAX_BYTES = 63        # LIVEUPDATE_SESSION_NAME_LENGTH (64) less the NUL
SUBTREE_NAME_MAX_BYTES = 255       # FDT node names have no kernel limit; this bounds junk
U64_LIMIT = 1 << 64
U32_LIMIT = 1 << 32
DIGEST_HEX_LENGTHS = {"blake3": 64}
_LOWER_HEX = re.compile(r"[0-9a-f]*")
MANIFEST_MAX_BYTES = 256 << 20     # measured: 10k files 1.7-3 MB, 100k files 17 MB; refuses junk

# F_SEAL_* (include/uapi/linux/fcntl.h)
F_SEAL_SEAL = 0x01
F_SEAL_SHRINK = 0x02
F_SEAL_GROW = 0x04
F_SEAL_WRITE = 0x08
F_SEAL_FUTURE_WRITE = 0x10
F_SEAL_EXEC = 0x20
# The manifest memfd cannot change, but may still be sealed further: F_SEAL_SEAL is left out on
# purpose (see the platform notes on seals and restored memfds).
MANIFEST_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
# A memfd restored with F_SEAL_EXEC and an executable mode gets the write seals added by the
# kernel when the seals are re-applied (0x20 comes back as 0x3e; platform notes).
EXEC_IMPLIED_SEALS = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_FUTURE_WRITE

CORRUPT_ADVICE = ("Nothing was changed. Verify against the other copy of the manifest (state "
                  "directory or the agent's LUO session) if it is intact; before a live update, "
                  "run prepare again to write a new one")


# --- records ------------------------------------------------------------------------------------

@dataclass
class FileEntry:
    token: int
    size: int
    digest: str | None          # hex; None when digests are off for the session
    digest_alg: str | None      # "blake3"
    digest_seconds: float | None
    seals: int | None


@dataclass
class SessionEntry:
    name: str
    owner: str                  # "uid=0 bus=:1.42" or "rehearsal"
    files: list[FileEntry]
    ready: bool
    digests: bool               # per-session opt-in
    # The owner keeps the session fd in its own service's fd store (hand-off mode fdstore):
    # systemd hands the session to that service after the kexec, not to the agent, which then
    # does not retrieve it. Written only when true (older manifests have no such field).
    owner_fd_store: bool = False


@dataclass
class SubtreeEntry:
    name: str
    size: int | None
    compatible: str | None


@dataclass
class Manifest:
    schema: int
    created: str                # ISO 8601 UTC
    host: str
    release_from: str
    release_to: str
    boot_id_from: str
    abi_from: dict[str, str]    # contract -> version ("kho": "kho-v4", "luo": "luo-v5", ...)
    abi_to: dict[str, str]
    cmdline_to: str
    scratch: dict[str, object]  # areas and the kho_scratch= value in effect
    liveupdate_number_from: int | None
    liveupdate_number_expected: int | None
    sessions: list[SessionEntry]
    subtrees: list[SubtreeEntry]
    network: dict[str, object] | None   # NetState.to_json()
    final: bool                 # False at prepare, True at commit


class ManifestCorrupt(StateCorrupt):
    """A manifest that cannot be read back. `json_path` names the first problem (`$` when the
    document as a whole is unreadable)."""

    def __init__(self, json_path: str, problem: str, source: str = "manifest") -> None:
        super().__init__(f"{source} is invalid at {json_path}: {problem}. {CORRUPT_ADVICE}")
        self.json_path = json_path
        self.problem = problem


class _Invalid(Exception):
    """Internal: the first validation problem, before it becomes a user-facing error."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


# --- JSON form ----------------------------------------------------------------------------------

def _file_to_json(f: FileEntry) -> dict[str, object]:
    return {"token": f.token, "size": f.size, "digest": f.digest, "digest_alg": f.digest_alg,
            "digest_seconds": f.digest_seconds, "seals": f.seals}


def _session_to_json(s: SessionEntry) -> dict[str, object]:
    out: dict[str, object] = {"name": s.name, "owner": s.owner,
                              "files": [_file_to_json(f) for f in s.files], "ready": s.ready,
                              "digests": s.digests}
    if s.owner_fd_store:
        out["owner_fd_store"] = True
    return out


def _manifest_to_obj(m: Manifest) -> dict[str, object]:
    return {
        "schema": m.schema, "created": m.created, "host": m.host,
        "release_from": m.release_from, "release_to": m.release_to,
        "boot_id_from": m.boot_id_from, "abi_from": dict(m.abi_from), "abi_to": dict(m.abi_to),
        "cmdline_to": m.cmdline_to, "scratch": m.scratch,
        "liveupdate_number_from": m.liveupdate_number_from,
        "liveupdate_number_expected": m.liveupdate_number_expected,
        "sessions": [_session_to_json(s) for s in m.sessions],
        "subtrees": [{"name": t.name, "size": t.size, "compatible": t.compatible}
                     for t in m.subtrees],
        "network": m.network, "final": m.final,
    }


def _dumps(obj: object) -> bytes:
    # Compact on purpose: the final manifest is written inside the commit's blackout window, and
    # json's C encoder only runs without `indent` (100k files: 0.17 s instead of 0.68 s).
    # `jq . manifest.json` shows it indented.
    return (json.dumps(obj, sort_keys=True, ensure_ascii=False, separators=(",", ":"),
                       allow_nan=False) + "\n").encode("utf-8")


def manifest_to_json(m: Manifest) -> bytes:
    """Canonical JSON: sorted keys, UTF-8, no insignificant whitespace, trailing newline.

    The manifest is validated first with the same rules as reading, so that nothing is written
    that verification could not read back after the reboot; a bad record is InvalidArgument.
    """
    obj = _manifest_to_obj(m)
    try:
        data = _dumps(obj)
        _parse_manifest(json.loads(data))
    except _Invalid as err:
        raise InvalidArgument(f"refusing to write an invalid manifest: {err.path}: "
                              f"{err.problem} (a bug in the caller)") from err
    except (TypeError, ValueError) as err:  # a value JSON cannot hold (a set, NaN, an object)
        raise InvalidArgument(f"refusing to write a manifest that is not plain JSON: {err} "
                              "(a bug in the caller)") from err
    return data


class _JsonObject(dict[str, object]):
    """A parsed JSON object that remembers the first key it saw twice (json keeps the last)."""

    duplicate: str | None = None


def _object_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    marked = _JsonObject(obj)
    seen: set[str] = set()
    for key, _value in pairs:
        if key in seen:
            marked.duplicate = key
            break
        seen.add(key)
    return marked


class _DuplicateTracker:
    """json.loads hook that notes whether any object had a duplicate key, so that the walk
    that finds its path only runs when there is one."""

    def __init__(self) -> None:
        self.found = False

    def __call__(self, pairs: list[tuple[str, object]]) -> dict[str, object]:
        obj = _object_pairs(pairs)
        if isinstance(obj, _JsonObject):
            self.found = True
        return obj


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    # 1e999 parses as infinity, which the manifest cannot be written back with (allow_nan=False)
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def manifest_from_json(data: bytes) -> Manifest:
    """Parse and validate; ManifestCorrupt (a StateCorrupt) names the JSON path of the first
    problem."""
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ManifestCorrupt("$", f"not UTF-8 text (byte {err.start})") from err
    duplicates = _DuplicateTracker()
    try:
        value = json.loads(text, object_pairs_hook=duplicates, parse_constant=_reject_constant,
                           parse_float=_finite_float)
    except json.JSONDecodeError as err:
        raise ManifestCorrupt("$", f"not valid JSON ({err.msg} at line {err.lineno} column "
                                   f"{err.colno}); the file may be truncated") from err
    except ValueError as err:  # NaN / Infinity / out of range / an integer of > 4300 digits
        raise ManifestCorrupt("$", f"not valid JSON ({err})") from err
    except RecursionError as err:
        raise ManifestCorrupt("$", "nested too deeply to be a manifest") from err
    try:
        if duplicates.found:
            _find_duplicate_key(value, "$")
        return _parse_manifest(value)
    except _Invalid as err:
        raise ManifestCorrupt(err.path, err.problem) from err
    except RecursionError as err:
        raise ManifestCorrupt("$", "nested too deeply to be a manifest") from err


# --- validation ---------------------------------------------------------------------------------

def _kind(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             type(None): "null", list: "an array"}
    if isinstance(value, dict):
        return "an object"
    return names.get(type(value), type(value).__name__)


def _find_duplicate_key(value: object, path: str) -> None:
    if isinstance(value, dict):
        duplicate = getattr(value, "duplicate", None)
        if duplicate is not None:
            raise _Invalid(f"{path}.{duplicate}", "the key appears more than once")
        for key, item in value.items():
            _find_duplicate_key(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _find_duplicate_key(item, f"{path}[{i}]")


def _obj(value: object, path: str, keys: tuple[str, ...]) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _Invalid(path, f"expected an object, found {_kind(value)}")
    if len(value) == len(keys) and value.keys() >= set(keys):
        return value  # the common case, checked in one go
    for key in keys:
        if key not in value:
            raise _Invalid(f"{path}.{key}", "required field is missing")
    for key in value:
        if key not in keys:
            raise _Invalid(f"{path}.{key}", "unknown field (not in manifest schema version "
                                            f"{SCHEMA_VERSION})")
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(path, f"expected true or false, found {_kind(value)}")
    return value


def _int(value: object, path: str, limit: int, what: str) -> int:
    # bool is an int in Python but not in JSON
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(path, f"expected an integer ({what}), found {_kind(value)}")
    if not 0 <= value < limit:
        raise _Invalid(path, f"{value} is out of range for {what} (0 .. {limit - 1})")
    return value


def _opt_int(value: object, path: str, limit: int, what: str) -> int | None:
    return None if value is None else _int(value, path, limit, what)


def _str(value: object, path: str, *, empty_ok: bool = False) -> str:
    if not isinstance(value, str):
        raise _Invalid(path, f"expected a string, found {_kind(value)}")
    if not value and not empty_ok:
        raise _Invalid(path, "must not be empty")
    if "\0" in value:
        raise _Invalid(path, "contains a NUL character")
    if not value.isascii():
        # a JSON escape can hold a lone surrogate: no UTF-8 encoder (D-Bus, the LUO session
        # name, the manifest's own writer) takes it
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            raise _Invalid(path, "not valid Unicode (a lone surrogate)") from err
    return value


def _opt_str(value: object, path: str) -> str | None:
    return None if value is None else _str(value, path)


def _name(value: object, path: str, max_bytes: int) -> str:
    text = _str(value, path)
    length = len(text.encode("utf-8"))
    if length > max_bytes:
        raise _Invalid(path, f"name is {length} bytes long, the limit is {max_bytes}")
    return text


def _list(value: object, path: str) -> list[object]:
    if not isinstance(value, list):
        raise _Invalid(path, f"expected an array, found {_kind(value)}")
    return value


def _str_map(value: object, path: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise _Invalid(path, f"expected an object, found {_kind(value)}")
    out: dict[str, str] = {}
    for key, item in value.items():
        _str(key, f"{path}.{key}")
        out[key] = _str(item, f"{path}.{key}")
    return out


def _created(value: object, path: str) -> str:
    text = _str(value, path)
    try:
        stamp = datetime.fromisoformat(text)
    except ValueError as err:
        raise _Invalid(path, f"{text!r} is not an ISO 8601 timestamp") from err
    if stamp.utcoffset() != timedelta(0):
        raise _Invalid(path, f"{text!r} is not in UTC (expected a Z or +00:00 suffix)")
    return text


def _seconds(value: object, path: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid(path, f"expected a number of seconds, found {_kind(value)}")
    if not math.isfinite(value) or value < 0:
        raise _Invalid(path, f"{value} is not a duration (must be finite and >= 0)")
    return float(value)


def _parse_file(value: object, path: str, digests_on: bool) -> FileEntry:
    obj = _obj(value, path, ("token", "size", "digest", "digest_alg", "digest_seconds", "seals"))
    token = _int(obj["token"], f"{path}.token", U64_LIMIT, "a u64 token")
    size = _int(obj["size"], f"{path}.size", U64_LIMIT, "a size in bytes")
    alg = _opt_str(obj["digest_alg"], f"{path}.digest_alg")
    digest = _opt_str(obj["digest"], f"{path}.digest")
    if alg is not None and alg not in DIGEST_HEX_LENGTHS:
        raise _Invalid(f"{path}.digest_alg", f"unknown digest algorithm {alg!r} (known: "
                                             f"{', '.join(sorted(DIGEST_HEX_LENGTHS))})")
    if (digest is None) != (alg is None):
        missing = "digest_alg" if alg is None else "digest"
        raise _Invalid(f"{path}.{missing}", "digest and digest_alg must both be set or both null")
    if digest is not None and alg is not None:
        want = DIGEST_HEX_LENGTHS[alg]
        if len(digest) != want or not _LOWER_HEX.fullmatch(digest):
            raise _Invalid(f"{path}.digest", f"expected {want} lowercase hex digits for {alg}")
        if not digests_on:
            raise _Invalid(f"{path}.digest", "a digest is recorded but the session did not opt "
                                             "in to digests")
    return FileEntry(token=token, size=size, digest=digest, digest_alg=alg,
                     digest_seconds=_seconds(obj["digest_seconds"], f"{path}.digest_seconds"),
                     seals=_opt_int(obj["seals"], f"{path}.seals", U32_LIMIT, "u32 seal bits"))


_SESSION_KEYS = ("name", "owner", "files", "ready", "digests")


def _parse_session(value: object, path: str) -> SessionEntry:
    optional = ("owner_fd_store",) if isinstance(value, dict) and "owner_fd_store" in value \
        else ()
    obj = _obj(value, path, _SESSION_KEYS + optional)
    name = _name(obj["name"], f"{path}.name", SESSION_NAME_MAX_BYTES)
    digests = _bool(obj["digests"], f"{path}.digests")
    files = [_parse_file(item, f"{path}.files[{i}]", digests)
             for i, item in enumerate(_list(obj["files"], f"{path}.files"))]
    _unique([f.token for f in files], f"{path}.files", "token", "token")
    return SessionEntry(name=name, owner=_str(obj["owner"], f"{path}.owner"), files=files,
                        ready=_bool(obj["ready"], f"{path}.ready"), digests=digests,
                        owner_fd_store=_bool(obj.get("owner_fd_store", False),
                                             f"{path}.owner_fd_store"))


def _parse_subtree(value: object, path: str) -> SubtreeEntry:
    obj = _obj(value, path, ("name", "size", "compatible"))
    name = _name(obj["name"], f"{path}.name", SUBTREE_NAME_MAX_BYTES)
    if "/" in name:
        raise _Invalid(f"{path}.name", "a KHO subtree name cannot contain '/'")
    return SubtreeEntry(name=name,
                        size=_opt_int(obj["size"], f"{path}.size", U64_LIMIT, "a size in bytes"),
                        compatible=_opt_str(obj["compatible"], f"{path}.compatible"))


def _unique(values: list[object], path: str, key: str, what: str) -> None:
    seen: dict[object, int] = {}
    for i, value in enumerate(values):
        if value in seen:
            raise _Invalid(f"{path}[{i}].{key}", f"duplicate {what} {value!r} (also at "
                                                 f"{path}[{seen[value]}])")
        seen[value] = i


def _network(value: object, path: str) -> dict[str, object] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Invalid(path, f"expected an object or null, found {_kind(value)}")
    try:
        NetState.from_json(value)
    except NetStateFormatError as err:
        raise _Invalid(f"{path}.{err.path}" if err.path else path, err.problem) from err
    return value


MANIFEST_KEYS = ("schema", "created", "host", "release_from", "release_to", "boot_id_from",
                 "abi_from", "abi_to", "cmdline_to", "scratch", "liveupdate_number_from",
                 "liveupdate_number_expected", "sessions", "subtrees", "network", "final")


def _parse_manifest(value: object) -> Manifest:
    if not isinstance(value, dict):
        raise _Invalid("$", f"expected an object, found {_kind(value)}")
    # The version first: a manifest from another version should say so, not list field errors.
    if "schema" not in value:
        raise _Invalid("$.schema", "required field is missing")
    schema = value["schema"]
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise _Invalid("$.schema", f"manifest schema {schema!r} is not the one this kho-agent "
                                   f"reads ({SCHEMA_VERSION}); it was written by another "
                                   "version")
    obj = _obj(value, "$", MANIFEST_KEYS)
    scratch = obj["scratch"]
    if not isinstance(scratch, dict):
        raise _Invalid("$.scratch", f"expected an object, found {_kind(scratch)}")
    sessions = [_parse_session(item, f"$.sessions[{i}]")
                for i, item in enumerate(_list(obj["sessions"], "$.sessions"))]
    _unique([s.name for s in sessions], "$.sessions", "name", "session name")
    subtrees = [_parse_subtree(item, f"$.subtrees[{i}]")
                for i, item in enumerate(_list(obj["subtrees"], "$.subtrees"))]
    _unique([t.name for t in subtrees], "$.subtrees", "name", "subtree name")
    return Manifest(
        schema=SCHEMA_VERSION,
        created=_created(obj["created"], "$.created"),
        host=_str(obj["host"], "$.host"),
        release_from=_str(obj["release_from"], "$.release_from"),
        release_to=_str(obj["release_to"], "$.release_to"),
        boot_id_from=_str(obj["boot_id_from"], "$.boot_id_from"),
        abi_from=_str_map(obj["abi_from"], "$.abi_from"),
        abi_to=_str_map(obj["abi_to"], "$.abi_to"),
        cmdline_to=_str(obj["cmdline_to"], "$.cmdline_to", empty_ok=True),
        scratch=dict(scratch),
        liveupdate_number_from=_opt_int(obj["liveupdate_number_from"],
                                        "$.liveupdate_number_from", U64_LIMIT, "a u64"),
        liveupdate_number_expected=_opt_int(obj["liveupdate_number_expected"],
                                            "$.liveupdate_number_expected", U64_LIMIT, "a u64"),
        sessions=sessions,
        subtrees=subtrees,
        network=_network(obj["network"], "$.network"),
        final=_bool(obj["final"], "$.final"),
    )


# --- files --------------------------------------------------------------------------------------

def _advice_for(err: OSError, directory: Path) -> str:
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return (f"free space on the filesystem holding {directory} (or raise the quota) and "
                "retry")
    if code == errno.EROFS:
        return (f"{directory} is on a read-only filesystem; remount it read-write or use a "
                "state directory on a writable filesystem")
    if code in (errno.EACCES, errno.EPERM):
        return f"the agent may not write in {directory}; run it as root or fix the permissions"
    if code == errno.ENOENT:
        return f"the directory {directory} does not exist; create it and retry"
    if code == errno.EIO:
        return "the storage reported an I/O error; check the kernel log (dmesg) and the disk"
    return f"check the state directory {directory} and retry"


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so that a crash or an error leaves the old or the new content,
    never a mix: a temporary file in the same directory, written, fsynced, renamed over `path`,
    then the directory fsynced. On failure the old file is intact and the temporary file gone;
    the error is a KernelRefused carrying the errno and what to do."""
    directory = path.parent
    tmp: str | None = None
    renamed = False
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fchmod(fd, mode)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        renamed = True
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        if tmp is not None and not renamed:
            # Best effort: the error worth reporting is the one that stopped the write.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        code = err.errno if err.errno is not None else errno.EIO
        if renamed:
            advice = (f"the new {path.name} is in place but may not survive a crash; "
                      + _advice_for(err, directory))
        else:
            advice = f"{path} was left as it was; " + _advice_for(err, directory)
        raise KernelRefused(f"writing {path}", code, advice) from err


def read_manifest(path: Path) -> Manifest:
    """The manifest at `path`: NotFound when nothing is there, ManifestCorrupt (a StateCorrupt)
    for anything that is not a regular file of at most MANIFEST_MAX_BYTES holding a valid
    manifest. It is opened with O_PATH first (kernel/callerfile.py): a FIFO or a device there
    is refused without blocking, and nothing larger than the bound is read."""
    source = f"manifest {path}"
    try:
        data = read_if_present(path, "manifest", MANIFEST_MAX_BYTES, allow_empty=True)
    except AgentError as err:  # not a regular file, too large, unreadable: the message says
        raise ManifestCorrupt("$", err.message, source=source) from err
    if data is None:
        raise NotFound(f"no manifest at {path}: no live update was prepared on this host "
                       "(run `kho-agentctl prepare` first)")
    if isinstance(data, Dangling):
        raise ManifestCorrupt("$", "it is a symbolic link to a file that does not exist",
                              source=source)
    try:
        return manifest_from_json(data)
    except ManifestCorrupt as err:
        raise ManifestCorrupt(err.json_path, err.problem, source=source) from err


def manifest_memfd(m: Manifest) -> int:
    """A memfd holding the manifest's JSON, sealed against any change of content or size.
    The caller owns the returned fd (MFD_CLOEXEC)."""
    data = manifest_to_json(m)
    try:
        fd = os.memfd_create("kho-agent-manifest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as err:
        code = err.errno if err.errno is not None else errno.EIO
        raise KernelRefused("memfd_create for the manifest", code,
                            "the manifest could not be put in memory for the handover") from err
    try:
        view = memoryview(data)
        offset = 0
        while offset < len(data):
            offset += os.pwrite(fd, view[offset:], offset)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MANIFEST_SEALS)
    except OSError as err:
        os.close(fd)
        code = err.errno if err.errno is not None else errno.EIO
        raise KernelRefused("writing and sealing the manifest memfd", code,
                            "the manifest could not be put in memory for the handover") from err
    return fd


def manifest_from_fd(fd: int) -> Manifest:
    """Read a manifest from an fd (the memfd retrieved from the agent's session) from offset 0,
    without moving the file position."""
    source = f"manifest memfd (fd {fd})"
    try:
        size = os.fstat(fd).st_size
        if size > MANIFEST_MAX_BYTES:
            raise ManifestCorrupt("$", f"{size} bytes is too large to be a manifest", source)
        chunks: list[bytes] = []
        offset = 0
        while offset < size:
            chunk = os.pread(fd, size - offset, offset)
            if not chunk:
                break
            chunks.append(chunk)
            offset += len(chunk)
    except OSError as err:
        code = err.errno if err.errno is not None else errno.EIO
        raise KernelRefused(f"reading the {source}", code,
                            "verify against the manifest in the state directory instead") from err
    try:
        return manifest_from_json(b"".join(chunks))
    except ManifestCorrupt as err:
        raise ManifestCorrupt(err.json_path, err.problem, source=source) from err


# --- observation and verification ---------------------------------------------------------------

@dataclass
class ObservedFile:
    token: int
    size: int
    digest: str | None          # same algorithm as the manifest's entry
    seals: int | None
    error: str | None           # RETRIEVE_FD failed: why


@dataclass
class ObservedSession:
    name: str
    files: list[ObservedFile] | None    # None: could not retrieve (error says why)
    error: str | None


@dataclass
class Observation:
    boot_id: str
    release: str
    kho_boot: bool                       # incoming KHO FDT present
    liveupdate_number: int | None
    previous_release: str | None         # from kexec-metadata
    abi: dict[str, str]
    sessions: list[ObservedSession]
    subtrees: list[SubtreeEntry]
    network: dict[str, object] | None
    disk_manifest_matches_memfd: bool | None


class Verdict(enum.Enum):
    OK = "ok"
    MISMATCH = "mismatch"       # present, but differs from what was recorded
    MISSING = "missing"         # recorded, not found after the update
    EXTRA = "extra"             # found, not recorded (information)
    UNCHECKED = "unchecked"     # could not or need not be compared (information)
    FAILED = "failed"           # a proof did not hold, or something could not be retrieved


FAILING_VERDICTS = frozenset({Verdict.MISMATCH, Verdict.MISSING, Verdict.FAILED})


@dataclass
class VerifyItem:
    kind: str       # proof, abi, manifest, session, file, file-size, file-digest, file-seals,
                    # subtree, subtree-size, subtree-compatible, network
    name: str
    verdict: Verdict
    expected: object
    observed: object
    detail: str


@dataclass
class VerifyReport:
    items: list[VerifyItem]
    ok: bool          # no MISMATCH, MISSING or FAILED item

    def failures(self) -> list[VerifyItem]:
        return [item for item in self.items if item.verdict in FAILING_VERDICTS]

    def to_json(self) -> dict[str, object]:
        counts = {v.value: 0 for v in Verdict}
        for item in self.items:
            counts[item.verdict.value] += 1
        return {
            "ok": self.ok,
            "counts": counts,
            "items": [{"kind": i.kind, "name": i.name, "verdict": i.verdict.value,
                       "expected": i.expected, "observed": i.observed, "detail": i.detail}
                      for i in self.items],
        }


def _seals_text(seals: int) -> str:
    return f"0x{seals:x}"


class _Report:
    def __init__(self) -> None:
        self.items: list[VerifyItem] = []

    def add(self, kind: str, name: str, verdict: Verdict, expected: object, observed: object,
            detail: str) -> None:
        self.items.append(VerifyItem(kind, name, verdict, expected, observed, detail))


def _check_proof(m: Manifest, obs: Observation, r: _Report) -> None:
    if obs.boot_id != m.boot_id_from:
        r.add("proof", "boot_id", Verdict.OK, f"not {m.boot_id_from}", obs.boot_id,
              "This is a new boot: the boot id changed since the manifest was written.")
    else:
        r.add("proof", "boot_id", Verdict.FAILED, f"not {m.boot_id_from}", obs.boot_id,
              "The boot id is the one recorded at prepare: this host has not rebooted since. "
              "Run verify after the live update.")
    if obs.kho_boot:
        r.add("proof", "kho_boot", Verdict.OK, True, True,
              "This boot came through KHO: the previous kernel's handover was found.")
    else:
        r.add("proof", "kho_boot", Verdict.FAILED, True, False,
              "This boot did not come through KHO: no incoming handover was found (a cold "
              "reboot, a kexec loaded without kexec_file_load, or the new kernel rejected the "
              "handover). Preserved memory and sessions did not survive.")

    expected_n, observed_n = m.liveupdate_number_expected, obs.liveupdate_number
    if expected_n is None:
        r.add("proof", "liveupdate_number", Verdict.UNCHECKED, None, observed_n,
              "No liveupdate number was recorded at prepare, so it cannot be compared.")
    elif observed_n is None:
        r.add("proof", "liveupdate_number", Verdict.UNCHECKED, expected_n, None,
              "The liveupdate number of this boot could not be read (the kernel only logs it "
              "at boot: 'luo: Retrieved live update data, liveupdate number: N').")
    elif observed_n == expected_n:
        r.add("proof", "liveupdate_number", Verdict.OK, expected_n, observed_n,
              f"The liveupdate number is {observed_n}, as expected after this live update.")
    else:
        r.add("proof", "liveupdate_number", Verdict.MISMATCH, expected_n, observed_n,
              f"The liveupdate number is {observed_n}, not the expected {expected_n}: this boot "
              "is not the one that follows the recorded live update (another kexec happened "
              "in between, or the LUO state was not carried).")

    if obs.previous_release is None:
        r.add("proof", "previous_release", Verdict.UNCHECKED, m.release_from, None,
              "The previous kernel's release could not be read from the kexec metadata.")
    elif obs.previous_release == m.release_from:
        r.add("proof", "previous_release", Verdict.OK, m.release_from, obs.previous_release,
              f"The kexec metadata names {obs.previous_release} as the previous kernel, the "
              "one the manifest was written on.")
    else:
        r.add("proof", "previous_release", Verdict.MISMATCH, m.release_from,
              obs.previous_release,
              f"The kexec metadata names {obs.previous_release} as the previous kernel, but "
              f"the manifest was written on {m.release_from}: another kernel ran in between.")

    if obs.release == m.release_to:
        r.add("proof", "release", Verdict.OK, m.release_to, obs.release,
              f"The running kernel is {obs.release}, the target recorded at prepare.")
    else:
        r.add("proof", "release", Verdict.MISMATCH, m.release_to, obs.release,
              f"The running kernel is {obs.release}, not the target {m.release_to} recorded "
              "at prepare: a different kernel was booted.")


def _check_abi(m: Manifest, obs: Observation, r: _Report) -> None:
    for contract in sorted(m.abi_to):
        want = m.abi_to[contract]
        have = obs.abi.get(contract)
        if have is None:
            r.add("abi", contract, Verdict.UNCHECKED, want, None,
                  f"The {contract} ABI version of the running kernel could not be determined; "
                  f"{want} was expected.")
        elif have == want:
            r.add("abi", contract, Verdict.OK, want, have,
                  f"The running kernel speaks {have} for {contract}, as predicted at prepare.")
        else:
            r.add("abi", contract, Verdict.MISMATCH, want, have,
                  f"The running kernel speaks {have} for {contract}, but {want} was predicted "
                  "at prepare: the booted kernel is not the one that was checked.")
    for contract in sorted(set(obs.abi) - set(m.abi_to)):
        r.add("abi", contract, Verdict.EXTRA, None, obs.abi[contract],
              f"The running kernel also speaks {obs.abi[contract]} ({contract}), which the "
              "manifest did not record.")


def _check_seals(label: str, want: int | None, have: int | None, r: _Report) -> None:
    if want is None or have is None:
        r.add("file-seals", label, Verdict.UNCHECKED, want, have,
              f"Seals of {label} were not recorded on both sides, so they were not compared.")
    elif want == have:
        r.add("file-seals", label, Verdict.OK, want, have,
              f"Seals of {label} are {_seals_text(have)}, as before.")
    elif want & F_SEAL_EXEC and have == want | EXEC_IMPLIED_SEALS:
        r.add("file-seals", label, Verdict.OK, want, have,
              f"Seals of {label} came back as {_seals_text(have)} instead of "
              f"{_seals_text(want)}: the kernel adds the write seals when it restores a memfd "
              "sealed with F_SEAL_EXEC (MFD_NOEXEC_SEAL). Expected kernel behaviour, but the "
              "restored file can no longer be written or mapped writable.")
    else:
        r.add("file-seals", label, Verdict.MISMATCH, want, have,
              f"Seals of {label} are {_seals_text(have)}, not {_seals_text(want)} as "
              "recorded: the file's write or size protection changed across the update.")


def _check_file(session: SessionEntry, entry: FileEntry, got: ObservedFile | None,
                r: _Report) -> None:
    label = f"{session.name}/{entry.token}"
    if got is None:
        r.add("file", label, Verdict.MISSING, entry.size, None,
              f"Token {entry.token} of session {session.name} did not come back: its "
              f"{entry.size} bytes are lost.")
        return
    if got.error is not None:
        r.add("file", label, Verdict.FAILED, entry.size, None,
              f"Token {entry.token} of session {session.name} could not be retrieved: "
              f"{got.error}.")
        return
    r.add("file", label, Verdict.OK, "present", "present",
          f"Token {entry.token} of session {session.name} was retrieved.")
    if got.size == entry.size:
        r.add("file-size", label, Verdict.OK, entry.size, got.size,
              f"{label} is {got.size} bytes, as before.")
    else:
        r.add("file-size", label, Verdict.MISMATCH, entry.size, got.size,
              f"{label} is {got.size} bytes, but {entry.size} were preserved.")
    if entry.digest is None or got.digest is None:
        if not session.digests:
            why = "digests are off for this session"
        elif entry.digest is None:
            why = "no digest was taken before the update"
        else:
            why = "no digest was taken after the update"
        r.add("file-digest", label, Verdict.UNCHECKED, entry.digest, got.digest,
              f"Content of {label} was not compared: {why}.")
    elif entry.digest == got.digest:
        r.add("file-digest", label, Verdict.OK, entry.digest, got.digest,
              f"Content of {label} is identical ({entry.digest_alg} digest matches).")
    else:
        r.add("file-digest", label, Verdict.MISMATCH, entry.digest, got.digest,
              f"Content of {label} differs from what was preserved ({entry.digest_alg} "
              "digest mismatch): the data changed after the digest was taken, or was "
              "corrupted in the handover.")
    _check_seals(label, entry.seals, got.seals, r)


def _check_session(entry: SessionEntry, got: ObservedSession | None, r: _Report) -> None:
    count = len(entry.files)
    if got is None and entry.owner_fd_store:
        r.add("session", entry.name, Verdict.UNCHECKED, count, None,
              f"Session {entry.name} ({count} files, owner {entry.owner}) is kept in its "
              "owner's fd store: systemd hands it to the owner's service after the update, "
              "the agent does not retrieve or check it.")
        return
    if got is None:
        r.add("session", entry.name, Verdict.MISSING, count, None,
              f"Session {entry.name} ({count} files, owner {entry.owner}) did not come back "
              "after the update.")
        return
    if got.files is None:
        why = got.error or "no reason given"
        r.add("session", entry.name, Verdict.FAILED, count, None,
              f"Session {entry.name} could not be retrieved: {why}.")
        return
    r.add("session", entry.name, Verdict.OK, count, len(got.files),
          f"Session {entry.name} was retrieved.")
    by_token = {f.token: f for f in got.files}
    for item in entry.files:
        _check_file(entry, item, by_token.get(item.token), r)
    recorded = {f.token for f in entry.files}
    for extra in got.files:
        if extra.token not in recorded:
            r.add("file", f"{entry.name}/{extra.token}", Verdict.EXTRA, None, extra.size,
                  f"Session {entry.name} holds token {extra.token}, which the manifest did not "
                  "record.")


def check_session(entry: SessionEntry, got: ObservedSession) -> list[VerifyItem]:
    """The items of one recorded session against what was read of it (a session its owner kept
    in its own fd store and handed in after the update). Pure."""
    report = _Report()
    _check_session(entry, got, report)
    return report.items


def _check_agent_session(got: ObservedSession, r: _Report) -> None:
    """The agent's own session, when the observer reports it and the manifest does not list it
    (it cannot record the memfd that holds itself): it must be back with the manifest memfd at
    token 0. Whether that copy was usable is the `manifest copies` item."""
    if got.files is None:
        r.add("session", AGENT_SESSION, Verdict.FAILED, "present", None,
              f"The agent's own session {AGENT_SESSION} could not be retrieved: "
              f"{got.error or 'no reason given'}.")
        return
    tokens = {f.token: f for f in got.files}
    manifest_file = tokens.get(MANIFEST_TOKEN)
    if manifest_file is None:
        r.add("file", f"{AGENT_SESSION}/{MANIFEST_TOKEN}", Verdict.MISSING, "present", None,
              f"The manifest memfd (token {MANIFEST_TOKEN}) is missing from the agent's "
              "session.")
    elif manifest_file.error is not None:
        r.add("file", f"{AGENT_SESSION}/{MANIFEST_TOKEN}", Verdict.FAILED, "present", None,
              f"The manifest memfd could not be retrieved: {manifest_file.error}.")
    else:
        r.add("session", AGENT_SESSION, Verdict.OK, "present", "present",
              f"The agent's own session came back with the manifest memfd ({manifest_file.size} "
              "bytes).")
    for extra in got.files:
        if extra.token != MANIFEST_TOKEN:
            r.add("file", f"{AGENT_SESSION}/{extra.token}", Verdict.EXTRA, None, extra.size,
                  f"The agent's session holds token {extra.token}, which it did not put there.")


def _check_sessions(m: Manifest, obs: Observation, r: _Report) -> None:
    observed = {s.name: s for s in obs.sessions}
    recorded = {s.name for s in m.sessions}
    for entry in m.sessions:
        _check_session(entry, observed.get(entry.name), r)
    if AGENT_SESSION not in recorded and AGENT_SESSION in observed:
        _check_agent_session(observed[AGENT_SESSION], r)
    for got in obs.sessions:
        if got.name not in recorded and got.name != AGENT_SESSION:
            files = "could not be retrieved" if got.files is None else f"{len(got.files)} files"
            r.add("session", got.name, Verdict.EXTRA, None,
                  None if got.files is None else len(got.files),
                  f"Session {got.name} ({files}) came back but is not in the manifest: it was "
                  "created outside the prepared live update.")


LUO_SUBTREE = "LUO"


def _check_subtrees(m: Manifest, obs: Observation, r: _Report) -> None:
    observed = {t.name: t for t in obs.subtrees}
    if m.subtrees and not observed:
        for entry in m.subtrees:
            r.add("subtree", entry.name, Verdict.UNCHECKED, entry.size, None,
                  f"No incoming KHO subtrees were visible, so {entry.name} was not checked "
                  "(debugfs not mounted, or the kernel lacks KEXEC_HANDOVER_DEBUGFS).")
        return
    for entry in m.subtrees:
        got = observed.get(entry.name)
        if got is None:
            r.add("subtree", entry.name, Verdict.MISSING, entry.size, None,
                  f"KHO subtree {entry.name} was handed over by the previous kernel but is not "
                  "in the incoming handover.")
            continue
        luo_note = (" Its content is not checked: the kernel frees the LUO blob at boot, and "
                    "the sessions are checked through /dev/liveupdate instead."
                    if entry.name == LUO_SUBTREE else "")
        r.add("subtree", entry.name, Verdict.OK, "present", "present",
              f"KHO subtree {entry.name} arrived.{luo_note}")
        if entry.size is None or got.size is None:
            r.add("subtree-size", entry.name, Verdict.UNCHECKED, entry.size, got.size,
                  f"The size of KHO subtree {entry.name} was not known on both sides.")
        elif entry.size == got.size:
            r.add("subtree-size", entry.name, Verdict.OK, entry.size, got.size,
                  f"KHO subtree {entry.name} is {got.size} bytes, as handed over.")
        else:
            r.add("subtree-size", entry.name, Verdict.MISMATCH, entry.size, got.size,
                  f"KHO subtree {entry.name} is {got.size} bytes, but {entry.size} were handed "
                  "over: it changed after the manifest was written.")
        if entry.compatible is not None and got.compatible is not None:
            verdict = Verdict.OK if entry.compatible == got.compatible else Verdict.MISMATCH
            text = ("as handed over" if verdict is Verdict.OK
                    else f"but {entry.compatible} was handed over")
            r.add("subtree-compatible", entry.name, verdict, entry.compatible, got.compatible,
                  f"KHO subtree {entry.name} is {got.compatible}, {text}.")
    recorded = {t.name for t in m.subtrees}
    for got in obs.subtrees:
        if got.name not in recorded:
            r.add("subtree", got.name, Verdict.EXTRA, None, got.size,
                  f"KHO subtree {got.name} arrived but was not recorded in the manifest.")


def _check_network(m: Manifest, obs: Observation, r: _Report) -> None:
    if m.network is None or obs.network is None:
        side = "before" if m.network is None else "after"
        r.add("network", "state", Verdict.UNCHECKED, m.network is not None,
              obs.network is not None,
              f"The network configuration was not recorded {side} the update, so it was not "
              "compared.")
        return
    try:
        changes = netstate_diff(m.network, obs.network)
    except NetStateFormatError as err:
        r.add("network", "state", Verdict.UNCHECKED, None, None,
              f"The observed network state is unreadable ({err}), so it was not compared.")
        return
    if not changes:
        r.add("network", "state", Verdict.OK, None, None,
              "Links, addresses and main-table routes are the same as before the update.")
    for change in changes:
        r.add("network", "change", Verdict.UNCHECKED, None, None,
              f"Network (information only): {change}.")


def _check_manifest_copies(m: Manifest, obs: Observation, r: _Report) -> None:
    same = obs.disk_manifest_matches_memfd
    if same is None:
        r.add("manifest", "copies", Verdict.UNCHECKED, True, None,
              "Only one copy of the manifest was available (disk or the agent's LUO session), "
              "so the two were not compared.")
    elif same:
        r.add("manifest", "copies", Verdict.OK, True, True,
              "The manifest on disk and the copy carried through the kexec are identical.")
    else:
        r.add("manifest", "copies", Verdict.MISMATCH, True, False,
              "The manifest on disk and the copy carried through the kexec in the agent's LUO "
              "session do not agree: the carried copy differs, or was lost or unreadable. One "
              "of them changed after the commit, or the handover damaged it.")
    if m.final:
        r.add("manifest", "final", Verdict.OK, True, True,
              "The manifest was finalised at commit.")
    else:
        r.add("manifest", "final", Verdict.UNCHECKED, True, False,
              "The manifest is the one written at prepare and was never finalised: the host "
              "kexec'd without `kho-agentctl commit` (e.g. a plain systemctl kexec), so "
              "digests taken at commit are absent.")


CHECKS: tuple[Callable[[Manifest, Observation, _Report], None], ...] = (
    _check_proof, _check_abi, _check_manifest_copies, _check_sessions, _check_subtrees,
    _check_network)


def compare_manifest(m: Manifest, obs: Observation) -> VerifyReport:
    """A verdict per item: proof of the live update, ABI, the manifest's two copies, sessions,
    tokens (size, digest, seals), KHO subtrees, network. Pure."""
    report = _Report()
    for check in CHECKS:
        check(m, obs, report)
    ok = not any(item.verdict in FAILING_VERDICTS for item in report.items)
    return VerifyReport(report.items, ok)
