"""The one thread that talks to the engine. Every engine call (ioctls, kexec_file_load,
digests, decoding) runs here, one at a time, so the GLib main loop stays free to answer the
bus; each result is handed back to the main loop, where replies and signals are sent.

A single thread is the engine's own rule (one operation at a time) made structural: no two
engine calls ever overlap, and the engine needs no locking of its records.

Work comes in two classes. Privileged work (root's calls, authorized verbs, the daemon's own)
runs first, in submission order. Work for unprivileged callers (their Preflight and ScratchPlan)
runs only when no privileged work waits, and only a bounded number of such items may wait at
all: beyond it the caller is told Busy. So nobody without privilege can queue work in front of,
or pile up behind, root's calls: root waits at most for the one unprivileged item that runs.
"""

from __future__ import annotations

import enum
import errno
import itertools
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gi.repository import GLib

from ..errors import AgentError, Busy, KernelRefused

T = TypeVar("T")
Done = Callable[[Any, AgentError | None], None]
UNPRIVILEGED_PENDING_MAX = 4


class Priority(enum.IntEnum):
    PRIVILEGED = 0
    UNPRIVILEGED = 1


class InternalError(AgentError):
    """A bug surfaced in the engine: the caller gets a reply (never a hang) and the log gets the
    traceback. Its name is AgentError's, `Failed`."""


@dataclass(order=True)
class _Item:
    priority: int
    seq: int
    fn: Callable[[], Any] | None = field(compare=False)   # None: stop the thread
    done: Done | None = field(compare=False)


def os_error(exc: OSError) -> AgentError:
    """An OSError that escaped the engine, with its errno kept (never a bare strerror)."""
    code = exc.errno or errno.EIO
    op = f"{exc.filename}" if exc.filename else "a system call"
    return KernelRefused(op, code, "the operation was not done")


class Worker:
    def __init__(self, log: Callable[[str], None], name: str = "kho-agent-engine",
                 unprivileged_max: int = UNPRIVILEGED_PENDING_MAX) -> None:
        self._log = log
        self._queue: queue.PriorityQueue[_Item] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._unprivileged_max = unprivileged_max
        self._unprivileged = 0           # waiting or running; changed on the main loop only
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T], done: Callable[[T | None, AgentError | None], None],
               priority: Priority = Priority.PRIVILEGED) -> None:
        """Run `fn` on the engine thread; call `done(result, error)` on the main loop. An
        unprivileged item beyond the bound raises Busy at once (nothing is queued)."""
        if priority is Priority.UNPRIVILEGED:
            if self._unprivileged >= self._unprivileged_max:
                raise Busy(f"{self._unprivileged} requests of unprivileged callers are already "
                           "waiting for the agent; try again shortly")
            self._unprivileged += 1
            inner = done

            def counted(result: T | None, error: AgentError | None) -> None:
                self._unprivileged -= 1
                inner(result, error)
            done = counted
        if self._stopping:
            return
        self._queue.put(_Item(int(priority), next(self._seq), fn, done))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item.fn is None or item.done is None:
                return
            done = item.done
            try:
                result = item.fn()
            except Exception as exc:  # noqa: BLE001 - every error goes to the caller's reply
                GLib.idle_add(self._deliver, None, exc, done)
            else:
                GLib.idle_add(self._deliver, result, None, done)

    def _deliver(self, result: Any, exc: Exception | None, done: Done) -> bool:
        if exc is None:
            done(result, None)
        elif isinstance(exc, AgentError):
            done(None, exc)
        elif isinstance(exc, OSError):
            done(None, os_error(exc))
        else:
            self._log("internal error in the engine:\n" + "".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__)))
            done(None, InternalError(f"internal error ({type(exc).__name__}: {exc}); the "
                                     "daemon log has the details"))
        return False  # GLib: run once

    def shutdown(self, *, wait: bool = True) -> None:
        """Drop what waits; let the running item finish, and wait for it unless told not to
        (the thread then ends with the process)."""
        self._stopping = True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(_Item(-1, -1, None, None))
        if wait:
            self._thread.join()
