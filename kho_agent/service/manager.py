"""The Manager object and its Job and Session objects: the bus face of one Engine.

Runs on the GLib main loop. Every engine call goes to the Worker (one thread, in order) and its
result comes back here, where the reply, the property changes and the signals are sent. Checks
that need no engine (argument types, names, ownership, authorization) happen before anything is
submitted, so a refused call changes nothing.

Each method's handler reads in that order: check the arguments, `yield Authorize(...)` (the
method's polkit action, from the contract), `yield self._engine(...)` for the work, then reply
(steps.py runs them). MANAGER_HANDLERS and JOB_HANDLERS name the handler of every method the
contract declares; the reply and signal types are the contract's.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from gi.repository import Gio, GLib

from ..config import AgentConfig
from ..config.model import INITRD_NONE, TARGET_NEWEST_COMPATIBLE, TARGET_NONE
from ..config.target import (
    KernelCandidate,
    configured_initrd,
    installed_kernels,
    newest_passing,
)
from ..engine import CommitOptions, Engine, Plan, PrepareOptions
from ..engine.manifest import FAILING_VERDICTS, VerifyItem, manifest_to_json, read_manifest
from ..engine.phase import Phase
from ..engine.verifyrun import HostObservation, Retrieved, VerifyRun
from ..errors import (
    AgentError,
    Busy,
    Cancelled,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    PreflightFailed,
)
from ..facts import TARGET_IMAGE_MAX, TargetFiles, TargetImage
from ..kernel.callerfile import RegularFile, adopt_fd, open_regular
from ..kernel.cmdline import check_kho_scratch, target_cmdline
from ..kernel.liveupdate import LiveUpdateSession, validate_session_name, validate_token
from . import contract
from . import interfaces as api
from .auth import Authorizer, Caller, owner_uid
from .errors import check_options
from .inhibitors import MAX_WHO, MAX_WHY, Inhibitors, check_text
from .objects import Call, ExportedObject, Handler
from .steps import Authorize, Driver, Run, Step, Steps
from .worker import Priority, Worker

DEFAULT_BOOT_DIR = Path("/boot")   # where Target=newest-compatible looks
JOB_LINGER_SECONDS = 120   # a finished job stays readable this long after JobRemoved
GRACE_TICK_SECONDS = 30


@dataclass
class Snapshot:
    """The Manager's properties, as the engine thread last saw them."""

    state: str = "idle"
    message: str = ""
    handoff: str = ""
    running: str = ""
    target: str = ""
    liveupdate_number: int = 0
    last_result: str = ""
    # the outgoing client sessions the engine holds (name -> ready), and why the ones it
    # dropped on its own were dropped: the bus objects follow these
    outgoing: dict[str, bool] = field(default_factory=dict)
    released: dict[str, str] = field(default_factory=dict)

    def value(self, name: str, simulated: bool, config: AgentConfig) -> Any:
        """A Manager property (its type is the contract's)."""
        if name == "Simulated":
            return simulated
        if name == "ConfigFiles":
            return list(config.files)
        if name == "ReadyTimeoutUSec":
            return round(config.update_ready_timeout_seconds * 1_000_000)
        return getattr(self, PROPERTY_FIELDS[name])


PROPERTY_FIELDS = {"State": "state", "StateMessage": "message", "HandoffMode": "handoff",
                   "RunningKernel": "running", "TargetKernel": "target",
                   "LiveUpdateNumber": "liveupdate_number", "LastResult": "last_result"}


@dataclass
class Job:
    id: int
    type: str
    path: str
    progress: int = 0
    phase: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    state: str = api.JOB_RUNNING
    result: str = ""
    error_name: str = ""
    error_message: str = ""
    # how the error ended the job (errors.REGISTRY: 3 refused, 2 bad input or cannot run, ...)
    error: AgentError | None = None
    cancel_requested: bool = False
    # who started it: "uid 1000 (:1.42)", for the journal
    caller: str = ""
    obj: ExportedObject | None = None

    def value(self, name: str) -> Any:
        """A Job property (its type is the contract's)."""
        values: dict[str, Any] = {
            "Id": self.id, "Type": self.type, "Progress": self.progress, "Phase": self.phase,
            "Bytes": (self.bytes_done, self.bytes_total), "State": self.state,
            "Result": self.result, "ErrorName": self.error_name,
            "ErrorMessage": self.error_message}
        return values[name]


@dataclass
class SessionObject:
    name: str
    path: str
    owner_uid: int | None          # None: not known (a manifest from another tool): root only
    owner_sender: str
    incoming: bool
    tokens: list[int] = field(default_factory=list)
    ready: bool = False
    claimed: bool = False
    verifying: bool = False        # incoming with digests: held until they are checked
    handle: LiveUpdateSession | None = None  # a claimed incoming session, until FINISH
    obj: ExportedObject | None = None

    def value(self, name: str) -> Any:
        """A Session property (its type is the contract's)."""
        values: dict[str, Any] = {
            "Name": self.name,
            "Owner": (self.owner_uid if self.owner_uid is not None else 0xFFFFFFFF,
                      self.owner_sender),
            "Tokens": self.tokens, "Ready": self.ready, "Claimed": self.claimed,
            "Incoming": self.incoming}
        return values[name]


