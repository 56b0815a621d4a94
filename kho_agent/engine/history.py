"""The history of live updates on this host: one record per attempt, kept across kexecs.

`history.jsonl` in the state directory holds one JSON object per line, the oldest first. An
attempt is written when it opens (prepare succeeded: "prepared") and rewritten when it ends
(verified, verification failed, cancelled, interrupted), after the kexec for a live update:
nothing is written inside the commit's blackout. A prepare that fails is an attempt that ends as
it opens. A commit that is refused or fails while an update is prepared is counted on that
update's record (the count, and the last one's time, error name and message), not an entry of
its own: a script retrying a commit cannot push real updates out of the bounded history; a
commit with nothing prepared was no attempt and leaves nothing. (Agents before this one wrote
an entry of kind "commit" per refused commit: they are still read.) The file is bounded by
entries and by bytes (the oldest go first) and is rewritten whole with the atomic writer, so a
crash leaves the old file or the new one.

Reading trusts nothing: a line that is not JSON, too long, or has a field of the wrong type is
skipped and reported (`HistoryRead.problems`), never fatal; a file that is not a regular file or
is far larger than the bound is reported and read as empty. A member this version does not know
is ignored (a newer agent's file survives a downgrade).

`encode`, `decode` and `bound` are pure (bytes in, records out); `HistoryLog` does the I/O.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..config.model import DEFAULT_HISTORY_MAX_ENTRIES
from ..errors import AgentError, StateCorrupt
from ..kernel.atomicfile import write_atomic
from .phase import move_aside, read_back

HISTORY_FILE = "history.jsonl"
SCHEMA = 1
DEFAULT_MAX_ENTRIES = DEFAULT_HISTORY_MAX_ENTRIES  # HistoryMaxEntries=, kho-agent.conf(5)
DEFAULT_MAX_BYTES = 1 << 20
# One record with a 4000-character message and long paths is under 10 KiB; a longer line is
# not one the agent wrote.
MAX_LINE_BYTES = 64 << 10
# A file larger than this many times its bound was not written by the agent: it is reported
# and replaced at the next write, not read.
READ_SLACK = 4
MAX_TEXT = 4000   # characters kept of a message


class Verdict(enum.Enum):
    PREPARED = "prepared"                    # open: until it is verified, cancelled, ...
    VERIFIED = "verified"
    VERIFICATION_FAILED = "verification failed"
    CANCELLED = "cancelled"
    PREPARE_FAILED = "prepare failed"
    # kind "commit" only, written by earlier agents (now counted on the update's record)
    COMMIT_REFUSED = "commit refused"        # the update stays prepared
    COMMIT_FAILED = "commit failed"          # the kexec did not happen; the update stays
    INTERRUPTED = "interrupted"              # a reboot or a stop cut the attempt short


OPEN = (Verdict.PREPARED.value,)


class Kind(enum.Enum):
    UPDATE = "update"   # a live update, from prepare to its end
    # a commit refused or failed (the update it was for stays open): written by earlier
    # agents, one entry per commit; read, no longer written
    COMMIT = "commit"


@dataclass(frozen=True)
class Attempt:
    """One attempt. Times are ISO 8601 UTC; `committed_at` is epoch seconds (sub-second: the
    blackout is measured from it)."""

    id: str
    kind: str
    started: str
    verdict: str
    ended: str | None = None
    release_from: str = ""
    release_to: str | None = None
    kernel_from: str | None = None      # the running image (BOOT_IMAGE=), when named
    kernel_to: str | None = None        # the target image path
    sessions: int | None = None
    files: int | None = None
    bytes: int | None = None
    liveupdate_number: int | None = None   # the number the update leads to
    handoff_seconds: float | None = None   # commit: final manifest to reboot(2)
    committed_at: float | None = None      # Unix time just before the kexec
    # commit (just before the kexec) to the new kernel's agent starting to hand the sessions
    # back: the longest the guests can have been paused by the host
    blackout_seconds: float | None = None
    error_name: str | None = None
    error_message: str | None = None
    detail: str | None = None
    # commits that did not happen while this update was prepared: refused (by the agent's
    # checks, an inhibitor, a busy agent) or failed (the kexec itself); the last one's UTC
    # time, error name and message
    commits_refused: int | None = None
    commits_failed: int | None = None
    last_commit_error_at: str | None = None
    last_commit_error_name: str | None = None
    last_commit_error_message: str | None = None

    @property
    def open(self) -> bool:
        return self.kind == Kind.UPDATE.value and self.ended is None and self.verdict in OPEN

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class HistoryRead:
    entries: list[Attempt]
    problems: list[str]

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "entries": [a.to_json() for a in self.entries],
                "problems": list(self.problems)}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_id() -> str:
    """Sortable and unique enough on one host: the UTC time to the microsecond."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")


# --- codec --------------------------------------------------------------------------------------

