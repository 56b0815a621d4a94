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
is ignored when reading (a newer agent's file survives a downgrade) and kept when writing: the
lines of a rewrite that are not the record written are copied as they were, and the record
written keeps the unknown members of the line it replaces. Before a rewrite leaves out what it
could not read (skipped lines, or a file that could not be read at all), the file is moved aside
whole (`history.jsonl.corrupt-<time>`, as the state files are: one rename keeps every line as it
was) and a note says so (the daemon's log); when it cannot be moved the skipped lines stay in the
rewritten file.

`encode` and `decode` are pure (bytes in, records out); `HistoryLog` does the I/O.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeAlias

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


def encode(attempt: Attempt, unknown: dict[str, Any] | None = None) -> bytes:
    """One line of the file (with its newline). `unknown`: members a newer agent wrote into
    the line this one replaces, carried through when they still make a line the reader takes
    (else left out: the record itself must be written)."""
    obj: dict[str, Any] = {}
    for key, value in attempt.to_json().items():
        if isinstance(value, str):
            value = _clean_text(value)
        elif isinstance(value, float) and value != value:  # NaN: not JSON
            value = None
        obj[key] = value
    line = json.dumps(obj, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    carried = {k: v for k, v in (unknown or {}).items() if k not in obj}
    if not carried:
        return line
    try:
        longer = json.dumps({**obj, **carried}, separators=(",", ":"),
                            allow_nan=False).encode() + b"\n"
    except (ValueError, RecursionError):  # 1e999 read as inf; nested as deep as it may be
        return line
    return longer if len(longer) <= MAX_LINE_BYTES else line


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


_KNOWN = frozenset(f.name for f in fields(Attempt))


def _attempt(obj: object) -> tuple[Attempt, dict[str, Any]]:
    """The record of a line, and the members this version does not know."""
    if not isinstance(obj, dict):
        raise _BadLine("not an object")
    for key in ("id", "kind", "started", "verdict"):
        if key not in obj:
            raise _BadLine(f"{key}: required field is missing")
    values = {key: _field(key, value) for key, value in obj.items() if key in _KNOWN}
    if not values["id"]:
        raise _BadLine("id: empty")
    unknown = {key: value for key, value in obj.items() if key not in _KNOWN}
    return Attempt(**values), unknown  # type: ignore[arg-type]


@dataclass(frozen=True)
class Line:
    """A line that was read: its record, its bytes as they are in the file (without the
    newline), and the members this version does not know."""

    attempt: Attempt
    text: bytes
    unknown: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Skipped:
    """A line that could not be read: where, why, and its bytes."""

    number: int
    problem: str
    text: bytes


Item: TypeAlias = Line | Skipped


@dataclass
class Parsed:
    """The lines of a file in its order (an id's earlier lines left out), and the problems."""

    items: list[Item]
    problems: list[str]

    @property
    def lines(self) -> list[Line]:
        return [i for i in self.items if isinstance(i, Line)]

    @property
    def skipped(self) -> list[Skipped]:
        return [i for i in self.items if isinstance(i, Skipped)]


def _line(line: bytes) -> Line:
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
    attempt, unknown = _attempt(obj)
    return Line(attempt, line, unknown)


def parse(raw: bytes, label: str = "history") -> Parsed:
    """Every line in file order; each bad one skipped with its line number and why. A later
    line with the id of an earlier one replaces it (the file is rewritten whole, so that
    happens only in a file edited by hand)."""
    items: list[Item] = []
    problems: list[str] = []
    last: dict[str, int] = {}  # id -> index in items of its latest line
    for number, text in enumerate(raw.split(b"\n"), 1):
        if not text.strip():
            continue
        try:
            line = _line(text)
        except _BadLine as exc:
            problem = str(exc)[:200]
            problems.append(f"{label} line {number} skipped: {problem}")
            items.append(Skipped(number, problem, text))
            continue
        last[line.attempt.id] = len(items)
        items.append(line)
    return Parsed([item for index, item in enumerate(items) if isinstance(item, Skipped)
                   or last[item.attempt.id] == index], problems)


def decode(raw: bytes, label: str = "history") -> HistoryRead:
    """Every well-formed line's record, oldest first, and each bad line's number and why."""
    parsed = parse(raw, label)
    return HistoryRead([line.attempt for line in parsed.lines], parsed.problems)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not a JSON number")


def _fitting(sizes: list[int], max_entries: int, max_bytes: int) -> int:
    """How many of the newest (the last) of `sizes` fit both bounds (at least one)."""
    kept = 0
    total = 0
    for size in reversed(sizes):
        total += size
        if kept and (kept >= max_entries or total > max_bytes):
            break
        kept += 1
    return kept


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

Note: TypeAlias = Callable[[str], None]


class HistoryLog:
    """`on_note`: told what a rewrite did besides recording (the file moved aside before what
    could not be read was left out, or the skipped lines kept): the daemon logs it."""

    def __init__(self, path: Path, max_entries: int = DEFAULT_MAX_ENTRIES,
                 max_bytes: int = DEFAULT_MAX_BYTES, on_note: Note | None = None) -> None:
        self.path = path
        self.max_entries = max(1, max_entries)
        self.max_bytes = max(MAX_LINE_BYTES, max_bytes)
        self.on_note: Note = on_note if on_note is not None else (lambda text: None)

    def _parse(self) -> Parsed:
        """What the file holds; never raises for what is at the path (a file that cannot be
        read at all is one problem and no items)."""
        try:
            raw = read_back(self.path, "history", self.max_bytes * READ_SLACK)
        except StateCorrupt as exc:
            return Parsed([], [exc.message])
        if raw is None:
            return Parsed([], [])
        return parse(raw, str(self.path))

    def read(self) -> HistoryRead:
        """What the file holds; never raises for what is at the path."""
        parsed = self._parse()
        return HistoryRead([line.attempt for line in parsed.lines], parsed.problems)

    def record(self, attempt: Attempt) -> None:
        """Write `attempt` (a new one, or the next state of one already there); the oldest
        entries go when a bound is reached. The other lines are written back as they were
        (members a newer agent wrote survive); the record written keeps the unknown members
        of the line it replaces. A file with lines that could not be read, or that could not be
        read at all, is moved aside first (kept as evidence); skipped lines stay in place when
        it cannot be. StorageFailed when it cannot be written."""
        found = self._parse()
        items = found.items
        if found.problems and self._set_aside(found):
            items = [i for i in items if isinstance(i, Line)]
        replaced = next((i for i in items if isinstance(i, Line)
                         and i.attempt.id == attempt.id), None)
        new = Line(attempt, encode(attempt, replaced.unknown if replaced else None)[:-1])
        items = ([new if i is replaced else i for i in items] if replaced is not None
                 else [*items, new])
        lines = [i for i in items if isinstance(i, Line)]
        kept = _fitting([len(i.text) + 1 for i in lines], self.max_entries, self.max_bytes)
        dropped = {id(i) for i in lines[:len(lines) - kept]}
        write_atomic(self.path, b"".join(i.text + b"\n" for i in items if id(i) not in dropped))

    def _set_aside(self, found: Parsed) -> bool:
        """Keep what the rewrite leaves out: the whole file moved aside (move_aside, the state
        files' way), the readable lines then written back. Whether it was moved (else skipped
        lines stay in the history, and the note says why)."""
        if found.skipped:
            numbers = ", ".join(str(s.number) for s in found.skipped[:10])
            more = ", ..." if len(found.skipped) > 10 else ""
            what = (f"{len(found.skipped)} unreadable line(s) of {self.path} "
                    f"(line {numbers}{more})")
        else:
            what = (f"{self.path} could not be read ({found.problems[0]}; "
                    f"{len(found.problems)} problem(s))")
        try:
            aside = move_aside(self.path)
        except AgentError as exc:
            kept = "; they stay in the history" if found.skipped else ""
            self.on_note(f"{what}: it could not be moved aside ({exc.message}){kept}")
            return False
        readable = "; the readable lines are written back" if found.lines else ""
        self.on_note(f"{what}: moved aside to {aside}{readable}")
        return True
