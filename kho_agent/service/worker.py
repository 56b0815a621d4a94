"""The one thread that talks to the engine. Every orchestrator call (ioctls, kexec_file_load,
digests, decoding) runs here, in submission order, so the GLib main loop stays free to answer the
bus; each result is handed back to the main loop, where replies and signals are sent.

A single thread is the engine's own rule (one operation at a time) made structural: no two
engine calls ever overlap, and the orchestrator needs no locking of its records.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from gi.repository import GLib

from ..errors import AgentError

T = TypeVar("T")
Done = Callable[[Any, AgentError | None], None]


class InternalError(AgentError):
    """A bug surfaced in the engine: the caller gets a reply (never a hang) and the log gets the
    traceback."""

    name = "Failed"


class Worker:
    def __init__(self, log: Callable[[str], None]) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kho-agent-engine")
        self._log = log

    def submit(self, fn: Callable[[], T], done: Callable[[T | None, AgentError | None], None]
               ) -> None:
        """Run `fn` on the engine thread; call `done(result, error)` on the main loop."""
        future = self._pool.submit(fn)
        future.add_done_callback(lambda f: GLib.idle_add(self._deliver, f, done))

    def _deliver(self, future: Future[T], done: Callable[[T | None, AgentError | None], None]
                 ) -> bool:
        exc = future.exception()
        if exc is None:
            done(future.result(), None)
        elif isinstance(exc, AgentError):
            done(None, exc)
        elif isinstance(exc, OSError):
            where = f"{exc.filename}: " if exc.filename else ""
            done(None, AgentError(f"{where}{exc.strerror or exc}"))
        else:
            self._log("internal error in the engine:\n" + "".join(
                traceback.format_exception(type(exc), exc, exc.__traceback__)))
            done(None, InternalError(f"internal error ({type(exc).__name__}: {exc}); the "
                                     "daemon log has the details"))
        return False  # GLib: run once

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