@dataclass
class Hooks:
    """What the daemon does around the service: sd_notify, the journal, the exit."""

    state_changed: Callable[[Snapshot, Snapshot], None] = lambda old, new: None
    job_finished: Callable[[Job], None] = lambda job: None
    handed_off: Callable[[], None] = lambda: None
    discarded: Callable[[list[str]], None] = lambda names: None
    # verify retrieved the incoming sessions: (claimable now, held until their digests
    # are checked)
    incoming: Callable[[list[str], list[str]], None] = lambda now, held: None
    log: Callable[[str], None] = lambda text: None
    # who holds live updates off now ("who (uid: why)" each)
    inhibitors_changed: Callable[[tuple[str, ...]], None] = lambda held: None


class AgentService:
    def __init__(self, bus: Gio.DBusConnection, engine: Engine, authorizer: Authorizer,
                 worker: Worker, hooks: Hooks, config: AgentConfig | None = None,
                 boot_dir: Path = DEFAULT_BOOT_DIR) -> None:
        self.bus = bus
        # kho-agent.conf(5): Prepare takes its target and command line from it when the
        # caller names none; the engine has the rest (EngineConfig)
        self.config = config or AgentConfig()
        self.boot_dir = boot_dir
        self.engine = engine
        self.auth = authorizer
        self.worker = worker
        # Reads that need no engine state (the manifest file) must not wait behind a job
        self.reader = Worker(hooks.log, name="kho-agent-reader")
        # Files unprivileged callers pass are read here, not on the engine thread: a file on a
        # filesystem its owner controls (FUSE) can block a read for ever, and then only other
        # unprivileged callers wait (bounded: beyond a few they are told Busy)
        self.files = Worker(hooks.log, name="kho-agent-files")
        # The part of verify that needs no engine state (digests, KHO state, network, ABI)
        # runs here, so the engine hands the owners their sessions meanwhile (verifyrun.py)
        self.observer = Worker(hooks.log, name="kho-agent-observer")
        self.retrieving = False   # verify is retrieving the incoming sessions
        self.hooks = hooks
        self.simulated = engine.simulated
        self.snapshot = Snapshot()
        self.jobs: dict[int, Job] = {}
        self.current: Job | None = None
        self.next_job_id = 1
        self.sessions: dict[str, SessionObject] = {}
        self.handed_off = False
        engine.set_progress_listener(self._progress_from_engine, self._phase_from_engine)
        # the last bytes published of the current phase: Bytes changes at most every 1%
        self._bytes_published = 0
        authorizer.gone_callbacks.append(self._owner_gone)
        self.driver = Driver(authorizer, hooks.log)
        self.inhibitors = Inhibitors(self._inhibitors_changed, hooks.log)
        self.manager = ExportedObject(bus, api.MANAGER_PATH, contract.MANAGER, {
            name: self._handle(handler) for name, handler in MANAGER_HANDLERS.items()},
            self._property)
        self._grace_source = GLib.timeout_add_seconds(GRACE_TICK_SECONDS, self._grace_tick)

    def _property(self, name: str) -> Any:
        if name == "Inhibitors":
            return self.inhibitors.rows()
        return self.snapshot.value(name, self.simulated, self.config)

    def _inhibitors_changed(self) -> None:
        self.manager.changed(["Inhibitors"])
        self.hooks.inhibitors_changed(self.inhibitors.descriptions())

    # ------------------------------------------------------------------ engine plumbing

    def _engine(self, fn: Callable[[], Any],
                priority: Priority = Priority.PRIVILEGED) -> Run:
        """A step that runs `fn` on the engine thread; the properties are refreshed after every
        engine call, whether it succeeded or not."""
        return Run(self.worker, fn, priority, after=self.refresh)

    def _handle(self, handler: Callable[[AgentService, Call], Steps | None]) -> Handler:
        """A method handler as objects.py calls it: the steps run by the driver."""
        def called(call: Call) -> None:
            steps = handler(self, call)
            if steps is not None:
                self.driver.start(steps, call)
        return called

    def refresh(self) -> None:
        """Read the engine's state on the engine thread and publish what changed."""
        self.worker.submit(self._read_snapshot, self._publish)

    def _read_snapshot(self) -> Snapshot:
        engine = self.engine
        state = engine.state
        info = engine.sysinfo()
        number = 0
        if state.phase is not Phase.COMMITTING and not self.handed_off:
            number = engine.outgoing_liveupdate_number() or 0
        return Snapshot(
            state=state.phase.value, message=state.message,
            handoff=engine.handoff_mode(info), running=info.release,
            target=state.target.kernel if state.target else "", liveupdate_number=number,
            last_result=json.dumps(state.last_result, sort_keys=True)
            if state.last_result is not None else "",
            outgoing=engine.outgoing_sessions(),
            released=engine.released_sessions())

    def _publish(self, snap: Snapshot | None, error: AgentError | None) -> None:
        if snap is None:
            if error is not None:
                self.hooks.log(f"cannot read the engine state: {error.message}")
            return
        old, self.snapshot = self.snapshot, snap
        changed = [prop for prop, attr in PROPERTY_FIELDS.items()
                   if getattr(old, attr) != getattr(snap, attr)]
        self.manager.changed(changed)
        if changed:
            self.hooks.state_changed(old, snap)
        self._reconcile_sessions(snap)

    def _reconcile_sessions(self, snap: Snapshot) -> None:
        """The session objects follow what the engine holds: a session the engine dropped
        without its owner asking (cancel, its owner gone) goes away here, with SessionReleased
        saying why, so ListSessions never shows what the agent no longer holds."""
        for record in [r for r in self.sessions.values() if not r.incoming]:
            if record.name not in snap.outgoing:
                reason = snap.released.get(record.name, "the agent no longer holds it")
                self._drop_session(record)
                self.manager.emit("SessionReleased", record.name, record.path, reason)
                self.hooks.log(f"session {record.name!r} released: {reason}")
            elif record.ready != snap.outgoing[record.name]:
                record.ready = snap.outgoing[record.name]
                if record.obj is not None:
                    record.obj.changed(["Ready"])

    def _owner_gone(self, sender: str, *, never_told: bool = False) -> None:
        """A client's bus connection closed: its sessions are marked so (a commit refused for
        them says why), and released when the creator left before it learned of them."""
        names = [r.name for r in self.sessions.values()
                 if not r.incoming and r.owner_sender == sender]
        if not names:
            return

        def work() -> None:
            for name in names:
                self.engine.owner_gone(name, never_told=never_told)

        def steps() -> Steps:
            yield self._engine(work)
        self.driver.start(steps(), None)

    def _progress_from_engine(self, percent: int) -> None:
        # engine thread: hop to the loop
        GLib.idle_add(self._set_progress, percent)

    def _phase_from_engine(self, phase: str, done: int, total: int) -> None:
        # engine thread: hop to the loop
        GLib.idle_add(self._set_phase, phase, done, total)

    def _set_phase(self, phase: str, done: int, total: int) -> bool:
        job = self.current
        if job is None:
            return False
        changed = []
        if phase != job.phase:
            job.phase, self._bytes_published = phase, -1
            changed.append("Phase")
        step = max(1, total // 100)
        if (done, total) != (job.bytes_done, job.bytes_total) and (
                done - self._bytes_published >= step or done == total
                or self._bytes_published < 0):
            job.bytes_done, job.bytes_total = done, total
            self._bytes_published = done
            changed.append("Bytes")
        if changed and job.obj is not None:
            job.obj.changed(changed)
        return False

    def _set_progress(self, percent: int) -> bool:
        job = self.current
        if job is not None and percent > job.progress:
            job.progress = min(percent, 99)
            if job.obj is not None:
                job.obj.changed(["Progress"])
        return False

    # ------------------------------------------------------------------ ownership

    def _owned(self, name: str, caller: Caller) -> SessionObject:
        record = self.sessions.get(name)
        if record is None:
            why = self.snapshot.released.get(name)
            if why is not None:
                raise NotFound(f"session {name!r:.80} was released: {why}")
            raise NotFound(f"no session {name!r:.80} (ListSessions shows the known ones)")
        if caller.uid != 0 and record.owner_uid != caller.uid:
            raise PermissionDenied(f"session {name!r:.80} belongs to uid "
                                   f"{record.owner_uid}; only its owner or root may use it")
        return record

    # ------------------------------------------------------------------ read-only methods

    def _preflight(self, call: Call) -> Steps:
        opts = check_options(call)
        caller: Caller = yield Authorize(call.declared.action)
        source = TargetSource.from_options(call, opts, caller)
        plan: Plan = yield from self._planned(caller, source)
        call.reply(json.dumps(plan.result.to_json()))

    def _scratch_plan(self, call: Call) -> Steps:
        opts = check_options(call)
        margin = opts.get("margin")
        caller: Caller = yield Authorize(call.declared.action)
        source = TargetSource.from_options(call, opts, caller)
        if not source.given:  # the running kernel's own image: the daemon's own file
            own: dict[str, Any] = yield self._engine(
                lambda: self.engine.scratch_plan(None, 0, margin).to_json(), _priority(caller))
            call.reply(json.dumps(own))
            return
        plan: Plan = yield from self._planned(caller, source, margin=margin)
        if plan.scratch is None:  # a target that cannot be read raised already (_planned)
            raise InvalidArgument("no scratch plan for this target")
        call.reply(json.dumps(plan.scratch.to_json()))

    def _planned(self, caller: Caller, source: TargetSource, *,
                 margin: float | None = None) -> Generator[Step, Any, Plan]:
        """Plan for the caller's target without touching the prepared update. Root's files are
        opened and read on the engine thread; an unprivileged caller's (always passed fds) are
        read on the files thread, and its planning waits behind every privileged call. A
        target that cannot be opened or read is the error that says why (NotFound,
        InvalidArgument, PermissionDenied), for Preflight as for ScratchPlan and Prepare."""
        def read() -> tuple[TargetImage | None, int]:
            if not source.given:  # the host alone: no target to read
                return None, 0
            with source.open() as files:
                return self.engine.decode_target(files.kernel), files.initrd_size

        def plan(target: TargetImage | None, initrd_size: int) -> Plan:
            return self.engine.plan(target, initrd_size, margin=margin)

        priority = _priority(caller)
        if priority is Priority.PRIVILEGED:
            planned: Plan = yield self._engine(lambda: plan(*read()))
            return planned
        try:
            target, initrd_size = yield Run(self.files, read, Priority.UNPRIVILEGED)
        except AgentError:
            source.close()  # refused before it was read (Busy); after, the read closed it
            raise
        planned = yield self._engine(lambda: plan(target, initrd_size), priority)
        return planned

    def _get_manifest(self, call: Call) -> Steps:
        path = self.engine.manifest_path
        text: str = yield Run(self.reader,
                              lambda: manifest_to_json(read_manifest(path)).decode())
        call.reply(text)

    def _history(self, call: Call) -> Steps:
        # a file read: beside the engine thread, never behind a job
        text: str = yield Run(self.reader, lambda: json.dumps(self.engine.history().to_json()))
        call.reply(text)

    def _inhibit(self, call: Call) -> Steps:
        who, why = call.args
        check_text(who, "who", MAX_WHO, required=False)  # refused before polkit is asked
        check_text(why, "why", MAX_WHY, required=True)
        caller: Caller = yield Authorize(call.declared.action)
        fd = self.inhibitors.take(who, why, caller.uid)
        try:
            call.reply(0, fds=[fd])
        finally:
            os.close(fd)  # the holder's copy is the inhibitor now

    def _list_sessions(self, call: Call) -> None:
        rows = [(s.name, s.path, s.owner_uid if s.owner_uid is not None else 0xFFFFFFFF,
                 s.owner_sender, s.ready, s.claimed, s.incoming)
                for s in sorted(self.sessions.values(), key=lambda s: s.name)]
        call.reply(rows)

    # ------------------------------------------------------------------ jobs

    def _run_job(self, call: Call, kind: str,
                 make_work: Callable[[Caller, Job], Callable[[], Any]],
                 outcome: Callable[[Any], dict[str, Any]],
                 cleanup: Callable[[], None] = lambda: None) -> Steps:
        """Authorize, start the job (the reply is its path), run its work, publish how it
        ended. `cleanup` runs once whatever happens (e.g. closing the fds the call passed),
        before the job's end is published."""
        try:
            caller: Caller = yield Authorize(call.declared.action)
            job = self._begin_job(kind)
            job.caller = f"uid {caller.uid} ({caller.sender})"
            try:
                work = make_work(caller, job)
            except AgentError:  # refused before any work: the job never existed
                self._discard_job(job)
                raise
            call.reply(job.path)
            error: AgentError | None = None
            try:
                result = yield Run(self.worker, work)
            except AgentError as exc:
                result, error = None, exc
        finally:
            cleanup()
        self._job_done(job, result, error, outcome)

    def _begin_job(self, kind: str) -> Job:
        """A new running job, unless one runs or the host is handing off (Busy)."""
        if self.current is not None:
            raise Busy(f"job {self.current.id} ({self.current.type}) is running; wait "
                       "for its JobRemoved signal")
        if self.handed_off:
            raise Busy("the host is handing off to the next kernel")
        return self._new_job(kind)

    def _new_job(self, kind: str) -> Job:
        """A running job, exported on the bus, as the current one."""
        job = Job(self.next_job_id, kind, f"{api.JOB_PATH_PREFIX}{self.next_job_id}")
        self.next_job_id += 1
        job.obj = ExportedObject(self.bus, job.path, contract.JOB, {
            name: functools.partial(self._handle_job, handler, job)
            for name, handler in JOB_HANDLERS.items()}, job.value)
        self.jobs[job.id] = job
        self.current = job
        return job

    def _handle_job(self, handler: Callable[[AgentService, Call, Job], Steps], job: Job,
                    call: Call) -> None:
        self.driver.start(handler(self, call, job), call)


    def _job_done(self, job: Job, result: Any, error: AgentError | None,
                  outcome: Callable[[Any], dict[str, Any]]) -> None:
        if error is not None:
            state = api.JOB_CANCELED if isinstance(error, Cancelled) else api.JOB_FAILED
            job.state, job.error_name, job.error_message = (state, error.dbus_name,
                                                            error.message)
            job.error = error
        else:
            data = outcome(result)
            job.state = api.JOB_CANCELED if data.get("canceled") else api.JOB_DONE
            job.result = json.dumps(data, sort_keys=True)
            job.progress = 100
        self.current = None
        if job.obj is not None:
            job.obj.changed(["Progress", "State", "Result", "ErrorName", "ErrorMessage"])

        def published(snap: Snapshot | None, snap_error: AgentError | None) -> None:
            # properties first, then JobRemoved: a client that reads State on JobRemoved sees
            # the state the job left
            self._publish(snap, snap_error)
            self.manager.emit("JobRemoved", job.id, job.path, job.state)
            self.hooks.job_finished(job)
            GLib.timeout_add_seconds(JOB_LINGER_SECONDS, self._forget_job, job)
            if self.handed_off:
                self.hooks.handed_off()
        self.worker.submit(self._read_snapshot, published)

    def _discard_job(self, job: Job) -> None:
        if job.obj is not None:
            job.obj.unregister()
        self.jobs.pop(job.id, None)
        if self.current is job:
            self.current = None

    def _forget_job(self, job: Job) -> bool:
        if job.obj is not None:
            job.obj.unregister()
        self.jobs.pop(job.id, None)
        return False

    def cancel_running_prepare(self) -> None:
        """A stop while a prepare runs: it rolls back at its next step rather than running to
        its end (a long digest would outlast the unit's TimeoutStopSec and be killed)."""
        job = self.current
        if job is not None and job.type == "prepare" and job.state == api.JOB_RUNNING:
            job.cancel_requested = True

    def _cancel_job(self, call: Call, job: Job) -> Steps:
        yield Authorize(call.declared.action)
        if job.state != api.JOB_RUNNING:
            raise Busy(f"job {job.id} has already ended ({job.state})")
        if job.type != "prepare":
            raise Busy(f"a {job.type} job cannot be cancelled once it runs")
        job.cancel_requested = True  # the prepare rolls back at its next step
        call.reply()

    def _prepare(self, call: Call) -> Steps:
        opts = check_options(call)
        configured = not opts.get("kernel") and "kernel_fd" not in opts
        if configured and self.config.target == TARGET_NONE:
            raise InvalidArgument("Prepare: option 'kernel' or 'kernel_fd' (the target image) "
                                  "is required: the configuration names no Target= "
                                  "(kho-agent.conf(5))")
        if configured and (opts.get("initrd") or "initrd_fd" in opts):
            raise InvalidArgument("Prepare: an initrd without a kernel; the configured Target= "
                                  "brings its own")
        scratch = opts.get("scratch", "keep")
        if scratch not in ("keep", "auto"):
            check_kho_scratch(scratch)  # InvalidArgument before it reaches a command line
        cmdline = opts.get("cmdline")
        if cmdline is not None:
            target_cmdline(cmdline)  # refused with the reason before any job starts
        sources: list[TargetSource] = []

        def make_work(caller: Caller, job: Job) -> Callable[[], Any]:
            if not configured:
                sources.append(TargetSource.from_options(call, opts, caller))

            def source() -> TargetSource:
                """The caller's files, or the configured target's (chosen on the engine thread:
                newest-compatible runs the preflight on the candidates)."""
                if not configured:
                    return sources[0]
                sources.append(self._configured_target())
                return sources[-1]

            def options(files: TargetFiles) -> PrepareOptions:
                line = cmdline if cmdline is not None else self.config.command_line_for(
                    self.engine.sysinfo().cmdline)
                return PrepareOptions(kernel=files.kernel, initrd=files.initrd, cmdline=line,
                                      scratch=scratch,
                                      cancelled=lambda: job.cancel_requested)
            if opts.get("dry_run"):
                # read on the loop, where inhibitors come and go (as Commit reads them)
                held = CommitOptions(inhibitors=self.inhibitors.descriptions())

                def dry() -> dict[str, Any]:
                    with source().open() as files:
                        planned = self.engine.plan_prepare(options(files))
                    # what a commit of it would be refused with now, whatever the clients
                    # say: `kho-agentctl update` refuses with it before preparing
                    refusal = self.engine.commit_policy_refusal(held)
                    return {**planned, "commit_refused": refusal.to_json() if refusal
                            else None}
                return dry

            def work() -> dict[str, Any]:
                with source().open() as files:
                    manifest = self.engine.prepare(options(files))
                target = self.engine.state.target
                return {"prepared": target.kernel if target else "",
                        "cmdline": manifest.cmdline_to,
                        "sessions": [s.name for s in manifest.sessions]}
            return work

        def cleanup() -> None:
            for source in sources:
                source.close()
        yield from self._run_job(call, "prepare", make_work,
                                 lambda data: {"dry_run": True, **data} if opts.get("dry_run")
                                 else dict(data), cleanup)

    def _configured_target(self) -> TargetSource:
        """Target= of the configuration (engine thread): a fixed path, or the newest kernel in
        the boot directory whose preflight has no blocker; with its initrd by Initrd= (the one
        installed beside it, none, or a path). Looked up at each prepare: an initrd installed
        after the daemon started is found."""
        where = self.config.origin("Target")
        if self.config.target != TARGET_NEWEST_COMPATIBLE:
            kernel = Path(self.config.target)
            initrd = configured_initrd(kernel, self.config.initrd)
            self.hooks.log(f"Target= ({where}): {kernel} with initrd {initrd or 'none'} "
                           f"(Initrd={self.config.initrd})")
            return TargetSource(str(kernel), str(initrd) if initrd else None)

        def initrd_of(candidate: KernelCandidate) -> str | None:
            if self.config.initrd == INITRD_NONE or candidate.initrd is None:
                return None
            return str(candidate.initrd)

        def gate(candidate: KernelCandidate) -> str | None:
            source = TargetSource(str(candidate.kernel), initrd_of(candidate))
            try:
                with source.open() as files:
                    target = self.engine.decode_target(files.kernel)
                    plan = self.engine.plan(target, files.initrd_size)
            except AgentError as exc:
                return exc.message
            blockers = plan.result.blockers
            return "; ".join(b.message for b in blockers) if blockers else None
        selection = newest_passing(installed_kernels(self.boot_dir), gate)
        chosen = selection.chosen
        if chosen is None:
            raise PreflightFailed(f"Target=newest-compatible ({where}): no kernel in "
                                  f"{self.boot_dir} passes the preflight: "
                                  f"{selection.explain()}"[:4000])
        for skipped, why in selection.refused:
            self.hooks.log(f"Target=newest-compatible: skipped {skipped.release}: {why}")
        self.hooks.log(f"Target=newest-compatible ({where}): chose {chosen.kernel} with "
                       f"initrd {initrd_of(chosen) or 'none'}")
        return TargetSource(str(chosen.kernel), initrd_of(chosen))

    def _commit(self, call: Call) -> Steps:
        opts = check_options(call)
        options = CommitOptions(force=bool(opts.get("force", False)),
                                dry_run=bool(opts.get("dry_run", False)))

        def make_work(_caller: Caller, _job: Job) -> Callable[[], Any]:
            # read on the loop, where inhibitors come and go; the engine refuses with them
            held = replace(options, inhibitors=self.inhibitors.descriptions())

            def work() -> dict[str, Any]:
                result = self.engine.commit(held)
                if not result.dry_run:
                    self.handed_off = True  # set on the engine thread; read after JobRemoved
                return {"dry_run": result.dry_run, "handoff_seconds": result.handoff_seconds,
                        "plan": result.plan}
            return work
        yield from self._run_job(call, "commit", make_work, lambda data: dict(data))

    def _cancel(self, call: Call) -> Steps:
        # the released sessions leave the bus with SessionReleased when the properties are
        # published (_reconcile_sessions)
        yield from self._run_job(call, "cancel", lambda _caller, _job: lambda: {
            "message": self.engine.cancel()}, lambda data: dict(data))

    def _verify(self, call: Call) -> Steps:
        yield Authorize(call.declared.action)
        job = self._begin_job("verify")
        call.reply(job.path)
        yield from self._verifying(job)

    def start_verify(self) -> None:
        """At start after a live update: verify on our own, as a job anyone can watch."""
        self.driver.start(self._verifying(self._new_job("verify")), None)

    def _verifying(self, job: Job) -> Steps:
        """The three steps of verifyrun.py: retrieval on the engine, one session per engine
        call (the owners are answered between two); observation beside the engine;
        conclusion on the engine. A failure before the conclusion abandons the run."""
        engine = self.engine
        self.retrieving = True
        try:
            run: VerifyRun = yield Run(self.worker, engine.verify_begin)
        except AgentError as exc:
            self._verify_ended(job, None, exc)
            return
        try:
            found = yield from self._retrieved_and_observed(run)
        except AgentError as exc:
            yield from self._abandoned(job, run, exc)
            return
        try:
            data: dict[str, Any] = yield Run(self.worker, lambda: self._conclude(run, found))
        except AgentError as exc:
            self._verify_ended(job, None, exc)
            return
        self._verify_ended(job, data, None)

    def _retrieved_and_observed(self, run: VerifyRun) -> Generator[Step, Any, HostObservation]:
        engine = self.engine
        got: Retrieved | None = yield Run(self.worker, lambda: engine.verify_retrieve(run))
        self.refresh()  # State "verifying", read after the first session is retrieved
        while got is not None:
            self._incoming_retrieved(got)
            got = yield Run(self.worker, lambda: engine.verify_retrieve(run))
        self.retrieving = False  # every session is on the bus (or could not be retrieved)
        self.hooks.incoming(run.handed_back, run.held)
        self.refresh()
        found: HostObservation | None = yield Run(self.observer, lambda: engine.verify_observe(run))
        if found is None:
            raise AgentError("no observation")
        return found

    def _abandoned(self, job: Job, run: VerifyRun, error: AgentError) -> Steps:
        """The run ends without a conclusion; the job fails with `error` (or with the error
        abandoning it raised)."""
        self.retrieving = False
        try:
            yield Run(self.worker, lambda: self.engine.verify_abandon(run, error.message))
        except AgentError as abandon_error:
            error = abandon_error
        self._verify_ended(job, None, error)

    def _verify_ended(self, job: Job, data: dict[str, Any] | None,
                      error: AgentError | None) -> None:
        self.retrieving = False
        for record in self.sessions.values():
            record.verifying = False  # every retrieved session is its owner's now
        self._job_done(job, data, error, lambda result: dict(result))

    def _conclude(self, run: VerifyRun, found: HostObservation) -> dict[str, Any]:
        report = self.engine.verify_conclude(run, found)
        return {"ok": report.ok, "summary": self.engine.state.last_result}

    def _incoming_retrieved(self, got: Retrieved) -> None:
        """One session of step 1 done: on the bus; claimable now if it has no digests, once
        they are checked if it has."""
        if not got.retrieved:
            return
        entry = got.entry
        if entry.name not in self.sessions:
            record = self._add_session(entry.name, owner_uid(entry.owner), "", incoming=True)
            record.tokens = sorted(f.token for f in entry.files)
        self.sessions[entry.name].verifying = got.held

    # ------------------------------------------------------------------ sessions

    def _add_session(self, name: str, uid: int | None, sender: str, *, incoming: bool
                     ) -> SessionObject:
        path = api.SESSION_PATH_PREFIX + api.escape_path_component(name)
        record = SessionObject(name, path, uid, sender, incoming)
        record.obj = ExportedObject(self.bus, path, contract.SESSION, {}, record.value)
        self.sessions[name] = record
        return record

    def _drop_session(self, record: SessionObject) -> None:
        if record.obj is not None:
            record.obj.unregister()
        self.sessions.pop(record.name, None)

    def _create_session(self, call: Call) -> Steps:
        name = call.args[0]
        digests: bool | None = None
        owner_fd_store = False
        if call.declared.options is not None:  # CreateSessionWithOptions
            opts = check_options(call)
            digests = opts.get("digests")
            owner_fd_store = bool(opts.get("fd_store", False))
        validate_session_name(name)
        caller: Caller = yield Authorize(call.declared.action)
        existing = self.sessions.get(name)
        if existing is not None:
            raise Busy(f"session {name!r:.80} already exists (owner uid {existing.owner_uid})")

        def work() -> int:
            handle = self.engine.create_session(name, caller.owner, digests,
                                               owner_fd_store=owner_fd_store)
            return os.dup(handle.fileno())
        fd: int = yield self._engine(work)
        record = self._add_session(name, caller.uid, caller.sender, incoming=False)
        try:
            call.reply(record.path, 0, fds=[fd])
        finally:
            os.close(fd)
        if self.auth.gone(caller.sender):  # it left before the reply could reach it
            self._owner_gone(caller.sender, never_told=True)

    def _preserve(self, call: Call) -> Steps:
        name, index, token = call.args
        validate_token(token)
        caller: Caller = yield Authorize(call.declared.action)
        record = self._owned(name, caller)
        if record.incoming:
            raise InvalidArgument(f"session {name!r:.80} came from the previous kernel; "
                                  "preserve files in a session created in this boot")
        fd = call.fd(index)

        def work() -> None:
            try:
                self.engine.preserve(name, fd, token)
            finally:
                os.close(fd)
        yield self._engine(work)
        record.tokens = sorted({*record.tokens, token})
        record.ready = False
        if record.obj is not None:
            record.obj.changed(["Tokens", "Ready"])
        call.reply()

    def _set_ready(self, call: Call) -> Steps:
        name, ready = call.args
        caller: Caller = yield Authorize(call.declared.action)
        record = self._owned(name, caller)
        if record.incoming:
            raise InvalidArgument(f"session {name!r:.80} came from the previous kernel; "
                                  "readiness is for sessions created in this boot")
        yield self._engine(lambda: self.engine.set_ready(name, ready))
        record.ready = ready
        if caller.uid == record.owner_uid:
            record.owner_sender = caller.sender  # the owner's connection now
        if record.obj is not None:
            record.obj.changed(["Ready", "Owner"])
        call.reply()

    def _release_session(self, call: Call) -> Steps:
        name = call.args[0]
        caller: Caller = yield Authorize(call.declared.action)
        record = self._owned(name, caller)
        if record.incoming:
            raise InvalidArgument(f"session {name!r:.80} came from the previous kernel: "
                                  "FinishSession ends it")
        yield self._engine(lambda: self.engine.release_session(name))
        self._drop_session(record)
        call.reply()
        self._told_if_not_owner(record, caller, f"released by uid {caller.uid} "
                                "(ReleaseSession): its files are no longer preserved")

    def _told_if_not_owner(self, record: SessionObject, caller: Caller, reason: str) -> None:
        """A session ended by someone else than its owner (root may): the owner is told."""
        if caller.uid != record.owner_uid:
            self.manager.emit("SessionReleased", record.name, record.path, reason)
            self.hooks.log(f"session {record.name!r} {reason}")

    def _incoming_owned(self, name: str, caller: Caller) -> SessionObject:
        if self.retrieving and name not in self.sessions:
            raise Busy(f"the agent is retrieving the incoming sessions; session {name!r:.80} "
                       "can be claimed shortly")
        record = self._owned(name, caller)
        if record.verifying:
            raise Busy(f"session {name!r:.80} is being verified (it has digests, which are "
                       "checked before its owner gets it back); it can be claimed when the "
                       "verify job ends")
        if not record.incoming:
            raise InvalidArgument(f"session {name!r:.80} was created in this boot; it is retrieved "
                                  "only after the next live update")
        return record

    def _retrieve_session(self, call: Call) -> Steps:
        name = call.args[0]
        caller: Caller = yield Authorize(call.declared.action)
        record = self._incoming_owned(name, caller)

        def work() -> int:
            if record.handle is None:
                record.handle = self.engine.claim_session(name)
            return os.dup(record.handle.fileno())
        fd: int = yield self._engine(work)
        record.claimed = True
        if caller.uid == record.owner_uid or record.owner_uid is None:
            record.owner_sender = caller.sender  # the claimer, when it is the owner
        if record.obj is not None:
            record.obj.changed(["Claimed", "Owner"])
        try:
            call.reply(0, fds=[fd])
        finally:
            os.close(fd)

    def _retrieve_file(self, call: Call) -> Steps:
        name, token = call.args
        validate_token(token)
        caller: Caller = yield Authorize(call.declared.action)
        record = self._incoming_owned(name, caller)

        def work() -> int:
            if record.handle is None:
                record.handle = self.engine.claim_session(name)
            return record.handle.retrieve_fd(token)
        fd: int = yield self._engine(work)
        record.claimed = True
        if record.obj is not None:
            record.obj.changed(["Claimed"])
        try:
            call.reply(0, fds=[fd])
        finally:
            os.close(fd)

    def _check_kept_session(self, call: Call) -> Steps:
        name, index = call.args
        validate_session_name(name)
        caller: Caller = yield Authorize(call.declared.action)
        fd = call.fd(index)

        def work() -> list[VerifyItem]:
            try:
                recorded = owner_uid(self.engine.kept_session_owner(name))
                if caller.uid != 0 and recorded != caller.uid:
                    raise PermissionDenied(f"session {name!r:.80} belongs to uid {recorded}; "
                                           "only its owner or root may have it checked")
            except AgentError:
                os.close(fd)
                raise
            # from here the session owns the fd (adopt_session closes it on a wrong name)
            session = self.engine.adopt_session(fd, name)
            try:
                return self.engine.check_kept_session(name, session)
            finally:
                session.close()   # a duplicate: the owner's fd keeps the session
        items: list[VerifyItem] = yield self._engine(work)
        ok = not any(i.verdict in FAILING_VERDICTS for i in items)
        self.hooks.log(f"session {name!r} kept by its owner checked: "
                       f"{'ok' if ok else 'FAILED'} ({len(items)} item(s))")
        call.reply(ok, json.dumps([{"kind": i.kind, "name": i.name, "verdict": i.verdict.value,
                                    "detail": i.detail} for i in items]))

    def _finish_session(self, call: Call) -> Steps:
        name = call.args[0]
        caller: Caller = yield Authorize(call.declared.action)
        record = self._incoming_owned(name, caller)

        def work() -> None:
            handle = record.handle or self.engine.claim_session(name)
            record.handle = None
            try:
                handle.finish()
            finally:
                handle.close()
        yield self._engine(work)
        self._drop_session(record)
        call.reply()
        self._told_if_not_owner(record, caller, f"finished by uid {caller.uid} "
                                "(FinishSession): its memory is released")

    def _grace_tick(self) -> bool:
        def expired(names: list[str]) -> None:
            for name in names:
                record = self.sessions.get(name)
                if record is not None and not record.claimed:
                    self._drop_session(record)
            if names:
                self.hooks.discarded(names)
        if self.engine.claim_deadline is not None and self.current is None:
            def done(names: list[str] | None, error: AgentError | None) -> None:
                if error is not None:  # FINISH failed: say so, the next tick tries again
                    self.hooks.log(f"finishing unclaimed sessions failed: {error.message}")
                expired(names or [])
            self.worker.submit(self.engine.finish_expired, done)
        return True  # keep ticking

    def close(self) -> None:
        self.reader.shutdown()
        self.files.shutdown()
        # a verify's digests can take minutes: the process does not wait for them to end
        self.observer.shutdown(wait=False)
        self.auth.close()
        GLib.source_remove(self._grace_source)
        self.inhibitors.close()
        for record in list(self.sessions.values()):
            self._drop_session(record)
        self.manager.unregister()


# The handler of every method the contract declares (objects.py refuses a table that misses one
# or has one more): a generator of steps (steps.py), or a plain function that replies at once.
MANAGER_HANDLERS: dict[str, Callable[[AgentService, Call], Steps | None]] = {
    "Preflight": AgentService._preflight,
    "ScratchPlan": AgentService._scratch_plan,
    "Prepare": AgentService._prepare,
    "Commit": AgentService._commit,
    "Cancel": AgentService._cancel,
    "Verify": AgentService._verify,
    "GetManifest": AgentService._get_manifest,
    "ListSessions": AgentService._list_sessions,
    "History": AgentService._history,
    "Inhibit": AgentService._inhibit,
    "CreateSession": AgentService._create_session,
    "CreateSessionWithOptions": AgentService._create_session,
    "Preserve": AgentService._preserve,
    "SetReady": AgentService._set_ready,
    "ReleaseSession": AgentService._release_session,
    "RetrieveSession": AgentService._retrieve_session,
    "RetrieveFile": AgentService._retrieve_file,
    "CheckKeptSession": AgentService._check_kept_session,
    "FinishSession": AgentService._finish_session,
}
JOB_HANDLERS: dict[str, Callable[[AgentService, Call, Job], Steps]] = {
    "Cancel": AgentService._cancel_job,
}


def _priority(caller: Caller) -> Priority:
    return Priority.PRIVILEGED if caller.uid == 0 else Priority.UNPRIVILEGED


@dataclass
class TargetSource:
    """The target files a call names: paths (root's calls only) or fds the caller passed (taken
    from the message at once, closed by `open()`'s result or by `close()`)."""

    kernel: str | None = None
    initrd: str | None = None
    kernel_fd: int | None = None
    initrd_fd: int | None = None

    @property
    def given(self) -> bool:
        return self.kernel is not None or self.kernel_fd is not None

    @classmethod
    def from_options(cls, call: Call, opts: dict[str, Any], caller: Caller) -> TargetSource:
        source = cls(opts.get("kernel") or None, opts.get("initrd") or None)
        try:
            if "kernel_fd" in opts:
                source.kernel_fd = call.fd(opts["kernel_fd"])
            if "initrd_fd" in opts:
                source.initrd_fd = call.fd(opts["initrd_fd"])
            named = [what for what, fd, path in (("kernel", source.kernel_fd, source.kernel),
                                                 ("initrd", source.initrd_fd, source.initrd))
                     if fd is None and path is not None]
            if named and caller.uid != 0:
                raise PermissionDenied(
                    f"{call.method}: uid {caller.uid} named {' and '.join(named)} by path; the "
                    "agent opens paths only for root. Pass the open file instead as "
                    f"{'/'.join(n + '_fd' for n in named)} (kho-agentctl does)")
            if source.initrd_fd is not None and source.kernel_fd is None \
                    and source.kernel is None:
                raise InvalidArgument(f"{call.method}: initrd without a kernel")
        except AgentError:
            source.close()
            raise
        return source

    def open(self) -> TargetFiles:
        """The files, open and checked (regular, bounded). Takes over the passed fds."""
        try:
            kernel = self._take("target kernel", self.kernel, "kernel_fd", TARGET_IMAGE_MAX)
        except AgentError:
            self.close()  # the initrd fd too
            raise
        if kernel is None:
            self.close()
            raise InvalidArgument("no target kernel given")
        try:
            initrd = self._take("initrd", self.initrd, "initrd_fd", None)
        except AgentError:
            kernel.close()
            raise
        return TargetFiles(kernel, initrd)

    def _take(self, what: str, path: str | None, attr: str, limit: int | None
              ) -> RegularFile | None:
        fd: int | None = getattr(self, attr)
        setattr(self, attr, None)
        if fd is not None:
            return adopt_fd(fd, path or f"(passed as {attr})", what, max_size=limit)
        if path is not None:
            return open_regular(path, what, max_size=limit)
        return None

    def close(self) -> None:
        for fd in (self.kernel_fd, self.initrd_fd):
            if fd is not None:
                os.close(fd)
        self.kernel_fd = self.initrd_fd = None
