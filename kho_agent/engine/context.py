"""What the engine holds between two calls, and the plumbing every phase uses.

`EngineContext` is the engine's one record: the host, the persisted state (phase.py) and every
kernel handle the engine holds. The phase modules (recovery, sessions, prepare, handoff, verify)
are plain functions over it; only the facade (facade.py) holds one, and nobody outside the
engine reads or sets its fields.

Every transition is persisted before the work it announces, so a restart knows where it was.
"""

from __future__ import annotations

import copy
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config.window import Window
from ..errors import AgentError, Busy, errno_text, with_message
from ..facts import TargetImageCache
from ..imagestrings import ImageStrings
from ..kernel.host import Host
from ..kernel.liveupdate import LiveUpdateDevice, LiveUpdateSession
from ..kernel.sysinfo import SysInfo, read_boot_id, read_sysinfo
from .history import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, HistoryLog
from .manifest import Manifest
from .phase import AgentState, Phase, StateStore, move_aside
from .preflight import handoff_mode
from .verifyrun import VerifyRun, timed_step

if TYPE_CHECKING:
    from .handoff import SessionFdStore
    from .prepare import Plan
    from .sessions import ClientSession

MAX_RELEASED_KEPT = 256   # names of released sessions remembered for their owners' later calls


@dataclass
class EngineConfig:
    state_dir: Path
    digests: bool = True          # default for sessions that do not say
    scratch_margin: float = 0.25
    # After verify, incoming client sessions wait this long for their owners; then they are
    # finished (their memory is discarded). None: wait until an operator finishes them.
    claim_grace_seconds: float | None = 1800.0
    # Commit policy from kho-agent.conf(5): the hand-off mode this host must use ("auto": the
    # one it offers; else preflight.handoff_mode's name of it), the maintenance window (empty:
    # any time; --force overrides it) and, for messages, where each was set (key -> file:line)
    handoff_required: str = "auto"
    maintenance_window: tuple[Window, ...] = ()
    setting_origins: tuple[tuple[str, str], ...] = ()

    def origin(self, key: str) -> str:
        return dict(self.setting_origins).get(key, "the configuration")
    # The history of attempts (history.py): the newest this many, in at most this many bytes
    history_max_entries: int = DEFAULT_MAX_ENTRIES
    history_max_bytes: int = DEFAULT_MAX_BYTES


