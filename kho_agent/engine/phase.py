"""The engine's persisted state: where it was, in which boot, and what it last concluded.

Written atomically on every transition (write, fsync, rename, fsync the directory) so that a
restart, or the next kernel after the kexec, knows where things stood.

Reading it back trusts nothing about what is found at the path: a directory, a FIFO (an open
for reading would block until a writer comes), a device, a socket, a symlink to any of those, a
dangling symlink or a symlink loop, a file too large to be a state, bytes that are not UTF-8
JSON, JSON nested deeply enough to exhaust the parser's recursion, or valid JSON with a field of
the wrong type are all a `StateCorrupt` naming the file and the first problem, never another
exception and never a guess. The file is opened with O_PATH first (kernel/callerfile.py), so
nothing but a regular file is ever opened for reading, and the read is bounded. Only nothing at
all at the path is "no state" (a first start): a dangling symlink is corrupt like the rest, as
it may name a state on a filesystem that is not mounted yet, and starting afresh would replace
the link with a new file. A symlink to a regular file is read through.

A state file found corrupt is moved aside (the entry itself: a symlink as the symlink, a
directory as the directory) under a name that never replaces an earlier aside file, and the
agent starts from what it can prove (recovery.py). If it cannot be moved (a read-only
directory, an immutable file), it is left in place and never written over: every save first
tries the move again and refuses while it fails, so nothing is persisted (and no update can be
prepared) until the evidence is kept.

The same reading rules apply to the verification record (`last-verify.json`), which tells a
restart whether this boot was verified already when the state itself is lost.
"""

from __future__ import annotations

import ctypes
import enum
import errno
import functools
import json
import math
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from ..errors import AgentError, StateCorrupt, StorageFailed, errno_text
from ..kernel.atomicfile import write_atomic
from ..kernel.callerfile import Dangling, file_kind, read_if_present
from .manifest.compare import FAILING_VERDICTS, Verdict

STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
LAST_VERIFY_FILE = "last-verify.json"
HISTORY_KEPT = 20
# Measured: 10k sessions both awaiting and discarded, a 4000-character target and every one of
# the 20 kept history messages naming all 10k sessions is 16 MB (indented). Four times that.
STATE_MAX_BYTES = 64 << 20
# Measured: the full verification report of 10k files is 12 MB, of 100k files 121 MB.
LAST_VERIFY_MAX_BYTES = 512 << 20
# The state nests 4 levels (root, last_result, failures, a failure), the report 3: anything
# deeper is not ours, and it is refused before any consumer recurses into it.
MAX_NESTING = 16
ASIDE_ATTEMPTS = 1000   # distinct aside names tried within one microsecond stamp


class Phase(enum.Enum):
    IDLE = "idle"
    PREPARING = "preparing"
    PREPARED = "prepared"
    COMMITTING = "committing"
    VERIFYING = "verifying"
    VERIFIED = "verified"
    FAILED = "failed"
    CANCELLING = "cancelling"


@dataclass
class Target:
    kernel: str
    initrd: str | None
    cmdline: str


