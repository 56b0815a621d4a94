"""Who holds live updates off: inhibitors as logind keeps them.

`Inhibit(who, why)` returns the write end of a pipe; the inhibitor lasts while any copy of it is
open. When its holder closes it, exits or crashes, the kernel closes it and the daemon sees the
read end hang up: an inhibitor cannot outlive its holder, and nothing has to be released by
hand after a crash. A commit while any is held is refused with `Inhibited`, naming who and why;
prepare and cancel are not held (an operator may still get everything ready, or back out).

Inhibitors live in the daemon's memory: a restart of the daemon drops them (their holders' fds
then read as a closed pipe), as a restart of logind does.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from gi.repository import GLib

from ..errors import Busy, InvalidArgument

MAX_INHIBITORS = 64        # each holds an fd in the daemon
MAX_WHO = 64
MAX_WHY = 256
_READ_CHUNK = 4096


@dataclass
class Inhibitor:
    who: str
    why: str
    uid: int
    since_usec: int       # CLOCK_REALTIME, microseconds (as logind's ListInhibitors)
    fd: int               # the read end, the daemon's
    source: int = 0       # the GLib watch on it

    def describe(self) -> str:
        return f"{self.who} (uid {self.uid}: {self.why})"

    def row(self) -> tuple[str, str, int, int]:
        return (self.who, self.why, self.uid, self.since_usec)


def check_text(value: str, what: str, limit: int, *, required: bool) -> str:
    """A who or why: printable, one line, bounded; InvalidArgument otherwise."""
    text = value.strip()
    if required and not text:
        raise InvalidArgument(f"Inhibit: {what} must say something (e.g. --why "
                              "'database migration until 14:00')")
    if len(text) > limit:
        raise InvalidArgument(f"Inhibit: {what} is {len(text)} characters; at most {limit}")
    if not text.isprintable():
        raise InvalidArgument(f"Inhibit: {what} must be one line of printable text")
    return text


class Inhibitors:
    def __init__(self, on_change: Callable[[], None], log: Callable[[str], None]) -> None:
        self._held: dict[int, Inhibitor] = {}
        self._on_change = on_change
        self._log = log

    def take(self, who: str, why: str, uid: int) -> int:
        """A new inhibitor; returns the fd to hand to its holder (the caller closes its copy
        after the reply). InvalidArgument for a bad who or why, Busy when too many are held."""
        who = check_text(who, "who", MAX_WHO, required=False) or f"uid {uid}"
        why = check_text(why, "why", MAX_WHY, required=True)
        if len(self._held) >= MAX_INHIBITORS:
            raise Busy(f"{MAX_INHIBITORS} inhibitors are held already; release one first")
        read_end, write_end = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        inhibitor = Inhibitor(who, why, uid, time.time_ns() // 1000, read_end)
        inhibitor.source = GLib.unix_fd_add_full(
            GLib.PRIORITY_DEFAULT, read_end,
            GLib.IOCondition.IN | GLib.IOCondition.HUP | GLib.IOCondition.ERR,
            self._ready, inhibitor)
        self._held[read_end] = inhibitor
        self._log(f"inhibitor taken: {inhibitor.describe()}")
        self._on_change()
        return write_end

    def _ready(self, fd: int, condition: GLib.IOCondition, inhibitor: Inhibitor) -> bool:
        if condition & GLib.IOCondition.IN:
            # what a holder writes means nothing; read it so the pipe never fills. Empty:
            # every write end is closed.
            try:
                if os.read(fd, _READ_CHUNK):
                    return True
            except BlockingIOError:
                return True
            except OSError:
                pass
        self._release(inhibitor)
        return False

    def _release(self, inhibitor: Inhibitor) -> None:
        if self._held.pop(inhibitor.fd, None) is None:
            return
        os.close(inhibitor.fd)
        self._log(f"inhibitor released: {inhibitor.describe()}")
        self._on_change()

    def descriptions(self) -> tuple[str, ...]:
        return tuple(i.describe() for i in self._held.values())

    def rows(self) -> list[tuple[str, str, int, int]]:
        return [i.row() for i in self._held.values()]

    def __len__(self) -> int:
        return len(self._held)

    def close(self) -> None:
        for inhibitor in list(self._held.values()):
            GLib.source_remove(inhibitor.source)
            os.close(inhibitor.fd)
        self._held.clear()
