"""The Manager object and its Job and Session objects: the bus face of one Engine.

Runs on the GLib main loop. Every engine call goes to the Worker (one thread, in order) and its
result comes back here, where the reply, the property changes and the signals are sent. Checks
that need no engine (argument types, names, ownership, authorization) happen before anything is
submitted, so a refused call changes nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gi.repository import Gio, GLib

from ..engine import CommitOptions, Engine, Plan, PrepareOptions
from ..engine.manifest import FAILING_VERDICTS, VerifyItem, manifest_to_json, read_manifest
from ..engine.phase import Phase
from ..engine.verifyrun import HostObservation, Retrieved, VerifyRun
from ..errors import AgentError, Busy, Cancelled, InvalidArgument, NotFound, PermissionDenied
from ..facts import TARGET_IMAGE_MAX, TargetFiles, TargetImage
from ..kernel.callerfile import RegularFile, adopt_fd, open_regular
from ..kernel.cmdline import check_kho_scratch, target_cmdline
from ..kernel.liveupdate import LiveUpdateSession, validate_session_name, validate_token
from . import interfaces as api
from .auth import Authorizer, Caller, owner_uid
from .errors import check_options
from .objects import Call, ExportedObject
from .worker import Priority, Worker

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

    def variant(self, name: str, simulated: bool) -> GLib.Variant:
        values: dict[str, tuple[str, Any]] = {
            "State": ("s", self.state), "StateMessage": ("s", self.message),
            "HandoffMode": ("s", self.handoff), "RunningKernel": ("s", self.running),
            "TargetKernel": ("s", self.target),
            "LiveUpdateNumber": ("t", self.liveupdate_number),
            "LastResult": ("s", self.last_result), "Simulated": ("b", simulated)}
        signature, value = values[name]
        return GLib.Variant(signature, value)


PROPERTY_FIELDS = {"State": "state", "StateMessage": "message", "HandoffMode": "handoff",
                   "RunningKernel": "running", "TargetKernel": "target",
                   "LiveUpdateNumber": "liveupdate_number", "LastResult": "last_result"}


@dataclass
class Job:
    id: int
    type: str
    path: str
    progress: int = 0
    state: str = api.JOB_RUNNING
    result: str = ""
    error_name: str = ""
    error_message: str = ""
    cancel_requested: bool = False
    obj: ExportedObject | None = None

    def variant(self, name: str) -> GLib.Variant:
        values: dict[str, tuple[str, Any]] = {
            "Id": ("u", self.id), "Type": ("s", self.type), "Progress": ("u", self.progress),
            "State": ("s", self.state), "Result": ("s", self.result),
            "ErrorName": ("s", self.error_name), "ErrorMessage": ("s", self.error_message)}
        signature, value = values[name]
        return GLib.Variant(signature, value)


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

    def variant(self, name: str) -> GLib.Variant:
        values: dict[str, tuple[str, Any]] = {
            "Name": ("s", self.name),
            "Owner": ("(us)", (self.owner_uid if self.owner_uid is not None else 0xFFFFFFFF,
                               self.owner_sender)),
            "Tokens": ("at", self.tokens), "Ready": ("b", self.ready),
            "Claimed": ("b", self.claimed), "Incoming": ("b", self.incoming)}
        signature, value = values[name]
        return GLib.Variant(signature, value)


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


class AgentService:
    def __init__(self, bus: Gio.DBusConnection, agent: Engine, authorizer: Authorizer,
                 worker: Worker, hooks: Hooks) -> None:
        self.bus = bus
        self.agent = agent
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
        self.simulated = agent.simulated
        self.snapshot = Snapshot()
        self.jobs: dict[int, Job] = {}
        self.current: Job | None = None
        self.next_job_id = 1
        self.sessions: dict[str, SessionObject] = {}
        self.handed_off = False
        agent.set_progress_listener(self._progress_from_engine)
        authorizer.gone_callbacks.append(self._owner_gone)
        self.manager = ExportedObject(bus, api.MANAGER_PATH, api.MANAGER_XML, {
            "Preflight": self._preflight, "ScratchPlan": self._scratch_plan,
            "Prepare": self._prepare, "Commit": self._commit, "Cancel": self._cancel,
            "Verify": self._verify, "GetManifest": self._get_manifest,
            "ListSessions": self._list_sessions, "CreateSession": self._create_session,
            "CreateSessionWithOptions": self._create_session, "Preserve": self._preserve,
            "SetReady": self._set_ready, "ReleaseSession": self._release_session,
            "RetrieveSession": self._retrieve_session, "RetrieveFile": self._retrieve_file,
            "CheckKeptSession": self._check_kept_session,
            "FinishSession": self._finish_session,
        }, lambda name: self.snapshot.variant(name, self.simulated))
        self._grace_source = GLib.timeout_add_seconds(GRACE_TICK_SECONDS, self._grace_tick)

    # ------------------------------------------------------------------ engine plumbing

    def _engine(self, fn: Callable[[], Any], done: Callable[[Any], None], call: Call | None,
                priority: Priority = Priority.PRIVILEGED) -> None:
        """Run `fn` on the engine thread; then `done(result)` on the loop, or the error to the
        caller; the properties are refreshed after every engine call either way."""
        def finished(result: Any, error: AgentError | None) -> None:
            if error is not None:
                if call is not None:
                    call.fail(error)
                else:
                    self.hooks.log(f"engine call failed: {error.name}: {error.message}")
            else:
                try:
                    done(result)
                except AgentError as exc:
                    if call is None:
                        raise
                    call.fail(exc)
            self.refresh()
        self.worker.submit(fn, finished, priority)

    def refresh(self) -> None:
        """Read the engine's state on the engine thread and publish what changed."""
        self.worker.submit(self._read_snapshot, self._publish)

    def _read_snapshot(self) -> Snapshot:
        agent = self.agent
        state = agent.state
        info = agent.sysinfo()
        number = 0
        if state.phase is not Phase.COMMITTING and not self.handed_off:
            number = agent.outgoing_liveupdate_number() or 0
        return Snapshot(
            state=state.phase.value, message=state.message,
            handoff=agent.handoff_mode(info), running=info.release,
            target=state.target.kernel if state.target else "", liveupdate_number=number,
            last_result=json.dumps(state.last_result, sort_keys=True)
            if state.last_result is not None else "",
            outgoing=agent.outgoing_sessions(),
            released=agent.released_sessions())

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
                self.manager.emit("SessionReleased", "(sos)", record.name, record.path, reason)
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
                self.agent.owner_gone(name, never_told=never_told)
        self._engine(work, lambda _: None, None)

    def _progress_from_engine(self, percent: int) -> None:
        # engine thread: hop to the loop
        GLib.idle_add(self._set_progress, percent)

    def _set_progress(self, percent: int) -> bool:
        job = self.current
        if job is not None and percent > job.progress:
            job.progress = min(percent, 99)
            if job.obj is not None:
                job.obj.changed(["Progress"])
        return False

    # ------------------------------------------------------------------ authorization

    def _authorized(self, call: Call, action: str | None, then: Callable[[Caller], None],
                    on_refusal: Callable[[], None] = lambda: None) -> None:
        """Identify the caller, check the polkit action (None: anyone), then continue.
        `on_refusal` runs when the call is refused before `then` took it over."""
        def refuse(error: AgentError) -> None:
            on_refusal()
            call.fail(error)

        def identified(caller: Caller | None, error: AgentError | None) -> None:
            if caller is None:
                refuse(error or PermissionDenied("unknown caller"))
                return
            if action is None:
                self._guard(call, then, caller, refuse)
                return

            def decided(denied: AgentError | None) -> None:
                if denied is not None:
                    refuse(denied)
                else:
                    self._guard(call, then, caller, refuse)
            self.auth.authorize(caller, action, call.interactive, decided)
        self.auth.identify(call.sender, identified)

    @staticmethod
    def _guard(call: Call, then: Callable[[Caller], None], caller: Caller,
               refuse: Callable[[AgentError], None]) -> None:
        try:
            then(caller)
        except AgentError as exc:
            refuse(exc)

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

    def _preflight(self, call: Call) -> None:
        opts = check_options(call.args[0], api.PREFLIGHT_OPTIONS, "Preflight",
                             call.option_signatures(0))

        def identified(caller: Caller) -> None:
            source = TargetSource.from_options(call, opts, caller)
            self._planned(call, caller, source, lambda plan: call.reply(
                "(s)", json.dumps(plan.result.to_json())), preflight=True)
        self._authorized(call, None, identified)

    def _scratch_plan(self, call: Call) -> None:
        opts = check_options(call.args[0], api.SCRATCH_OPTIONS, "ScratchPlan",
                             call.option_signatures(0))
        margin = opts.get("margin")

        def identified(caller: Caller) -> None:
            source = TargetSource.from_options(call, opts, caller)
            if not source.given:  # the running kernel's own image: the daemon's own file
                self._engine(lambda: self.agent.scratch_plan(None, 0, margin).to_json(),
                             lambda plan: call.reply("(s)", json.dumps(plan)), call,
                             priority=_priority(caller))
                return

            def reply(plan: Plan) -> None:
                if plan.scratch is None:  # the target could not be read: say why
                    call.fail(InvalidArgument(plan.result.blockers[0].message
                                              if plan.result.blockers else
                                              "no scratch plan for this target"))
                else:
                    call.reply("(s)", json.dumps(plan.scratch.to_json()))
            self._planned(call, caller, source, reply, margin=margin)
        self._authorized(call, None, identified)

    def _planned(self, call: Call, caller: Caller, source: TargetSource,
                 reply: Callable[[Plan], None], *, preflight: bool = False,
                 margin: float | None = None) -> None:
        """Plan for the caller's target without touching the prepared update. Root's files are
        opened and read on the engine thread; an unprivileged caller's (always passed fds) are
        read on the files thread, and its planning waits behind every privileged call. For
        Preflight a target that cannot be opened or read is a blocker of the report."""
        def read() -> tuple[TargetImage | None, int, str | None]:
            if not source.given:  # the host alone: no target to read
                return None, 0, None
            try:
                files = source.open()
            except AgentError as exc:
                if not preflight:
                    raise
                return None, 0, exc.message
            with files:
                try:
                    return self.agent.decode_target(files.kernel), files.initrd_size, None
                except AgentError as exc:
                    return None, files.initrd_size, exc.message

        def plan(target: TargetImage | None, initrd_size: int, problem: str | None) -> Plan:
            return self.agent.plan(target, initrd_size, problem, margin=margin)

        priority = _priority(caller)
        if priority is Priority.PRIVILEGED:
            self._engine(lambda: plan(*read()), reply, call)
            return

        def was_read(result: tuple[TargetImage | None, int, str | None] | None,
                     error: AgentError | None) -> None:
            if result is None:
                call.fail(error or InvalidArgument("the target could not be read"))
                return
            try:
                self._engine(lambda: plan(*result), reply, call, priority=priority)
            except Busy as exc:
                call.fail(exc)
        try:
            self.files.submit(read, was_read, Priority.UNPRIVILEGED)
        except Busy:
            source.close()
            raise

    def _get_manifest(self, call: Call) -> None:
        path = self.agent.manifest_path

        def done(text: str | None, error: AgentError | None) -> None:
            if error is not None:
                call.fail(error)
            else:
                call.reply("(s)", text)
        self.reader.submit(lambda: manifest_to_json(read_manifest(path)).decode(), done)

    def _list_sessions(self, call: Call) -> None:
        rows = [(s.name, s.path, s.owner_uid if s.owner_uid is not None else 0xFFFFFFFF,
                 s.owner_sender, s.ready, s.claimed, s.incoming)
                for s in sorted(self.sessions.values(), key=lambda s: s.name)]
        call.reply("(a(sousbbb))", rows)

    # ------------------------------------------------------------------ jobs

    def _start_job(self, call: Call, kind: str,
                   make_work: Callable[[Caller, Job], Callable[[], Any]],
                   outcome: Callable[[Any], dict[str, Any]],
                   cleanup: Callable[[], None] = lambda: None) -> None:
        """Authorize, then run the work a job does. `cleanup` runs once whatever happens
        (e.g. closing the fds the call passed)."""
        def authorized(caller: Caller) -> None:
            self._check_no_job()
            job = self._new_job(kind)
            try:
                work = make_work(caller, job)
            except AgentError:  # refused before any work: the job never existed
                self._discard_job(job)
                raise
            call.reply("(o)", job.path)

            def finished(result: Any, error: AgentError | None) -> None:
                cleanup()
                self._job_done(job, result, error, outcome)
            self.worker.submit(work, finished)
        try:
            self._authorized(call, api.ACTION_MANAGE, authorized, on_refusal=cleanup)
        except AgentError:
            cleanup()
            raise

    def _check_no_job(self) -> None:
        if self.current is not None:
            raise Busy(f"job {self.current.id} ({self.current.type}) is running; wait "
                       "for its JobRemoved signal")
        if self.handed_off:
            raise Busy("the host is handing off to the next kernel")

    def _new_job(self, kind: str) -> Job:
        """A running job, exported on the bus, as the current one."""
        job = Job(self.next_job_id, kind, f"{api.JOB_PATH_PREFIX}{self.next_job_id}")
        self.next_job_id += 1
        job.obj = ExportedObject(self.bus, job.path, api.JOB_XML,
                                 {"Cancel": lambda c: self._cancel_job(c, job)}, job.variant)
        self.jobs[job.id] = job
        self.current = job
        return job

    def _job_done(self, job: Job, result: Any, error: AgentError | None,
                  outcome: Callable[[Any], dict[str, Any]]) -> None:
        if error is not None:
            state = api.JOB_CANCELED if isinstance(error, Cancelled) else api.JOB_FAILED
            job.state, job.error_name, job.error_message = (state, error.dbus_name,
                                                            error.message)
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
            self.manager.emit("JobRemoved", "(uos)", job.id, job.path, job.state)
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

    def _cancel_job(self, call: Call, job: Job) -> None:
        def authorized(_caller: Caller) -> None:
            if job.state != api.JOB_RUNNING:
                raise Busy(f"job {job.id} has already ended ({job.state})")
            if job.type != "prepare":
                raise Busy(f"a {job.type} job cannot be cancelled once it runs")
            job.cancel_requested = True  # the prepare rolls back at its next step
            call.reply()
        self._authorized(call, api.ACTION_MANAGE, authorized)

    def _prepare(self, call: Call) -> None:
        opts = check_options(call.args[0], api.PREPARE_OPTIONS, "Prepare",
                             call.option_signatures(0))
        if "kernel" not in opts and "kernel_fd" not in opts:
            raise InvalidArgument("Prepare: option 'kernel' or 'kernel_fd' (the target image) "
                                  "is required")
        scratch = opts.get("scratch", "keep")
        if scratch not in ("keep", "auto"):
            check_kho_scratch(scratch)  # InvalidArgument before it reaches a command line
        cmdline = opts.get("cmdline")
        if cmdline is not None:
            target_cmdline(cmdline)  # refused with the reason before any job starts
        sources: list[TargetSource] = []

        def make_work(caller: Caller, job: Job) -> Callable[[], Any]:
            source = TargetSource.from_options(call, opts, caller)
            sources.append(source)

            def options(files: TargetFiles) -> PrepareOptions:
                return PrepareOptions(kernel=files.kernel, initrd=files.initrd, cmdline=cmdline,
                                      scratch=scratch,
                                      cancelled=lambda: job.cancel_requested)
            if opts.get("dry_run"):
                def dry() -> dict[str, Any]:
                    with source.open() as files:
                        return self.agent.plan_prepare(options(files))
                return dry

            def work() -> dict[str, Any]:
                with source.open() as files:
                    manifest = self.agent.prepare(options(files))
                target = self.agent.state.target
                return {"prepared": target.kernel if target else "",
                        "cmdline": manifest.cmdline_to,
                        "sessions": [s.name for s in manifest.sessions]}
            return work

        def cleanup() -> None:
            for source in sources:
                source.close()
        self._start_job(call, "prepare", make_work,
                        lambda data: {"dry_run": True, **data} if opts.get("dry_run")
                        else dict(data), cleanup)

    def _commit(self, call: Call) -> None:
        opts = check_options(call.args[0], api.COMMIT_OPTIONS, "Commit",
                             call.option_signatures(0))
        options = CommitOptions(force=bool(opts.get("force", False)),
                                dry_run=bool(opts.get("dry_run", False)))

        def work() -> dict[str, Any]:
            result = self.agent.commit(options)
            if not result.dry_run:
                self.handed_off = True  # set on the engine thread; read after JobRemoved
            return {"dry_run": result.dry_run, "handoff_seconds": result.handoff_seconds,
                    "plan": result.plan}
        self._start_job(call, "commit", lambda _caller, _job: work, lambda data: dict(data))

    def _cancel(self, call: Call) -> None:
        # the released sessions leave the bus with SessionReleased when the properties are
        # published (_reconcile_sessions)
        self._start_job(call, "cancel", lambda _caller, _job: lambda: {
            "message": self.agent.cancel()}, lambda data: dict(data))

    def _verify(self, call: Call) -> None:
        def authorized(_caller: Caller) -> None:
            self._check_no_job()
            job = self._new_job("verify")
            call.reply("(o)", job.path)
            self._run_verify(job)
        self._authorized(call, api.ACTION_MANAGE, authorized)

    def start_verify(self) -> None:
        """At start after a live update: verify on our own, as a job anyone can watch."""
        self._run_verify(self._new_job("verify"))

    def _run_verify(self, job: Job) -> None:
        """The three steps of verifyrun.py: retrieval on the engine, one session per engine
        call (the owners are answered between two); observation beside the engine;
        conclusion on the engine."""
        self.retrieving = True
        agent = self.agent

        def ended(data: dict[str, Any] | None, error: AgentError | None) -> None:
            self.retrieving = False
            for record in self.sessions.values():
                record.verifying = False  # every retrieved session is its owner's now
            self._job_done(job, data, error, lambda result: dict(result))

        def abandon(run: VerifyRun, error: AgentError) -> None:
            self.retrieving = False
            self.worker.submit(lambda: agent.verify_abandon(run, error.message),
                               lambda _none, abandon_error: ended(None, abandon_error or error))

        def observed(run: VerifyRun, found: HostObservation | None,
                     error: AgentError | None) -> None:
            if found is None:
                abandon(run, error or AgentError("no observation"))
                return
            self.worker.submit(lambda: self._conclude(run, found), ended)

        def retrieved(run: VerifyRun, got: Retrieved | None, error: AgentError | None) -> None:
            if error is not None:
                abandon(run, error)
                return
            if got is not None:
                self._incoming_retrieved(got)
                self.worker.submit(lambda: agent.verify_retrieve(run),
                                   lambda more, e: retrieved(run, more, e))
                return
            self.retrieving = False  # every session is on the bus (or could not be retrieved)
            self.hooks.incoming(run.handed_back, run.held)
            self.refresh()
            self.observer.submit(lambda: agent.verify_observe(run),
                                 lambda found, e: observed(run, found, e))

        def begun(run: VerifyRun | None, error: AgentError | None) -> None:
            if run is None:
                ended(None, error)
                return
            self.worker.submit(lambda: agent.verify_retrieve(run),
                               lambda got, e: retrieved(run, got, e))
            self.refresh()  # State "verifying", read after the first session is retrieved
        self.worker.submit(agent.verify_begin, begun)

    def _conclude(self, run: VerifyRun, found: HostObservation) -> dict[str, Any]:
        report = self.agent.verify_conclude(run, found)
        return {"ok": report.ok, "summary": self.agent.state.last_result}

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
        record.obj = ExportedObject(self.bus, path, api.SESSION_XML, {}, record.variant)
        self.sessions[name] = record
        return record

    def _drop_session(self, record: SessionObject) -> None:
        if record.obj is not None:
            record.obj.unregister()
        self.sessions.pop(record.name, None)

    def _create_session(self, call: Call) -> None:
        name = call.args[0]
        digests: bool | None = None
        owner_fd_store = False
        if call.method == "CreateSessionWithOptions":
            opts = check_options(call.args[1], api.SESSION_OPTIONS, call.method,
                                 call.option_signatures(1))
            digests = opts.get("digests")
            owner_fd_store = bool(opts.get("fd_store", False))
        validate_session_name(name)

        def authorized(caller: Caller) -> None:
            existing = self.sessions.get(name)
            if existing is not None:
                raise Busy(f"session {name!r:.80} already exists (owner uid {existing.owner_uid})")

            def work() -> int:
                handle = self.agent.create_session(name, caller.owner, digests,
                                                   owner_fd_store=owner_fd_store)
                return os.dup(handle.fileno())

            def created(fd: int) -> None:
                record = self._add_session(name, caller.uid, caller.sender, incoming=False)
                try:
                    call.reply("(oh)", record.path, 0, fds=[fd])
                finally:
                    os.close(fd)
                if self.auth.gone(caller.sender):  # it left before the reply could reach it
                    self._owner_gone(caller.sender, never_told=True)
            self._engine(work, created, call)
        self._authorized(call, api.ACTION_SESSION, authorized)

    def _preserve(self, call: Call) -> None:
        name, index, token = call.args
        validate_token(token)

        def authorized(caller: Caller) -> None:
            record = self._owned(name, caller)
            if record.incoming:
                raise InvalidArgument(f"session {name!r:.80} came from the previous kernel; "
                                      "preserve files in a session created in this boot")
            fd = call.fd(index)

            def work() -> None:
                try:
                    self.agent.preserve(name, fd, token)
                finally:
                    os.close(fd)

            def preserved(_: None) -> None:
                record.tokens = sorted({*record.tokens, token})
                record.ready = False
                if record.obj is not None:
                    record.obj.changed(["Tokens", "Ready"])
                call.reply()
            self._engine(work, preserved, call)
        self._authorized(call, api.ACTION_SESSION, authorized)

    def _set_ready(self, call: Call) -> None:
        name, ready = call.args

        def authorized(caller: Caller) -> None:
            record = self._owned(name, caller)
            if record.incoming:
                raise InvalidArgument(f"session {name!r:.80} came from the previous kernel; "
                                      "readiness is for sessions created in this boot")

            def done(_: None) -> None:
                record.ready = ready
                if caller.uid == record.owner_uid:
                    record.owner_sender = caller.sender  # the owner's connection now
                if record.obj is not None:
                    record.obj.changed(["Ready", "Owner"])
                call.reply()
            self._engine(lambda: self.agent.set_ready(name, ready), done, call)
        self._authorized(call, api.ACTION_SESSION, authorized)

    def _release_session(self, call: Call) -> None:
        name = call.args[0]

        def authorized(caller: Caller) -> None:
            record = self._owned(name, caller)
            if record.incoming:
                raise InvalidArgument(f"session {name!r:.80} came from the previous kernel: "
                                      "FinishSession ends it")

            def done(_: None) -> None:
                self._drop_session(record)
                call.reply()
                self._told_if_not_owner(record, caller, "released by uid "
                                        f"{caller.uid} (ReleaseSession): its files are no "
                                        "longer preserved")
            self._engine(lambda: self.agent.release_session(name), done, call)
        self._authorized(call, api.ACTION_SESSION, authorized)

    def _told_if_not_owner(self, record: SessionObject, caller: Caller, reason: str) -> None:
        """A session ended by someone else than its owner (root may): the owner is told."""
        if caller.uid != record.owner_uid:
            self.manager.emit("SessionReleased", "(sos)", record.name, record.path, reason)
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

    def _retrieve_session(self, call: Call) -> None:
        name = call.args[0]

        def authorized(caller: Caller) -> None:
            record = self._incoming_owned(name, caller)

            def work() -> int:
                if record.handle is None:
                    record.handle = self.agent.claim_session(name)
                return os.dup(record.handle.fileno())

            def retrieved(fd: int) -> None:
                record.claimed = True
                if caller.uid == record.owner_uid or record.owner_uid is None:
                    record.owner_sender = caller.sender  # the claimer, when it is the owner
                if record.obj is not None:
                    record.obj.changed(["Claimed", "Owner"])
                try:
                    call.reply("(h)", 0, fds=[fd])
                finally:
                    os.close(fd)
            self._engine(work, retrieved, call)
        self._authorized(call, api.ACTION_SESSION, authorized)

    def _retrieve_file(self, call: Call) -> None:
        name, token = call.args
        validate_token(token)

        def authorized(caller: Caller) -> None:
            record = self._incoming_owned(name, caller)

            def work() -> int:
                if record.handle is None:
                    record.handle = self.agent.claim_session(name)
                return record.handle.retrieve_fd(token)

            def retrieved(fd: int) -> None:
                record.claimed = True
                if record.obj is not None:
                    record.obj.changed(["Claimed"])
                try:
                    call.reply("(h)", 0, fds=[fd])
                finally:
                    os.close(fd)
            self._engine(work, retrieved, call)
        self._authorized(call, api.ACTION_SESSION, authorized)

    def _check_kept_session(self, call: Call) -> None:
        name, index = call.args
        validate_session_name(name)

        def authorized(caller: Caller) -> None:
            fd = call.fd(index)

            def work() -> list[VerifyItem]:
                try:
                    recorded = owner_uid(self.agent.kept_session_owner(name))
                    if caller.uid != 0 and recorded != caller.uid:
                        raise PermissionDenied(f"session {name!r:.80} belongs to uid {recorded}; "
                                               "only its owner or root may have it checked")
                except AgentError:
                    os.close(fd)
                    raise
                # from here the session owns the fd (adopt_session closes it on a wrong name)
                session = self.agent.adopt_session(fd, name)
                try:
                    return self.agent.check_kept_session(name, session)
                finally:
                    session.close()   # a duplicate: the owner's fd keeps the session

            def checked(items: list[VerifyItem]) -> None:
                ok = not any(i.verdict in FAILING_VERDICTS for i in items)
                self.hooks.log(f"session {name!r} kept by its owner checked: "
                               f"{'ok' if ok else 'FAILED'} ({len(items)} item(s))")
                call.reply("(bs)", ok, json.dumps(
                    [{"kind": i.kind, "name": i.name, "verdict": i.verdict.value,
                      "detail": i.detail} for i in items]))
            self._engine(work, checked, call)
        self._authorized(call, api.ACTION_SESSION, authorized)

    def _finish_session(self, call: Call) -> None:
        name = call.args[0]

        def authorized(caller: Caller) -> None:
            record = self._incoming_owned(name, caller)

            def work() -> None:
                handle = record.handle or self.agent.claim_session(name)
                record.handle = None
                try:
                    handle.finish()
                finally:
                    handle.close()

            def finished(_: None) -> None:
                self._drop_session(record)
                call.reply()
                self._told_if_not_owner(record, caller, "finished by uid "
                                        f"{caller.uid} (FinishSession): its memory is "
                                        "released")
            self._engine(work, finished, call)
        self._authorized(call, api.ACTION_SESSION, authorized)

    def _grace_tick(self) -> bool:
        def expired(names: list[str]) -> None:
            for name in names:
                record = self.sessions.get(name)
                if record is not None and not record.claimed:
                    self._drop_session(record)
            if names:
                self.hooks.discarded(names)
        if self.agent.claim_deadline is not None and self.current is None:
            def done(names: list[str] | None, error: AgentError | None) -> None:
                if error is not None:  # FINISH failed: say so, the next tick tries again
                    self.hooks.log(f"finishing unclaimed sessions failed: {error.message}")
                expired(names or [])
            self.worker.submit(self.agent.finish_expired, done)
        return True  # keep ticking

    def close(self) -> None:
        self.reader.shutdown()
        self.files.shutdown()
        # a verify's digests can take minutes: the process does not wait for them to end
        self.observer.shutdown(wait=False)
        self.auth.close()
        GLib.source_remove(self._grace_source)
        for record in list(self.sessions.values()):
            self._drop_session(record)
        self.manager.unregister()


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