@dataclass
class AgentState:
    phase: Phase = Phase.IDLE
    boot_id: str = ""            # the boot in which this state was written
    updated: str = ""
    message: str = ""
    target: Target | None = None
    loaded_by_us: bool = False   # the kexec image is ours to unload on cancel
    last_result: dict[str, Any] | None = None
    handoff_seconds: float | None = None
    # the wall clock (Unix time) just before the kexec: the blackout the history records after
    # the kexec is measured from it (kept here, as the state is written there anyway)
    committed_at: float | None = None
    # incoming sessions of this boot finished unclaimed (their memory discarded), for owners
    # that come after the grace period
    discarded: list[str] = field(default_factory=list)
    # incoming sessions retrieved by verify and not yet claimed by their owners: if the agent
    # stops, they close with it (and the kernel finishes them), so a restart reports them lost
    awaiting: list[str] = field(default_factory=list)
    history: list[dict[str, str]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["phase"] = self.phase.value
        return out


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# --- what was found ----------------------------------------------------------------------------

@dataclass
class Aside:
    """A corrupt entry of the state directory, and where it was kept."""

    path: Path                  # where it was found
    problem: str                # why it cannot be read back
    aside: Path | None          # where it is now; None: it could not be moved
    move_problem: str | None    # why it could not be moved

    def describe(self) -> str:
        if self.aside is not None:
            return f"{self.problem}; kept as {self.aside}"
        return (f"{self.problem}; it could not be moved aside ({self.move_problem}) and was "
                "left in place")


@dataclass
class Loaded:
    """What `StateStore.load_or_set_aside` found."""

    state: AgentState
    found: bool                 # a state file was there (read, or corrupt)
    corrupt: Aside | None


@dataclass
class VerifyRecord:
    """The part of `last-verify.json` a restart relies on."""

    path: Path
    boot_id: str                # the boot that verification ran in
    ok: bool
    counts: dict[str, int]
    failures: list[dict[str, str]]  # kind, name, verdict, detail of each failing item

    def summary(self, max_failures: int) -> dict[str, Any]:
        """The `last_result` that verification stored in the state (verify._summary)."""
        return {"result": "verified" if self.ok else "failed", "ok": self.ok,
                "counts": {k: v for k, v in self.counts.items() if v},
                "failures": self.failures[:max_failures],
                "failures_total": len(self.failures), "report": str(self.path)}


# --- reading any shape -------------------------------------------------------------------------

def read_back(path: Path, what: str, limit: int, *,
              follow_symlinks: bool = True) -> bytes | None:
    """The bytes of a file the agent wrote, or None when nothing is at `path`. Anything else
    than a regular file of at most `limit` bytes is a StateCorrupt saying what was found; the
    open never blocks and nothing but a regular file is opened. `follow_symlinks=False`: a
    symbolic link at `path` is one of those (a StateCorrupt), even one to a regular file."""
    try:
        data = read_if_present(path, what, limit, follow_symlinks=follow_symlinks)
    except AgentError as exc:  # not a regular file, too large, empty, unreadable: it says which
        raise StateCorrupt(exc.message) from exc
    if isinstance(data, Dangling):
        raise StateCorrupt(f"{what} {path} is a symbolic link to {data.target!r}, which does "
                           "not exist")
    return data  # None: nothing there (or the state directory itself is missing)


class _Bad(Exception):
    """Internal: the first problem of a document, before it becomes a StateCorrupt."""

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise ValueError(f"the key {key!r} appears more than once in an object")
            seen.add(key)
    return obj


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


def decode_json(raw: bytes, label: str) -> object:
    """Strict UTF-8 JSON (json.loads alone would also take UTF-16 and UTF-32, NaN, Infinity, a
    number out of range as infinity, and repeated keys); StateCorrupt naming `label`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StateCorrupt(f"{label} is not UTF-8 text (byte {exc.start})") from exc
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                          parse_float=_finite)
    except RecursionError as exc:
        raise StateCorrupt(f"{label} is nested too deeply to be JSON the agent wrote") from exc
    except json.JSONDecodeError as exc:
        raise StateCorrupt(f"{label} is not JSON ({exc.msg} at line {exc.lineno} column "
                           f"{exc.colno}); a write was torn or the file was edited") from exc
    except ValueError as exc:  # our hooks, or an integer of more than 4300 digits
        raise StateCorrupt(f"{label} is not JSON the agent wrote: {exc}") from exc


def _check_text(text: str, where: str) -> None:
    # The state's strings go out as D-Bus strings and sd_notify STATUS=: both need valid UTF-8
    # without NUL. A JSON escape can hold a lone surrogate, which no UTF-8 encoder takes.
    if "\0" in text:
        raise _Bad(where, "a string contains a NUL character")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _Bad(where, "a string is not valid Unicode (a lone surrogate)") from exc


def _check_tree(value: object) -> None:
    """Bounded nesting and clean strings everywhere, before any field is looked at. Iterative:
    the walk itself must not be what recurses too deeply."""
    stack: list[tuple[object, str, int]] = [(value, "$", 1)]
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_NESTING:
            raise _Bad(where, f"nested more than {MAX_NESTING} levels deep")
        if isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, dict):
            for key, sub in item.items():
                _check_text(key, where)
                stack.append((sub, f"{where}.{key}", depth + 1))
        elif isinstance(item, list):
            stack.extend((sub, f"{where}[{i}]", depth + 1) for i, sub in enumerate(item))


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    names = {str: "a string", list: "an array", dict: "an object", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _object(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise _Bad(where, f"expected an object, found {_kind(value)}")
    return value


def _required(obj: dict[str, object], key: str, where: str) -> object:
    if key not in obj:
        raise _Bad(f"{where}.{key}", "required field is missing")
    return obj[key]


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise _Bad(where, f"expected a string, found {_kind(value)}")
    return value


def _opt_text(value: object, where: str) -> str | None:
    return None if value is None else _text(value, where)


def _flag(value: object, where: str) -> bool:
    if not isinstance(value, bool):
        raise _Bad(where, f"expected true or false, found {_kind(value)}")
    return value


def _count(value: object, where: str) -> int:
    # bool is an int in Python, not in JSON
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Bad(where, f"expected an integer, found {_kind(value)}")
    if value < 0:
        raise _Bad(where, f"{value} is negative")
    return value


def _seconds(value: object, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad(where, f"expected a number of seconds or null, found {_kind(value)}")
    if not math.isfinite(value) or value < 0:
        raise _Bad(where, f"{value} is not a duration")
    return float(value)


def _list(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise _Bad(where, f"expected an array, found {_kind(value)}")
    return value


def _names(value: object, where: str) -> list[str]:
    names = [_text(item, f"{where}[{i}]") for i, item in enumerate(_list(value, where))]
    for i, name in enumerate(names):
        if not name:
            raise _Bad(f"{where}[{i}]", "an empty session name")
    return names


def _phase(value: object, where: str) -> Phase:
    text = _text(value, where)
    try:
        return Phase(text)
    except ValueError as exc:
        known = ", ".join(p.value for p in Phase)
        raise _Bad(where, f"{text[:40]!r} is not a phase (one of {known})") from exc


def _target(value: object, where: str) -> Target | None:
    if value is None:
        return None
    obj = _object(value, where)
    return Target(kernel=_text(_required(obj, "kernel", where), f"{where}.kernel"),
                  initrd=_opt_text(obj.get("initrd"), f"{where}.initrd"),
                  cmdline=_text(_required(obj, "cmdline", where), f"{where}.cmdline"))


def _counts(value: object, where: str) -> dict[str, int]:
    return {key: _count(item, f"{where}.{key}") for key, item in _object(value, where).items()}


def _failure(value: object, where: str) -> dict[str, str]:
    obj = _object(value, where)
    return {key: _text(_required(obj, key, where), f"{where}.{key}")
            for key in ("kind", "name", "verdict", "detail")}


def _failures(value: object, where: str) -> list[dict[str, str]]:
    return [_failure(item, f"{where}[{i}]") for i, item in enumerate(_list(value, where))]


# The members of last_result that the agent reads back, with their types; any other member is
# kept as it is (its nesting and strings were checked by _check_tree).
_RESULT_MEMBERS = {"result": _text, "reason": _text, "report": _text, "ok": _flag,
                   "counts": _counts, "failures": _failures, "failures_total": _count,
                   "lost_after_verify": _names}


def _last_result(value: object, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    obj = _object(value, where)
    for key, check in _RESULT_MEMBERS.items():
        if key in obj:
            check(obj[key], f"{where}.{key}")
    return dict(obj)


def _history(value: object, where: str) -> list[dict[str, str]]:
    out = []
    for i, item in enumerate(_list(value, where)):
        entry = _object(item, f"{where}[{i}]")
        out.append({key: _text(text, f"{where}[{i}].{key}") for key, text in entry.items()})
    return out


def _parse(data: object, path: Path) -> AgentState:
    """A state from its JSON form. A member this version does not know is ignored (a state
    written by a newer agent survives a downgrade); a known member of the wrong type, a missing
    phase or boot id, or anything deeper or stranger than the agent writes is a StateCorrupt."""
    try:
        _check_tree(data)
        obj = _object(data, "$")
        return AgentState(
            phase=_phase(_required(obj, "phase", "$"), "$.phase"),
            boot_id=_text(_required(obj, "boot_id", "$"), "$.boot_id"),
            updated=_text(obj.get("updated", ""), "$.updated"),
            message=_text(obj.get("message", ""), "$.message"),
            target=_target(obj.get("target"), "$.target"),
            loaded_by_us=_flag(obj.get("loaded_by_us", False), "$.loaded_by_us"),
            last_result=_last_result(obj.get("last_result"), "$.last_result"),
            handoff_seconds=_seconds(obj.get("handoff_seconds"), "$.handoff_seconds"),
            committed_at=_seconds(obj.get("committed_at"), "$.committed_at"),
            discarded=_names(obj.get("discarded", []), "$.discarded"),
            awaiting=_names(obj.get("awaiting", []), "$.awaiting"),
            history=_history(obj.get("history", []), "$.history"))
    except _Bad as exc:
        raise StateCorrupt(f"state file {path} is not a valid kho-agent state: {exc.where}: "
                           f"{exc.problem}") from exc


def _parse_record(data: object, path: Path) -> VerifyRecord:
    try:
        _check_tree(data)
        obj = _object(data, "$")
        ok = _flag(_required(obj, "ok", "$"), "$.ok")
        counts = _counts(_required(obj, "counts", "$"), "$.counts")
        boot_id = _opt_text(obj.get("boot_id"), "$.boot_id")
        failures = []
        verdicts = {v.value: v for v in Verdict}
        for i, value in enumerate(_list(_required(obj, "items", "$"), "$.items")):
            where = f"$.items[{i}]"
            item = _failure(value, where)
            verdict = verdicts.get(item["verdict"])
            if verdict is None:
                raise _Bad(f"{where}.verdict", f"{item['verdict'][:40]!r} is not a verdict")
            if verdict in FAILING_VERDICTS:
                failures.append(item)
            if boot_id is None and (item["kind"], item["name"]) == ("proof", "boot_id"):
                # reports written before the record carried its boot id: the proof item
                # observed it
                boot_id = _text(_required(_object(value, where), "observed", where),
                                f"{where}.observed")
        if boot_id is None:
            raise _Bad("$", "the report does not say which boot it verified")
        if ok != (not failures):
            raise _Bad("$.ok", f"says {str(ok).lower()}, but {len(failures)} items failed")
        return VerifyRecord(path, boot_id, ok, counts, failures)
    except _Bad as exc:
        raise StateCorrupt(f"verification record {path} is not valid: {exc.where}: "
                           f"{exc.problem}") from exc


# --- writing what reading accepts ---------------------------------------------------------------

def _clean(value: Any) -> Any:
    """The state as its file holds it: text that could not be read back (a lone surrogate from
    a file name that is not UTF-8, a NUL) is written as escapes, a number that is not finite as
    null. Only the file changes; the state in memory keeps its values."""
    if isinstance(value, str):
        if "\0" in value:
            value = value.replace("\0", "\\x00")
        if value.isascii():
            return value
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


# --- moving aside without replacing -------------------------------------------------------------

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


@functools.cache
def _renameat2() -> Any:
    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if function is not None:
        function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                             ctypes.c_uint]
        function.restype = ctypes.c_int
    return function


def rename_noreplace(source: Path, destination: Path) -> None:
    """rename(2) that fails with EEXIST instead of replacing `destination`; moves the entry
    itself (a symlink is not followed)."""
    function = _renameat2()
    if function is not None:
        if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination),
                    _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(code, os.strerror(code), str(source), None, str(destination))
    # No RENAME_NOREPLACE in this libc or filesystem: check, then rename. Only this agent
    # writes in its state directory, so nothing comes in between.
    if os.path.lexists(destination):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(destination))
    os.rename(source, destination)


def move_aside(path: Path) -> Path:
    """Move the entry at `path` to `<name>.corrupt-<UTC time to the microsecond>[-N]` in the
    same directory, never replacing an earlier aside file. StorageFailed when it cannot."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
    for attempt in range(ASIDE_ATTEMPTS):
        suffix = f"-{attempt}" if attempt else ""
        aside = path.with_name(f"{path.name}.corrupt-{stamp}{suffix}")
        try:
            rename_noreplace(path, aside)
        except FileExistsError:
            continue
        except OSError as exc:
            code = exc.errno if exc.errno is not None else errno.EIO
            raise StorageFailed(f"moving {path} aside", code,
                                "check the state directory's permissions and filesystem"
                                ) from exc
        return aside
    raise StorageFailed(f"moving {path} aside", errno.EEXIST,
                        f"{ASIDE_ATTEMPTS} aside names are taken; clean up the state directory")


def _shape(path: Path) -> str | None:
    """What is at `path` when it is not a regular file (through symlinks), else None."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        # nothing there (or no state directory): only a dangling symlink is something
        return "a symbolic link to nothing" if os.path.lexists(path) else None
    except OSError as exc:
        return f"unusable ({errno_text(exc)})"
    return None if stat.S_ISREG(st.st_mode) else file_kind(st.st_mode)


# --- the store ----------------------------------------------------------------------------------

class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / STATE_FILE
        self.manifest_path = directory / MANIFEST_FILE
        self.last_verify_path = directory / LAST_VERIFY_FILE
        # A corrupt state file that could not be moved aside: it is kept, so nothing is saved
        # over it until a later save manages to move it (see save()).
        self.stuck: Aside | None = None
        self._deferred: list[str] | None = None

    def load(self) -> AgentState:
        """The state file, or a new IDLE state when there is none; StateCorrupt for anything
        else at the path."""
        raw = read_back(self.path, "state file", STATE_MAX_BYTES)
        if raw is None:
            return AgentState()
        return _parse(decode_json(raw, f"state file {self.path}"), self.path)

    def load_or_set_aside(self) -> Loaded:
        """load(); a corrupt state file is moved aside and a new IDLE state returned, with what
        was found and where it went. Never raises for what is at the path."""
        try:
            found = os.path.lexists(self.path)
            return Loaded(self.load(), found, None)
        except StateCorrupt as exc:
            return Loaded(AgentState(), True, self._set_aside(self.path, exc.message))

    def _set_aside(self, path: Path, problem: str) -> Aside:
        try:
            return Aside(path, problem, move_aside(path), None)
        except StorageFailed as exc:
            stuck = Aside(path, problem, None, exc.message)
            if path == self.path:
                self.stuck = stuck
            return stuck

    def clear_obstacles(self) -> list[Aside]:
        """Move aside whatever is at the manifest's and the verification record's paths that
        is not a regular file: the agent never puts one there, and a directory would make every
        later write (rename) and removal (unlink) of that file fail. A regular file stays: its
        content is checked where it is read."""
        found = []
        for path in (self.manifest_path, self.last_verify_path):
            shape = _shape(path)
            if shape is not None:
                found.append(self._set_aside(path, f"{path} is {shape}, not a regular file"))
        return found

    def read_last_verify(self, *, only_for_boot: str | None = None) -> VerifyRecord | None:
        """The last verification's record, None when there is none; StateCorrupt otherwise.
        With `only_for_boot`, a record that cannot be of that boot (the boot id is nowhere in
        it) is None without being parsed: the record of 100k files is 121 MB of JSON, and the
        first start after every kexec asks."""
        path = self.last_verify_path
        raw = read_back(path, "verification record", LAST_VERIFY_MAX_BYTES)
        if raw is None:
            return None
        if only_for_boot is not None and only_for_boot.encode() not in raw:
            return None
        return _parse_record(decode_json(raw, f"verification record {path}"), path)

    @contextmanager
    def deferring_errors(self) -> Iterator[list[str]]:
        """While the agent starts: a save that fails is recorded in the yielded list instead of
        raised, so that a full disk or a read-only state directory cannot keep the daemon from
        coming up and saying so."""
        self._deferred = []
        try:
            yield self._deferred
        finally:
            self._deferred = None

    def save(self, state: AgentState) -> None:
        try:
            self._save(state)
        except AgentError as exc:
            if self._deferred is None:
                raise
            self._deferred.append(exc.message)

    def _save(self, state: AgentState) -> None:
        if self.stuck is not None:
            try:
                aside = move_aside(self.path)
            except StorageFailed as exc:
                raise StateCorrupt(f"the corrupt state file {self.path} is still in place: it "
                                   f"could not be moved aside ({exc.message}); the agent does "
                                   "not write over it: make the state directory writable, or "
                                   "move the file away by hand") from exc
            self.stuck = None
            state.message += f" (the corrupt state file was moved aside to {aside})"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            code = exc.errno if exc.errno is not None else errno.EIO
            raise StorageFailed(f"creating the state directory {self.directory}", code,
                                "it must be a directory the agent can write in") from exc
        state.updated = now()
        state.history = [*state.history, {"at": state.updated, "phase": state.phase.value,
                                          "message": state.message}][-HISTORY_KEPT:]
        write_atomic(self.path, (json.dumps(_clean(state.to_json()), indent=2) + "\n").encode())

    def move_aside(self) -> Path:
        """Keep the state file for inspection under a new name (StorageFailed if it cannot)."""
        return move_aside(self.path)