def _clean_text(text: str) -> str:
    """Text that survives a round trip as D-Bus-safe UTF-8: no NUL, no lone surrogate."""
    # escaped first, cut last: an escape lengthens the text, and a line longer than MAX_TEXT
    # would be one the reader refuses
    text = text.replace("\0", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text[:MAX_TEXT]


def encode(attempt: Attempt) -> bytes:
    """One line of the file (with its newline)."""
    obj: dict[str, Any] = {}
    for key, value in attempt.to_json().items():
        if isinstance(value, str):
            value = _clean_text(value)
        elif isinstance(value, float) and value != value:  # NaN: not JSON
            value = None
        obj[key] = value
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"


class _BadLine(Exception):
    pass


_TEXT = {"id", "kind", "started", "verdict", "release_from"}
_OPT_TEXT = {"ended", "release_to", "kernel_from", "kernel_to", "error_name", "error_message",
             "detail", "last_commit_error_at", "last_commit_error_name",
             "last_commit_error_message"}
_COUNTS = {"sessions", "files", "bytes", "liveupdate_number", "commits_refused",
           "commits_failed"}
_SECONDS = {"handoff_seconds", "committed_at", "blackout_seconds"}


def _field(key: str, value: object) -> object:
    if key in _TEXT or key in _OPT_TEXT:
        if value is None and key in _OPT_TEXT:
            return None
        if not isinstance(value, str):
            raise _BadLine(f"{key}: expected a string")
        if "\0" in value or len(value) > MAX_TEXT:
            raise _BadLine(f"{key}: not a string the agent writes")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _BadLine(f"{key}: not valid Unicode") from exc
        return value
    if value is None:
        return None
    if key in _COUNTS:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _BadLine(f"{key}: expected a count")
        return value
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0 \
            or value != value or value == float("inf"):
        raise _BadLine(f"{key}: expected seconds")
    return float(value)


def _attempt(obj: object) -> Attempt:
    if not isinstance(obj, dict):
        raise _BadLine("not an object")
    for key in ("id", "kind", "started", "verdict"):
        if key not in obj:
            raise _BadLine(f"{key}: required field is missing")
    known = {f.name for f in fields(Attempt)}
    values = {key: _field(key, value) for key, value in obj.items() if key in known}
    if not values["id"]:
        raise _BadLine("id: empty")
    return Attempt(**values)  # type: ignore[arg-type]


def decode(raw: bytes, label: str = "history") -> HistoryRead:
    """Every well-formed line, oldest first; each bad one skipped with its line number and why.
    A later line with the id of an earlier one replaces it (the file is rewritten whole, so
    that happens only in a file edited by hand)."""
    entries: dict[str, Attempt] = {}
    problems: list[str] = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            if len(line) > MAX_LINE_BYTES:
                raise _BadLine(f"{len(line)} bytes, more than a record holds")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _BadLine("not UTF-8") from exc
            try:
                obj = json.loads(text, parse_constant=_no_constant)
            except RecursionError as exc:
                raise _BadLine("nested too deeply") from exc
            except ValueError as exc:
                raise _BadLine(f"not JSON ({exc})") from exc
            attempt = _attempt(obj)
        except _BadLine as exc:
            problems.append(f"{label} line {number} skipped: {str(exc)[:200]}")
            continue
        entries.pop(attempt.id, None)
        entries[attempt.id] = attempt
    return HistoryRead(list(entries.values()), problems)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def bound(entries: list[Attempt], max_entries: int, max_bytes: int) -> list[Attempt]:
    """The newest entries that fit both bounds (at least the newest one)."""
    kept: list[Attempt] = []
    size = 0
    for attempt in reversed(entries):
        size += len(encode(attempt))
        if kept and (len(kept) >= max_entries or size > max_bytes):
            break
        kept.append(attempt)
    return kept[::-1]


def upsert(entries: list[Attempt], attempt: Attempt) -> list[Attempt]:
    """`entries` with `attempt` in place of the one with its id, or appended."""
    out = [a for a in entries if a.id != attempt.id]
    if len(out) == len(entries):
        return [*entries, attempt]
    return [attempt if a.id == attempt.id else a for a in entries]


def current(entries: list[Attempt]) -> Attempt | None:
    """The open live update, if any: the newest open one."""
    return next((a for a in reversed(entries) if a.open), None)


def ended(attempt: Attempt, verdict: Verdict, *, error: AgentError | None = None,
          message: str | None = None, **changes: Any) -> Attempt:
    return replace(attempt, verdict=verdict.value, ended=now_iso(),
                   error_name=error.name if error is not None else None,
                   error_message=(error.message if error is not None else message),
                   **changes)


# --- the file -----------------------------------------------------------------------------------

class HistoryLog:
    def __init__(self, path: Path, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = path
        self.max_entries = max(1, max_entries)
        self.max_bytes = max(MAX_LINE_BYTES, max_bytes)

    def read(self) -> HistoryRead:
        """What the file holds; never raises for what is at the path."""
        try:
            raw = read_back(self.path, "history", self.max_bytes * READ_SLACK)
        except StateCorrupt as exc:
            return HistoryRead([], [exc.message])
        if raw is None:
            return HistoryRead([], [])
        return decode(raw, str(self.path))

    def record(self, attempt: Attempt) -> None:
        """Write `attempt` (a new one, or the next state of one already there); the oldest
        entries go when a bound is reached. A file that could not be read at all is moved
        aside first (kept as evidence). StorageFailed when it cannot be written."""
        found = self.read()
        if found.problems and not found.entries:
            try:
                if self.path.exists() or self.path.is_symlink():
                    move_aside(self.path)
            except AgentError:
                pass  # the write below says what is wrong with the directory
        entries = bound(upsert(found.entries, attempt), self.max_entries, self.max_bytes)
        write_atomic(self.path, b"".join(encode(a) for a in entries))