@dataclass
class EngineContext:
    host: Host
    config: EngineConfig
    store: StateStore
    # the version strings of the images prepare decoded: verify, after the kexec into one
    # of them, finds its own image's strings there instead of decompressing it again
    image_strings: ImageStrings
    history: HistoryLog
    images: TargetImageCache = field(default_factory=TargetImageCache)
    state: AgentState = field(default_factory=AgentState)
    device: LiveUpdateDevice | None = None
    agent_session: LiveUpdateSession | None = None
    clients: dict[str, ClientSession] = field(default_factory=dict)
    incoming: dict[str, LiveUpdateSession] = field(default_factory=dict)  # retrieved, for owners
    commit_blocker: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    verifying: VerifyRun | None = None  # a verification between its steps
    handed_off: bool = False
    # the plan the prepared update was made with; only prepare sets it (planning calls get
    # their own copies), cancel and a failed prepare clear it
    plan: Plan | None = None
    prepared: Manifest | None = None
    # client sessions the engine dropped without their owner asking (cancel), with why: the
    # daemon tells each owner, and a later call on the name says what happened
    released: dict[str, str] = field(default_factory=dict)
    persist_problem: str | None = None  # the last state write that failed
    history_problem: str | None = None  # the last history write that failed
    # monotonic time after which unclaimed incoming sessions are finished (set by verify)
    claim_deadline: float | None = None
    verified_manifest: Manifest | None = None  # what the last verify compared with
    # Called with a percentage as an operation advances (the daemon's Job.Progress); it
    # runs on the caller's thread and must not call back into the engine.
    on_progress: Callable[[int], None] = lambda percent: None
    # Called with (phase, bytes done, bytes total) as an operation enters a phase and, where
    # bytes are what takes the time (digests), as they advance (total 0: not counted in bytes).
    # The daemon's Job.Phase and Job.Bytes; same thread rules as on_progress.
    on_phase: Callable[[str, int, int], None] = lambda phase, done, total: None
    # Called with (step, seconds) as verify ends each of its steps (the daemon logs them):
    # after a kexec a VM manager waits on verify, so where its time goes is worth a line.
    on_step_timed: Callable[[str, float], None] = lambda step, seconds: None
    # Hand-off mode fdstore (handoff.py): where commit parks the session fds (None: the
    # service has no fd store), what is parked now, and the session fds the store handed
    # back at start (name -> fd), which verify adopts instead of retrieving.
    fd_store: SessionFdStore | None = None
    parked: list[str] = field(default_factory=list)
    stored_sessions: dict[str, int] = field(default_factory=dict)

    # ------------------------------------------------------------------ one operation at a time

    @contextmanager
    def operation(self, name: str) -> Iterator[None]:
        self.acquire(name)
        try:
            yield
        finally:
            self.lock.release()

    def acquire(self, name: str) -> None:
        if self.handed_off:
            raise Busy("the host has kexec'd; this agent instance is finished")
        if not self.lock.acquire(blocking=False):
            if self.verifying is not None:
                raise Busy(f"the live update is being verified; {name} was not started")
            raise Busy(f"another operation is running; {name} was not started")

    # ------------------------------------------------------------------ transitions

    def transition(self, phase: Phase, message: str, *, strict: bool = True,
                   **changes: Any) -> None:
        """Move to `phase`: the whole new state is built and saved first. `strict` (announce
        before acting): a state that cannot be saved raises and nothing changes, in memory
        either. Not strict (record what already happened): memory moves on anyway, and the
        save failure is kept in `persist_problem`."""
        new = copy.deepcopy(self.state)
        new.phase = phase
        new.message = message
        new.boot_id = self.boot_id()
        for key, value in changes.items():
            setattr(new, key, value)
        try:
            self.store.save(new)
        except AgentError as exc:
            if strict:
                raise
            self.persist_problem = exc.message
        else:
            self.persist_problem = None
        self.state = new

    def transition_best_effort(self, cause: AgentError, phase: Phase, message: str,
                               **changes: Any) -> AgentError:
        """For rollbacks: a state that cannot be written (disk full) must not hide the error
        being reported (`cause`). Returns the error to raise: `cause`, or a copy of it that
        also says the state was not saved (the raised one is not changed). The in-memory state
        moves on; the file keeps the earlier phase, which a restart in this boot resolves to
        "cancelled"."""
        self.transition(phase, message, strict=False, **changes)
        if self.persist_problem is None:
            return cause
        return with_message(cause, f"{cause.message}; in addition the agent's state could not "
                            f"be saved ({self.persist_problem}): until it can, a restart of the "
                            "agent reports an earlier state")

    # ------------------------------------------------------------------ the host

    def sysinfo(self) -> SysInfo:
        return read_sysinfo(self.host.root)

    def boot_id(self) -> str:
        """This boot's id, without the rest of sysinfo (no `systemctl --version` fork)."""
        return read_boot_id(self.host.root)

    def open_device(self) -> LiveUpdateDevice:
        if self.device is None:
            self.device = self.host.liveupdate.open()
        return self.device

    def incoming_present(self) -> bool:
        return self.host.path("sys/kernel/debug/kho/in/fdt").exists()

    def timed(self, step: str) -> AbstractContextManager[None]:
        return timed_step(self.on_step_timed, step)

    def handoff_mode(self, info: SysInfo | None = None) -> str:
        """Who holds the session fds through the shutdown (preflight.handoff_mode): a systemd
        able to carry them (fdstore) needs this service to have an fd store; without one
        (kho-agent-fdstore.conf not installed) the agent holds them itself (direct)."""
        return handoff_mode(info or self.sysinfo(), self.host.simulated, self.fd_store_slots())

    def fd_store_slots(self) -> int:
        return self.fd_store.capacity if self.fd_store is not None else 0

    def unpark_quietly(self, name: str) -> None:
        if self.fd_store is None:
            return
        try:
            self.fd_store.unpark(name)
        except AgentError as exc:  # the copy stays with systemd until the service stops
            self.persist_problem = f"cannot drop session {name!r:.80} from the fd store: {exc}"

    def unpark_all(self) -> None:
        for name in self.parked:
            self.unpark_quietly(name)
        self.parked = []

    # ------------------------------------------------------------------ records

    def remove_manifest(self, notes: list[str]) -> None:
        """The manifest of an update that will not happen goes; whatever sits at its path."""
        path = self.store.manifest_path
        try:
            path.unlink(missing_ok=True)
        except IsADirectoryError:
            try:
                notes.append(f"{path} was a directory: kept as {move_aside(path)}")
            except AgentError as exc:
                notes.append(exc.message)
        except OSError as exc:
            notes.append(f"the manifest {path} could not be removed: {errno_text(exc)}")

    def note_released(self, name: str, why: str) -> None:
        self.released[name] = why
        while len(self.released) > MAX_RELEASED_KEPT:
            del self.released[next(iter(self.released))]

    def release_stored(self, why: str) -> None:
        """Close the session fds the store handed back that nothing will use, and drop them
        from the store: an outgoing session closed here unpreserves its files, an incoming one
        is finished (its memory is discarded)."""
        names = sorted(self.stored_sessions)
        for name in names:
            os.close(self.stored_sessions.pop(name))
            self.unpark_quietly(name)
        note = f"{why}; released {len(names)}: {', '.join(names)}"
        self.transition(self.state.phase, note)
