"""The engine's one face: the verbs the service, the CLI and the rehearsal call, and the few
read-only queries the service publishes.

    IDLE -> PREPARING -> PREPARED -> COMMITTING -> (kexec) -> VERIFYING -> VERIFIED | FAILED
                          PREPARED -> CANCELLING -> IDLE

One operation at a time; every transition is persisted (phase.py) before the work it announces.
The engine talks to the kernel only through a `Host` (real or simulated) and decides with the
pure modules (preflight, scratch, manifest). The work is in the phase modules: recovery.py,
sessions.py, prepare.py, handoff.py (commit), verify.py; what they share is one
`EngineContext` (context.py), which only this class holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import AgentError
from ..facts import TargetImage
from ..imagestrings import ImageStrings
from ..kernel.callerfile import RegularFile
from ..kernel.host import Host
from ..kernel.liveupdate import LiveUpdateSession
from ..kernel.sysinfo import SysInfo
from . import handoff, prepare, recovery, sessions, verify
from .context import EngineConfig, EngineContext
from .handoff import CommitOptions, CommitResult, SessionFdStore
from .history import HISTORY_FILE, HistoryLog, HistoryRead
from .manifest import Manifest, VerifyItem, VerifyReport
from .phase import AgentState, StateStore
from .preflight import PreflightResult
from .prepare import CANCELLED_ON_REQUEST, Plan, PrepareOptions
from .recovery import RecoveryResult
from .scratch_plan import ScratchPlan
from .verifyrun import HostObservation, Retrieved, VerifyRun


class Engine:
    def __init__(self, host: Host, config: EngineConfig, *,
                 fd_store: SessionFdStore | None = None,
                 stored_sessions: dict[str, int] | None = None,
                 on_step_timed: Callable[[str, float], None] | None = None,
                 on_history_note: Callable[[str], None] | None = None) -> None:
        """`fd_store`: where commit parks the session fds in hand-off mode fdstore (None: the
        service has none); `stored_sessions`: the session fds that store handed back at this
        start (name -> fd, now the engine's), which verify adopts instead of retrieving;
        `on_step_timed`: called with (step, seconds) as verify ends each of its steps;
        `on_history_note`: told what a history rewrite did to lines it could not read (moved
        the file aside, or kept them), for the log."""
        self._ctx = EngineContext(host, config, StateStore(config.state_dir),
                                  ImageStrings(config.state_dir),
                                  HistoryLog(config.state_dir / HISTORY_FILE,
                                             config.history_max_entries,
                                             config.history_max_bytes,
                                             on_history_note),
                                  fd_store=fd_store,
                                  stored_sessions=dict(stored_sessions or {}))
        if on_step_timed is not None:
            self._ctx.on_step_timed = on_step_timed

    def set_progress_listener(self, on_progress: Callable[[int], None],
                              on_phase: Callable[[str, int, int], None] | None = None) -> None:
        """Called with a percentage as an operation advances (the daemon's Job.Progress), and
        with (phase, bytes done, bytes total) as it enters a phase or its bytes advance
        (Job.Phase, Job.Bytes); they run on the caller's thread and must not call back into
        the engine."""
        self._ctx.on_progress = on_progress
        if on_phase is not None:
            self._ctx.on_phase = on_phase

    # ------------------------------------------------------------------ read-only queries

    @property
    def state(self) -> AgentState:
        """The current state (phase, message, target, last result). Read it, never change it."""
        return self._ctx.state

    @property
    def simulated(self) -> bool:
        return self._ctx.host.simulated

    @property
    def manifest_path(self) -> Path:
        return self._ctx.store.manifest_path

    @property
    def verified_manifest(self) -> Manifest | None:
        """What the last verification in this process compared with."""
        return self._ctx.verified_manifest

    @property
    def claim_deadline(self) -> float | None:
        """Monotonic time after which unclaimed incoming sessions are finished."""
        return self._ctx.claim_deadline

    @property
    def parked(self) -> list[str]:
        """The sessions parked in the fd store at commit (hand-off mode fdstore)."""
        return list(self._ctx.parked)

    @property
    def persist_problem(self) -> str | None:
        """Why the last state write failed, while it does."""
        return self._ctx.persist_problem

    def history(self) -> HistoryRead:
        """Every attempt the history holds, oldest first, and the lines it had to skip. Reads
        a file only: may run beside the engine thread."""
        read = self._ctx.history.read()
        if self._ctx.history_problem is not None:
            read.problems.append(f"the last history write failed: {self._ctx.history_problem}")
        return read

    def outgoing_sessions(self) -> dict[str, bool]:
        """The clients' sessions for the next kernel: name -> ready."""
        return {name: c.ready for name, c in self._ctx.clients.items()}

    def released_sessions(self) -> dict[str, str]:
        """Client sessions the engine dropped without their owners asking: name -> why."""
        return dict(self._ctx.released)

    def outgoing_liveupdate_number(self) -> int | None:
        """The running kernel's LUO liveupdate number, when it can be read."""
        return prepare.outgoing_liveupdate_number(self._ctx)

    def sysinfo(self) -> SysInfo:
        return self._ctx.sysinfo()

    def handoff_mode(self, info: SysInfo | None = None) -> str:
        return self._ctx.handoff_mode(info)

    # ------------------------------------------------------------------ start and stop

    def start(self) -> RecoveryResult:
        return recovery.start(self._ctx)

    def close(self) -> None:
        """Drop every kernel handle (process exit does the same). What is parked in the fd
        store stays there: that is the point of parking."""
        ctx = self._ctx
        for fd in ctx.stored_sessions.values():
            os.close(fd)
        ctx.stored_sessions.clear()
        for session in ctx.incoming.values():
            session.close()
        ctx.incoming.clear()
        for client in ctx.clients.values():
            client.close()
        ctx.clients.clear()
        if ctx.agent_session is not None:
            ctx.agent_session.close()
            ctx.agent_session = None
        if ctx.device is not None:
            ctx.device.close()
            ctx.device = None

    # ------------------------------------------------------------------ sessions

    def create_session(self, name: str, owner: str, digests: bool | None = None, *,
                       owner_fd_store: bool = False) -> LiveUpdateSession:
        return sessions.create_session(self._ctx, name, owner, digests, owner_fd_store)

    def preserve(self, name: str, fd: int, token: int) -> None:
        sessions.preserve(self._ctx, name, fd, token)

    def set_ready(self, name: str, ready: bool) -> None:
        sessions.set_ready(self._ctx, name, ready)

    def owner_gone(self, name: str, *, never_told: bool = False) -> None:
        sessions.owner_gone(self._ctx, name, never_told)

    def release_session(self, name: str) -> None:
        sessions.release_session(self._ctx, name)

    def claim_session(self, name: str) -> LiveUpdateSession:
        return sessions.claim_session(self._ctx, name)

    def finish_expired(self, now: float | None = None) -> list[str]:
        return sessions.finish_expired(self._ctx, now)

    def adopt_session(self, fd: int, name: str) -> LiveUpdateSession:
        """A session fd someone hands in (the caller's fd becomes the session's)."""
        return self._ctx.host.liveupdate.adopt_session(fd, name)

    def kept_session_owner(self, name: str) -> str:
        return sessions.kept_session_owner(self._ctx, name)

    def check_kept_session(self, name: str, session: LiveUpdateSession) -> list[VerifyItem]:
        return sessions.check_kept_session(self._ctx, name, session)

    # ------------------------------------------------------------------ planning and prepare

    def decode_target(self, kernel: RegularFile) -> TargetImage:
        """A target kernel image read and decoded (kept for the prepare that follows)."""
        return self._ctx.images.get(kernel)

    def plan(self, target: TargetImage | None, initrd_size: int = 0, *,
             margin: float | None = None) -> Plan:
        return prepare.plan(self._ctx, target, initrd_size, margin=margin)

    def gather_preflight(self, target_path: Path | None, initrd: Path | None) -> PreflightResult:
        return prepare.gather_preflight(self._ctx, target_path, initrd)

    def plan_prepare(self, options: PrepareOptions) -> dict[str, Any]:
        return prepare.plan_prepare(self._ctx, options)

    def scratch_plan(self, kernel: Path | TargetImage | None, initrd_size: int = 0,
                     margin: float | None = None) -> ScratchPlan:
        return prepare.scratch_plan(self._ctx, kernel, initrd_size, margin)

    def prepare(self, options: PrepareOptions) -> Manifest:
        return prepare.prepare(self._ctx, options)

    def cancel(self, why: str = CANCELLED_ON_REQUEST) -> str:
        """`why`: what the owners of the released sessions are told."""
        return prepare.cancel(self._ctx, why)

    # ------------------------------------------------------------------ commit

    def commit(self, options: CommitOptions) -> CommitResult:
        return handoff.commit(self._ctx, options)

    def commit_policy_refusal(self, options: CommitOptions) -> AgentError | None:
        """The error a commit would be refused with now by policy (inhibitors, the window, the
        hand-off mode), asked before anything is prepared; None: none. Changes nothing."""
        return handoff.policy_refusal(self._ctx, options)

    # ------------------------------------------------------------------ verify

    def verify(self) -> VerifyReport:
        return verify.verify(self._ctx)

    def verify_begin(self) -> VerifyRun:
        return verify.verify_begin(self._ctx)

    def verify_retrieve(self, run: VerifyRun) -> Retrieved | None:
        return verify.verify_retrieve(self._ctx, run)

    def verify_observe(self, run: VerifyRun) -> HostObservation:
        """Step 2: needs no engine state, so the daemon runs it on a thread of its own."""
        return verify.verify_observe(self._ctx, run)

    def verify_conclude(self, run: VerifyRun, found: HostObservation) -> VerifyReport:
        return verify.verify_conclude(self._ctx, run, found)

    def verify_abandon(self, run: VerifyRun, reason: str) -> None:
        verify.verify_abandon(self._ctx, run, reason)
