"""Method handlers that read in order: check, authorize, work, reply.

A handler is a generator on the GLib main loop. Where it has to wait, it yields what it waits for,
and the driver resumes it with the answer once that arrives, or throws the error into it:

    def _set_ready(self, call: Call) -> Steps:
        name, ready = call.args
        caller: Caller = yield Authorize(call.declared.action)   # polkit, asynchronously
        record = self._owned(name, caller)
        yield self._engine(lambda: self.engine.set_ready(name, ready))   # on the engine thread
        record.ready = ready
        call.reply()

Why generators rather than callbacks, threads or asyncio: the service already runs on one GLib
main loop, where polkit answers and the engine's results arrive (worker.py hands them over with
idle_add); a generator keeps that single loop and its ordering exactly (every step still runs on
the loop, in the order the callbacks ran), while the code reads top to bottom and cleans up with
ordinary try/finally. asyncio would need a second event loop bridged onto GLib's. An AgentError
that leaves the handler is the call's error reply; a handler without a call (the daemon's own
verify) has its errors logged.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from ..errors import AgentError, PermissionDenied
from .auth import Authorizer, Caller
from .objects import Call
from .worker import Priority, Worker


@dataclass(frozen=True)
class Authorize:
    """Identify the caller and, unless `action` is None (a read-only method), ask polkit for
    it (root always may). Resumes with the Caller; PermissionDenied or Busy is thrown in."""

    action: str | None


@dataclass(frozen=True)
class Run:
    """Run `fn` on `worker`'s thread. Resumes with its result or throws its error in (Busy at
    once when the worker refuses more unprivileged work); `after` runs once the handler has
    taken the result, e.g. to publish the properties the work changed."""

    worker: Worker
    fn: Callable[[], Any]
    priority: Priority = Priority.PRIVILEGED
    after: Callable[[], None] | None = None


Step = Authorize | Run
Steps = Generator[Step, Any, None]


class Driver:
    def __init__(self, auth: Authorizer, log: Callable[[str], None]) -> None:
        self.auth = auth
        self.log = log

    def start(self, steps: Steps, call: Call | None) -> None:
        """Run `steps` up to its first wait (at once, on the loop)."""
        self._advance(steps, call, None, None)

    def _advance(self, steps: Steps, call: Call | None, value: Any,
                 error: AgentError | None) -> None:
        try:
            step = steps.send(value) if error is None else steps.throw(error)
        except StopIteration:
            return
        except AgentError as exc:
            self._failed(call, exc)
            _forget_frames(exc)
            return
        finally:
            if error is not None:
                _forget_frames(error)
        if isinstance(step, Authorize):
            if call is None:
                raise TypeError("Authorize needs a method call")
            self._authorize(step, steps, call)
        else:
            self._run(step, steps, call)

    def _failed(self, call: Call | None, exc: AgentError) -> None:
        if call is not None and not call.answered:
            call.fail(exc)
        else:
            self.log(f"engine call failed: {exc.name}: {exc.message}")

    def _authorize(self, step: Authorize, steps: Steps, call: Call) -> None:
        def identified(caller: Caller | None, error: AgentError | None) -> None:
            if caller is None:
                self._advance(steps, call, None, error or PermissionDenied("unknown caller"))
            elif step.action is None:
                self._advance(steps, call, caller, None)
            else:
                self.auth.authorize(caller, step.action, call.interactive,
                                    lambda denied: self._advance(steps, call, caller, denied))
        self.auth.identify(call.sender, identified)

    def _run(self, step: Run, steps: Steps, call: Call | None) -> None:
        def finished(result: Any, error: AgentError | None) -> None:
            self._advance(steps, call, result, error)
            if step.after is not None:
                step.after()
        try:
            step.worker.submit(step.fn, finished, step.priority)
        except AgentError as exc:  # refused at once (Busy): nothing was queued
            self._advance(steps, call, None, exc)


def _forget_frames(exc: BaseException) -> None:
    """Drop the traceback of an error that has been answered. It holds the handler's frame and,
    through each frame's caller, the callback that threw the error in, which holds the error:
    a cycle that would keep the call and its arguments (megabytes a caller may send) alive until
    the cycle collector ran. Measured by the D-Bus fuzzer's memory probe."""
    exc.__traceback__ = None
    if exc.__context__ is not None and exc.__context__ is not exc:
        exc.__context__.__traceback__ = None
