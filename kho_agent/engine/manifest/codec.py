"""The manifest's JSON form, and its files: the canonical encoding, the reading that validates
everything and fails with a `StateCorrupt` naming the JSON path of the first problem (never a
KeyError), the file in the state directory and the sealed memfd carried through the kexec.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import NoReturn

from ...digest import HEX_LENGTHS
from ...errors import AgentError, InvalidArgument, KernelRefused, NotFound, StateCorrupt
from ...kernel.callerfile import Dangling, read_if_present
from ...netstate import NetState, NetStateFormatError
from .model import (
    MANIFEST_SEALS,
    SCHEMA_VERSION,
    FileEntry,
    Manifest,
    SessionEntry,
    SubtreeEntry,
)

SESSION_NAME_MAX_BYTES = 63        # LIVEUPDATE_SESSION_NAME_LENGTH (64) less the NUL
SUBTREE_NAME_MAX_BYTES = 255       # FDT node names have no kernel limit; this bounds junk
U64_LIMIT = 1 << 64
U32_LIMIT = 1 << 32
# the algorithms digest.py knows (a manifest may name one this installation cannot compute:
# it is read all the same, and its verification says so)
DIGEST_HEX_LENGTHS = HEX_LENGTHS
_LOWER_HEX = re.compile(r"[0-9a-f]*")
MANIFEST_MAX_BYTES = 256 << 20     # measured: 10k files 1.7-3 MB, 100k files 17 MB; refuses junk

CORRUPT_ADVICE = ("Nothing was changed. Verify against the other copy of the manifest (state "
                  "directory or the agent's LUO session) if it is intact; before a live update, "
                  "run prepare again to write a new one")


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
