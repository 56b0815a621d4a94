"""The Manager object and its Job and Session objects: the bus face of one Orchestrator.

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
from pathlib import Path
from typing import Any

from gi.repository import Gio, GLib

from ..abi import Side
from ..errors import AgentError, Busy, InvalidArgument, NotFound, PermissionDenied
from ..facts import kho_view
from ..kernel.liveupdate import LiveUpdateSession, validate_session_name, validate_token
from ..manifest import manifest_to_json, read_manifest
from ..orchestrator import CommitOptions, Orchestrator, PrepareOptions
from ..scratch import parse_kho_scratch
from ..statefile import Phase
from . import interfaces as api
from .auth import Authorizer, Caller, owner_uid
from .errors import check_options
from .objects import Call, ExportedObject
from .worker import Worker

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
    log: Callable[[str], None] = lambda text: None


class AgentService:
    def __init__(self, bus: Gio.DBusConnection, agent: Orchestrator, authorizer: Authorizer,
                 worker: Worker, hooks: Hooks) -> None:
        self.bus = bus
        self.agent = agent
        self.auth = authorizer
        self.worker = worker
        # Reads that need no engine state (the manifest file) must not wait behind a job
        self.reader = Worker(hooks.log)
        self.hooks = hooks
        self.simulated = agent.host.simulated
        self.snapshot = Snapshot()
        self.jobs: dict[int, Job] = {}
        self.current: Job | None = None
        self.next_job_id = 1
        self.sessions: dict[str, SessionObject] = {}
        self.handed_off = False
        agent.on_progress = self._progress_from_engine
        self.manager = ExportedObject(bus, api.MANAGER_PATH, api.MANAGER_XML, {
            "Preflight": self._preflight, "ScratchPlan": self._scratch_plan,
            "Prepare": self._prepare, "Commit": self._commit, "Cancel": self._cancel,
            "Verify": self._verify, "GetManifest": self._get_manifest,
            "ListSessions": self._list_sessions, "CreateSession": self._create_session,
            "CreateSessionWithOptions": self._create_session, "Preserve": self._preserve,
            "SetReady": self._set_ready, "ReleaseSession": self._release_session,
            "RetrieveSession": self._retrieve_session, "RetrieveFile": self._retrieve_file,
            "FinishSession": self._finish_session,
        }, lambda name: self.snapshot.variant(name, self.simulated))
        self._grace_source = GLib.timeout_add_seconds(GRACE_TICK_SECONDS, self._grace_tick)

    # ------------------------------------------------------------------ engine plumbing

    def _engine(self, fn: Callable[[], Any], done: Callable[[Any], None], call: Call | None,
                ) -> None:
        """Run `fn` on the engine thread; then `done(result)` on the loop, or the error to the
        caller; the properties are refreshed after every engine call either way."""
        def finished(result: Any, error: AgentError | None) -> None:
            if error is not None:
                if call is not None:
                    call.fail(error)
            else:
                done(result)
            self.refresh()
        self.worker.submit(fn, finished)

    def refresh(self) -> None:
        """Read the engine's state on the engine thread and publish what changed."""
        self.worker.submit(self._read_snapshot, self._publish)

    def _read_snapshot(self) -> Snapshot:
        agent = self.agent
        state = agent.state
        info = agent.sysinfo()
        number = 0
        if state.phase is not Phase.COMMITTING and not self.handed_off:
            luo = kho_view(agent.host, Side.OUT, with_memory=False).luo
            number = luo.liveupdate_number if luo and luo.liveupdate_number else 0
        return Snapshot(
            state=state.phase.value, message=state.message,
            handoff=agent.handoff_mode(info), running=info.release,
            target=state.target.kernel if state.target else "", liveupdate_number=number,
            last_result=json.dumps(state.last_result, sort_keys=True)
            if state.last_result is not None else "")

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

    def _authorized(self, call: Call, action: str | None,
                    then: Callable[[Caller], None]) -> None:
        """Identify the caller, check the polkit action (None: anyone), then continue."""
        def identified(caller: Caller | None, error: AgentError | None) -> None:
            if caller is None:
                call.fail(error or PermissionDenied("unknown caller"))
                return
            if action is None:
                self._guard(call, then, caller)
                return

            def decided(denied: AgentError | None) -> None:
                if denied is not None:
                    call.fail(denied)
                else:
                    self._guard(call, then, caller)
            self.auth.authorize(caller, action, call.interactive, decided)
        self.auth.identify(call.sender, identified)

    def _guard(self, call: Call, then: Callable[[Caller], None], caller: Caller) -> None:
        try:
            then(caller)
        except AgentError as exc:
            call.fail(exc)

    def _owned(self, name: str, caller: Caller) -> SessionObject:
        record = self.sessions.get(name)
        if record is None:
            raise NotFound(f"no session {name!r} (ListSessions shows the known ones)")
        if caller.uid != 0 and record.owner_uid != caller.uid:
            raise PermissionDenied(f"session {name!r} belongs to uid "
                                   f"{record.owner_uid}; only its owner or root may use it")
        return record

    # ------------------------------------------------------------------ read-only methods

    def _preflight(self, call: Call) -> None:
        opts = check_options(call.args[0], api.PREFLIGHT_OPTIONS, "Preflight",
                             call.option_signatures(0))
        kernel, initrd = _path(opts.get("kernel")), _path(opts.get("initrd"))
        self._engine(lambda: self.agent.gather_preflight(kernel, initrd).to_json(),
                     lambda report: call.reply("(s)", json.dumps(report)), call)

    def _scratch_plan(self, call: Call) -> None:
        opts = check_options(call.args[0], api.SCRATCH_OPTIONS, "ScratchPlan",
                             call.option_signatures(0))
        kernel, initrd = _path(opts.get("kernel")), _path(opts.get("initrd"))
        margin = opts.get("margin")
        self._engine(lambda: self.agent.scratch_plan(kernel, initrd, margin).to_json(),
                     lambda plan: call.reply("(s)", json.dumps(plan)), call)

    def _get_manifest(self, call: Call) -> None:
        path = self.agent.store.manifest_path

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

    def _start_job(self, call: Call, kind: str, work: Callable[[], Any],
                   outcome: Callable[[Any], dict[str, Any]]) -> None:
        def authorized(_caller: Caller) -> None:
            if self.current is not None:
                raise Busy(f"job {self.current.id} ({self.current.type}) is running; wait "
                           "for its JobRemoved signal")
            if self.handed_off:
                raise Busy("the host is handing off to the next kernel")
            job = self._new_job(kind)
            call.reply("(o)", job.path)
            self.worker.submit(work, lambda result, error: self._job_done(job, result, error,
                                                                           outcome))
        self._authorized(call, api.ACTION_MANAGE, authorized)

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
            job.state, job.error_name, job.error_message = (api.JOB_FAILED, error.dbus_name,
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
            job.cancel_requested = True  # the prepare job cancels as soon as it has loaded
            call.reply()
        self._authorized(call, api.ACTION_MANAGE, authorized)

    def _prepare(self, call: Call) -> None:
        opts = check_options(call.args[0], api.PREPARE_OPTIONS, "Prepare",
                             call.option_signatures(0))
        if "kernel" not in opts:
            raise InvalidArgument("Prepare: option 'kernel' (the target image) is required")
        scratch = opts.get("scratch", "keep")
        if scratch not in ("keep", "auto"):
            parse_kho_scratch(scratch)  # InvalidArgument before it reaches a command line
        options = PrepareOptions(kernel=Path(opts["kernel"]), initrd=_path(opts.get("initrd")),
                                 cmdline=opts.get("cmdline"),
                                 scratch=scratch)
        if opts.get("dry_run"):
            self._start_job(call, "prepare", lambda: self.agent.plan_prepare(options),
                            lambda plan: {"dry_run": True, **plan})
            return

        def work() -> dict[str, Any]:
            manifest = self.agent.prepare(options)
            job = self.current
            if job is not None and job.cancel_requested:
                return {"canceled": True, "message": self.agent.cancel()}
            return {"prepared": str(options.kernel), "cmdline": manifest.cmdline_to,
                    "sessions": [s.name for s in manifest.sessions]}
        self._start_job(call, "prepare", work, lambda data: dict(data))

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
        self._start_job(call, "commit", work, lambda data: dict(data))

    def _cancel(self, call: Call) -> None:
        def work() -> dict[str, Any]:
            message = self.agent.cancel()
            return {"message": message}

        def cancelled(data: Any) -> dict[str, Any]:
            for record in [s for s in self.sessions.values() if not s.incoming]:
                self._drop_session(record)
            return dict(data)
        self._start_job(call, "cancel", work, cancelled)

    def _verify(self, call: Call) -> None:
        self._start_job(call, "verify", self._verify_work, self._verified)

    def start_verify(self) -> None:
        """At start after a live update: verify on our own, as a job anyone can watch."""
        job = self._new_job("verify")
        self.worker.submit(self._verify_work, lambda result, error: self._job_done(
            job, result, error, self._verified))

    def _verify_work(self) -> dict[str, Any]:
        report = self.agent.verify()
        manifest = self.agent.verified_manifest
        owners = {s.name: s.owner for s in manifest.sessions} if manifest else {}
        return {"ok": report.ok, "summary": self.agent.state.last_result,
                "incoming": {name: owners.get(name, "") for name in self.agent.incoming}}

    def _verified(self, data: dict[str, Any]) -> dict[str, Any]:
        for name, owner in data.pop("incoming").items():
            if name not in self.sessions:
                self._add_session(name, owner_uid(owner), "", incoming=True)
        return data

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
        if call.method == "CreateSessionWithOptions":
            opts = check_options(call.args[1], api.SESSION_OPTIONS, call.method,
                                 call.option_signatures(1))
            digests = opts.get("digests")
        validate_session_name(name)

        def authorized(caller: Caller) -> None:
            existing = self.sessions.get(name)
            if existing is not None:
                raise Busy(f"session {name!r} already exists (owner uid {existing.owner_uid})")

            def work() -> int:
                handle = self.agent.create_session(name, caller.owner, digests)
                return os.dup(handle.fileno())

            def created(fd: int) -> None:
                record = self._add_session(name, caller.uid, caller.sender, incoming=False)
                try:
                    call.reply("(oh)", record.path, 0, fds=[fd])
                finally:
                    os.close(fd)
            self._engine(work, created, call)
        self._authorized(call, api.ACTION_SESSION, authorized)

    def _preserve(self, call: Call) -> None:
        name, index, token = call.args
        validate_token(token)

        def authorized(caller: Caller) -> None:
            record = self._owned(name, caller)
            if record.incoming:
                raise InvalidArgument(f"session {name!r} came from the previous kernel; "
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

            def done(_: None) -> None:
                record.ready = ready
                if record.obj is not None:
                    record.obj.changed(["Ready"])
                call.reply()
            self._engine(lambda: self.agent.set_ready(name, ready), done, call)
        self._authorized(call, api.ACTION_SESSION, authorized)

    def _release_session(self, call: Call) -> None:
        name = call.args[0]

        def authorized(caller: Caller) -> None:
            record = self._owned(name, caller)
            if record.incoming:
                raise InvalidArgument(f"session {name!r} came from the previous kernel: "
                                      "FinishSession ends it")

            def done(_: None) -> None:
                self._drop_session(record)
                call.reply()
            self._engine(lambda: self.agent.release_session(name), done, call)
        self._authorized(call, api.ACTION_SESSION, authorized)

    def _incoming_owned(self, name: str, caller: Caller) -> SessionObject:
        record = self._owned(name, caller)
        if not record.incoming:
            raise InvalidArgument(f"session {name!r} was created in this boot; it is retrieved "
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
                record.claimed, record.owner_sender = True, caller.sender
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
        GLib.source_remove(self._grace_source)
        for record in list(self.sessions.values()):
            self._drop_session(record)
        self.manager.unregister()


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None
