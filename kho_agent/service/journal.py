"""Structured journal entries of kho-agentd: one MESSAGE_ID per event, explained in
catalog/kho-agent.catalog (`journalctl -x`), with the agent's fields (KHO_AGENT_STATE=, ...).

    events = EventLog()
    events.log_event(Event.PREPARED, "prepared /boot/vmlinuz-7.3 with 4 sessions",
                     state="prepared", target="/boot/vmlinuz-7.3", sessions=4)

Field names are given in lower case without the prefix and sent as KHO_AGENT_<NAME>. Values:
str as is, int and float in decimal, bool as "yes"/"no", a sequence of strings as a JSON array,
None leaves the field out.

Each event is also written as one plain line to stderr unless stderr is the journal itself
(JOURNAL_STREAM, set by systemd, names the stream), where it would only repeat the entry: so a
terminal, a test or a host without journald still sees every event, and the journal gets it once.
"""

from __future__ import annotations

import enum
import importlib
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TextIO

from ..errors import EXIT_REFUSED, AgentError, InvalidArgument, NotFound

FIELD_PREFIX = "KHO_AGENT_"
SYSLOG_IDENTIFIER = "kho-agentd"
# Journal field names: upper-case letters, digits and '_', not starting with '_' (those are
# trusted fields the journal sets itself), at most 64 characters.
_FIELD_NAME = re.compile(r"[A-Z0-9][A-Z0-9_]{0,63}")

# syslog priorities (syslog.h). err is kept for the agent's own failures and lost sessions;
# a caller's refused or malformed request is notice/warning; the normal path is notice/info.
LOG_ERR = 3
LOG_WARNING = 4
LOG_NOTICE = 5
LOG_INFO = 6


class Event(enum.Enum):
    """What happened; the value is the event's short name."""

    PREPARED = "prepared"
    COMMITTED = "committed"
    VERIFIED = "verified"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SESSION_DISCARDED = "session-discarded"   # unclaimed after the grace period, finished
    RECOVERED = "recovered"                   # started with an update in progress (a restart)
    CONFIG_INVALID = "config-invalid"         # kho-agent.conf(5) cannot be used: not started
    STOPPED_PREPARED = "stopped-prepared"     # stopped while prepared: the update was cancelled

    @property
    def message_id(self) -> str:
        """The 128-bit MESSAGE_ID (32 hex digits), the key of the catalog entry."""
        return _SPECS[self].message_id

    @property
    def priority(self) -> int:
        return _SPECS[self].priority


@dataclass(frozen=True)
class _Spec:
    message_id: str
    priority: int


# Generated once with uuid4; never change one: journal queries and the catalog key on them.
_SPECS: Mapping[Event, _Spec] = MappingProxyType({
    Event.PREPARED: _Spec("61993f5581d94c17bb5c15ae690281c3", LOG_NOTICE),
    Event.COMMITTED: _Spec("e21d7e26039a42959ab0c5c4a839f069", LOG_NOTICE),
    Event.VERIFIED: _Spec("1fe957ab2a20470086b2e9c2bb52fd43", LOG_NOTICE),
    Event.FAILED: _Spec("64051fc43644409f8cdac54b27b90e97", LOG_ERR),
    Event.CANCELLED: _Spec("807f89826e8d46479808bfb2713027c2", LOG_NOTICE),
    Event.SESSION_DISCARDED: _Spec("bd9b5201d9c44ce2a80f1590a5ec43e6", LOG_WARNING),
    # the default; a start after a kexec (verification pending, the normal path) logs at info
    Event.RECOVERED: _Spec("905acea450fa4177bf5aade8744e2695", LOG_WARNING),
    Event.CONFIG_INVALID: _Spec("e2af0f2798254503bdffee03b516454c", LOG_ERR),
    Event.STOPPED_PREPARED: _Spec("1c5306d0353741d6829ad8c2e44f2689", LOG_WARNING),
})

# The longest MESSAGE (and stderr line) an event writes: the details go in fields, not in the
# message (a job's 2-3 KB JSON result was once its log line).
MAX_MESSAGE = 480

FieldValue = str | int | float | bool | Sequence[str] | None
Send = Callable[..., Any]


def failure_priority(error: AgentError | None) -> int:
    """The priority of a failed job: a caller's bad argument or unknown name is notice, a
    refusal (policy, state, permission, busy) warning, the agent's own failure err."""
    if error is None:
        return LOG_ERR
    if isinstance(error, (InvalidArgument, NotFound)):
        return LOG_NOTICE
    if error.exit_code == EXIT_REFUSED:
        return LOG_WARNING
    return LOG_ERR


def field_name(name: str) -> str:
    """`target` -> `KHO_AGENT_TARGET`; InvalidArgument for a name the journal would drop."""
    full = FIELD_PREFIX + name.upper()
    if not _FIELD_NAME.fullmatch(full):
        raise InvalidArgument(f"{name!r} cannot be a journal field ({full}): use letters, "
                              "digits and '_', at most 64 characters with the prefix")
    return full


def field_value(value: str | int | float | bool | Sequence[str]) -> str:
    if isinstance(value, bool):  # before int: bool is an int
        return "yes" if value else "no"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(list(value))


def _default_send() -> Send | None:
    # importlib rather than `from systemd import journal`: mypy, run from the repository root,
    # takes the unit-file directory systemd/ for a namespace package of that name
    try:
        journal = importlib.import_module("systemd.journal")
    except ImportError:  # systemd-python missing: stderr is all there is
        return None
    send: Send = journal.send
    return send


def _is_journal_stream(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Whether `stream` is the journal's stdout/stderr stream (JOURNAL_STREAM=<dev>:<ino>)."""
    wanted = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = wanted.partition(":")
    if not sep or not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):  # no fd behind it (StringIO: UnsupportedOperation), closed
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class EventLog:
    """Sends the agent's events to the journal (`send`, systemd.journal.send by default) and,
    unless stderr is the journal, as a line to `stream`."""

    def __init__(self, send: Send | None = None, stream: TextIO | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self._send = send if send is not None else _default_send()
        self._stream = stream if stream is not None else sys.stderr
        env = os.environ if environ is None else environ
        self._echo = not _is_journal_stream(self._stream, env)

    def log_event(self, event: Event, message: str, priority: int | None = None, /,
                  **fields: FieldValue) -> None:
        """`priority` replaces the event's own (a refused request is not the agent's failure);
        `message` is cut to MAX_MESSAGE characters: details belong in `fields`."""
        if "event" in fields:
            raise InvalidArgument("the field 'event' is set by log_event itself "
                                  "(KHO_AGENT_EVENT=<event name>)")
        entry = {field_name(key): field_value(value)
                 for key, value in fields.items() if value is not None}
        message = short_line(message)
        level = event.priority if priority is None else priority
        if self._send is not None:
            caller = sys._getframe(1)
            self._send(message, MESSAGE_ID=event.message_id,
                       CODE_FILE=caller.f_code.co_filename, CODE_LINE=caller.f_lineno,
                       CODE_FUNC=caller.f_code.co_name,
                       PRIORITY=str(level), SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER,
                       KHO_AGENT_EVENT=event.value, **entry)
        if self._echo:
            print(f"{SYSLOG_IDENTIFIER}: [{event.value}] {message}",
                  file=self._stream, flush=True)


def short_line(text: str, limit: int = MAX_MESSAGE) -> str:
    """One line of at most `limit` characters ("..." says it was cut)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[:limit - 3] + "..."
