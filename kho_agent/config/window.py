"""The maintenance window: when a commit (the kexec) may happen.

A window is `[DAYS] HH:MM-HH:MM` in local time, e.g. `Mon..Fri 02:00-04:00`, `Sat,Sun
00:00-24:00`, `22:30-01:00` (every day). DAYS is a comma-separated list of days (`Mon` .. `Sun`)
and ranges (`Mon..Fri`, `Fri..Mon` wraps); without it, every day. The end is exclusive; an end
before the start crosses midnight and the window belongs to the day it starts on
(`Fri 23:00-01:00` is Friday 23:00 to Saturday 01:00). Several windows: a time in any of them is
inside. No windows: always inside.

A small grammar of our own, not systemd.time(7)'s calendar events: a window has an end, and
"may a commit start now?" is all the agent asks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
MINUTES_PER_DAY = 24 * 60
_TIME = re.compile(r"^(\d{1,2}):(\d{2})$")


class WindowSyntaxError(ValueError):
    """The text is not a window; the message says what is wrong."""


@dataclass(frozen=True)
class Window:
    days: frozenset[int]      # 0 = Monday, as datetime.weekday()
    start: int                # minutes after midnight, 0 .. 1439
    end: int                  # minutes after midnight, 1 .. 1440; < start: ends the next day
    text: str = ""

    def __str__(self) -> str:
        return self.text

    def contains(self, when: datetime) -> bool:
        day = when.weekday()
        minute = when.hour * 60 + when.minute
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        # crosses midnight: the evening of a listed day, or the morning after one
        return ((day in self.days and minute >= self.start)
                or ((day - 1) % 7 in self.days and minute < self.end))


def _day(name: str, text: str) -> int:
    """A day by its abbreviation (Mon) or full name (Monday), any case."""
    word = name.strip().lower()
    for index, full in enumerate(FULL_DAYS):
        if word in (full, full[:3]):
            return index
    raise WindowSyntaxError(f"{name.strip()!r} is not a day (Mon, Tue, Wed, Thu, Fri, Sat, Sun) "
                            f"in {text!r}")


def _days(spec: str, text: str) -> frozenset[int]:
    days: set[int] = set()
    for item in spec.split(","):
        if ".." in item:
            first_name, last_name = item.split("..", 1)
            first, last = _day(first_name, text), _day(last_name, text)
            day = first
            days.add(day)
            while day != last:
                day = (day + 1) % 7
                days.add(day)
        else:
            days.add(_day(item, text))
    return frozenset(days)


def _minute(value: str, text: str, *, end: bool) -> int:
    match = _TIME.match(value)
    if match is None:
        raise WindowSyntaxError(f"{value!r} is not a time HH:MM in {text!r}")
    hour, minute = int(match.group(1)), int(match.group(2))
    if end and (hour, minute) == (24, 0):
        return MINUTES_PER_DAY
    if hour > 23 or minute > 59:
        raise WindowSyntaxError(f"{value!r} is not a time of day (00:00 .. 23:59"
                                f"{', or 24:00 as an end' if end else ''}) in {text!r}")
    return hour * 60 + minute


def parse_window(text: str) -> Window:
    """One window (WindowSyntaxError says why not)."""
    words = text.split()
    if len(words) == 1:
        days, span = frozenset(range(7)), words[0]
    elif len(words) == 2:
        days, span = _days(words[0], text), words[1]
    else:
        raise WindowSyntaxError(f"{text!r} is not a window: write [DAYS] HH:MM-HH:MM, e.g. "
                                "Mon..Fri 02:00-04:00")
    if span.count("-") != 1:
        raise WindowSyntaxError(f"{span!r} is not a time span HH:MM-HH:MM in {text!r}")
    first, last = span.split("-")
    start, end = _minute(first, text, end=False), _minute(last, text, end=True)
    if start == end:
        raise WindowSyntaxError(f"{span!r} is empty (start and end are the same) in {text!r}; "
                                "a whole day is 00:00-24:00")
    return Window(days, start, end, " ".join(words))


def window_allows(windows: Sequence[Window], when: datetime) -> bool:
    """May a commit start at `when` (local time)? With no window configured, always."""
    return not windows or any(w.contains(when) for w in windows)


def next_opening(windows: Sequence[Window], when: datetime) -> datetime | None:
    """The first minute at or after `when` inside a window: `when` itself when it is inside,
    None when no window is configured (nothing to wait for)."""
    if not windows:
        return None
    if window_allows(windows, when):
        return when
    midnight = when.replace(hour=0, minute=0, second=0, microsecond=0)
    starts = [midnight + timedelta(days=offset, minutes=w.start)
              for offset in range(8) for w in windows
              if (when.weekday() + offset) % 7 in w.days]
    return min(s for s in starts if s > when)
