"""service/steps.py: the driver that runs method handlers written top to bottom.

An answered call must be let go at once, by reference counting, not when the cycle collector gets
to it: a call's arguments can be megabytes from an unprivileged caller, and the D-Bus fuzzer's
memory probe sends eight such calls in a row. These tests run the driver with the collector off
and check that nothing of a refused or failed call is left.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kho_agent.errors import AgentError, NotFound, PermissionDenied
from kho_agent.service.steps import Authorize, Driver, Run, Steps


class FakeCall:
    """What the driver uses of objects.Call: the arguments, the sender, and fail()."""

    def __init__(self) -> None:
        self.args = ("v" * (2 << 20), True)   # a 2 MiB session name, as the fuzzer sends
        self.sender = ":1.7"
        self.interactive = False
        self.answered = False
        self.failed: list[str] = []

    def fail(self, exc: AgentError) -> None:
        self.failed.append(exc.name)
        self.answered = True


class Caller:
    uid = 65534
    sender = ":1.7"


class DenyingAuthorizer:
    """Answers like auth.Authorizer when polkit says no; `later` holds the answer back the way
    the real one answers from the main loop, after the call that asked has returned."""

    def __init__(self) -> None:
        self.later: list[Callable[[], None]] = []

    def identify(self, sender: str, done: Callable[[Any, AgentError | None], None]) -> None:
        self.later.append(lambda: done(Caller(), None))

    def authorize(self, caller: Any, action: str, interactive: bool,
                  done: Callable[[AgentError | None], None]) -> None:
        self.later.append(lambda: done(PermissionDenied(f"uid {caller.uid} is not allowed "
                                                        f"{action}")))

    def run_loop(self) -> None:
        while self.later:
            self.later.pop(0)()


class FailingWorker:
    """A worker whose work fails, answered from the loop as worker.py answers."""

    def __init__(self, loop: DenyingAuthorizer) -> None:
        self.loop = loop

    def submit(self, fn: Callable[[], Any], done: Callable[[Any, AgentError | None], None],
               priority: Any = None) -> None:
        def answer() -> None:
            try:
                done(fn(), None)
            except AgentError as exc:
                done(None, exc)
        self.loop.later.append(answer)


@pytest.fixture(autouse=True)
def no_cycle_collector() -> Iterator[None]:
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _drive(handler: Callable[[FakeCall], Steps], auth: DenyingAuthorizer
           ) -> tuple[weakref.ref[FakeCall], list[str]]:
    call = FakeCall()
    failed = call.failed
    ref = weakref.ref(call)
    Driver(auth, lambda _line: None).start(handler(call), call)  # type: ignore[arg-type]
    del call
    auth.run_loop()
    return ref, failed


def test_a_refused_call_is_let_go_at_once() -> None:
    def handler(call: FakeCall) -> Steps:
        name, _ready = call.args
        caller = yield Authorize("org.khoagent.Agent1.session")
        raise AssertionError(f"{caller} was authorized for {len(name)} bytes")

    ref, failed = _drive(handler, DenyingAuthorizer())
    assert failed == ["PermissionDenied"]
    assert ref() is None, "the refused call is still alive: a cycle holds it"


def test_a_call_whose_work_failed_is_let_go_at_once() -> None:
    auth = DenyingAuthorizer()
    worker = FailingWorker(auth)

    def missing() -> None:
        raise NotFound("no session of that name")

    def handler(call: FakeCall) -> Steps:
        name, _ready = call.args
        yield Run(worker, missing)  # type: ignore[arg-type]
        raise AssertionError(f"{len(name)} bytes: the work did not fail")

    ref, failed = _drive(handler, auth)
    assert failed == ["NotFound"]
    assert ref() is None, "the failed call is still alive: a cycle holds it"


def test_an_error_the_handler_catches_does_not_keep_the_call() -> None:
    auth = DenyingAuthorizer()
    seen: list[str] = []

    def handler(call: FakeCall) -> Steps:
        name, _ready = call.args
        try:
            yield Authorize("org.khoagent.Agent1.session")
        except PermissionDenied as exc:
            seen.append(f"{exc.name} for {len(name)} bytes")
            return

    ref, failed = _drive(handler, auth)
    assert seen == [f"PermissionDenied for {2 << 20} bytes"] and failed == []
    assert ref() is None, "the call is still alive: a cycle holds it"
