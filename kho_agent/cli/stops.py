"""SIGTERM and SIGINT as requests that a command's own waiting loop acts on.

A handler that raises cuts in two whatever runs when the signal lands: a GLib dispatch, a D-Bus
call, the clean-up of an earlier signal (a second SIGTERM while the first one's work runs). So
the handler here only remembers the signal; the loops that wait look at `requested` between
two steps. A loop blocked in the kernel learns of it too: the signal also writes a byte to a
pipe (`signal.set_wakeup_fd`) that `wait` polls beside the descriptors it is given, so a signal
that arrives between the loop's look and its poll still ends the poll.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
from collections.abc import Sequence
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
    """Raised by `StopRequests.check` (in the command's code, never in a handler)."""


class StopRequests:
    """While entered: SIGTERM and SIGINT are remembered (the first one in `requested`), not
    acted on where they land. Main thread only (as signal handlers are)."""

    def __init__(self) -> None:
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}
        self._wakeup: tuple[int, int] | None = None
        self._previous_wakeup = -1

    def __enter__(self) -> StopRequests:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wakeup = (read_end, write_end)
        self._previous_wakeup = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
        signal.set_wakeup_fd(self._previous_wakeup)
        if self._wakeup is not None:
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signum

    def check(self) -> None:
        """StopRequested once a stop was asked for."""
        if self.requested is not None:
            raise StopRequested(self.why())

    def wait(self, fds: Sequence[int] = ()) -> list[int]:
        """Block until a signal arrives or one of `fds` is readable (or hung up); those fds.
        A signal that came since the previous wait ends this one at once."""
        if self._wakeup is None:
            raise RuntimeError("StopRequests.wait() outside its `with`")
        read_end = self._wakeup[0]
        poller = select.poll()
        for fd in (read_end, *fds):
            poller.register(fd, select.POLLIN)
        ready = [fd for fd, _events in poller.poll()]
        with contextlib.suppress(BlockingIOError):
            while os.read(read_end, 64):
                pass
        return [fd for fd in ready if fd != read_end]

    def why(self) -> str:
        name = signal.Signals(self.requested).name if self.requested is not None else "?"
        return f"stopped by {name}"
