"""The live-update state machine.

    IDLE -> PREPARING -> PREPARED -> COMMITTING -> (kexec) -> VERIFYING -> VERIFIED | FAILED
                          PREPARED -> CANCELLING -> IDLE

One operation at a time; every transition is persisted (statefile.py) before the work it
announces, so a restart knows where it was. Session fds live only as long as this process: a
restart in the same boot after PREPARED means the preservation is gone, and the orchestrator says
so instead of claiming it.

The orchestrator talks to the kernel only through a `Host` (real or simulated) and decides with
the pure modules (preflight, scratch, manifest).
"""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import netstate
from ..abi import Severity, Side
from ..abi.compat import Spoken, compare
from ..digest import DigestResult, digest_fd
from ..errors import (
    AgentError,
    Busy,
    Cancelled,
    InvalidArgument,
    KernelRefused,
    NotFound,
    NotPrepared,
    PreflightFailed,
    StateCorrupt,
)
from ..facts import (
    TARGET_IMAGE_MAX,
    FileFacts,
    TargetFiles,
    TargetImage,
    TargetImageCache,
    file_facts,
    kho_view,
    running_abi,
)
from ..imagestrings import ImageStrings
from ..kernel.atomicfile import write_atomic
from ..kernel.callerfile import RegularFile, open_regular
from ..kernel.cmdline import target_cmdline
from ..kernel.host import Host
from ..kernel.liveupdate import (
    LiveUpdateDevice,
    LiveUpdateSession,
    validate_session_name,
    validate_token,
)
from ..kernel.sysinfo import SysInfo, read_sysinfo
from ..preflight import PlannedSession, PreflightInputs, PreflightResult, handoff_mode, preflight
from ..scratch import ScratchPlan, plan_scratch
from .handoff import SYSTEMD_SESSION, SessionFdStore
from .manifest import (
    AGENT_SESSION,
    MANIFEST_TOKEN,
    FileEntry,
    Manifest,
    Observation,
    ObservedFile,
    ObservedSession,
    SessionEntry,
    SubtreeEntry,
    VerifyItem,
    VerifyReport,
    check_session,
    compare_manifest,
    manifest_from_fd,
    manifest_memfd,
    manifest_to_json,
    read_manifest,
)
from .phase import AgentState, Phase, StateStore, Target, move_aside, now
from .verifyrun import (
    HostObservation,
    PendingDigest,
    Retrieved,
    VerifyRun,
    observe,
    timed_step,
)

MAX_FAILURES_IN_STATE = 50
MAX_RELEASED_KEPT = 256   # names of released sessions remembered for their owners' later calls


@dataclass
class EngineConfig:
    state_dir: Path
    digests: bool = True          # default for sessions that do not say
    scratch_margin: float = 0.25
    # After verify, incoming client sessions wait this long for their owners; then they are
    # finished (their memory is discarded). None: wait until an operator finishes them.
    claim_grace_seconds: float | None = 1800.0


@dataclass
class PrepareOptions:
    # A name is opened by this process (with its rights); an open file is used as it is (the
    # daemon opens what a caller names with the caller's rights, or takes the caller's fd).
    kernel: Path | RegularFile
    initrd: Path | RegularFile | None = None
    cmdline: str | None = None    # None: reuse the running kernel's command line
    scratch: str = "keep"         # "keep", "auto" (recommended kho_scratch=), or a value
    # Asked between the steps of a prepare: True rolls it back and raises Cancelled (the
    # daemon's Job.Cancel). The clients' sessions are not touched: they are not the prepare's.
    cancelled: Callable[[], bool] = lambda: False


@dataclass(frozen=True)
class Plan:
    """What planning found for one target: the preflight verdict and what prepare and the
    manifest take from it. A value: planning calls get their own, and only prepare keeps one."""

    result: PreflightResult
    target: TargetImage | None
    scratch: ScratchPlan | None
    abi_running: dict[str, Spoken]
    abi_target: dict[str, Spoken]


@dataclass
class CommitOptions:
    force: bool = False           # commit although some clients are not ready
    dry_run: bool = False


@dataclass
class PreservedFile:
    token: int
    # The agent's own reference, for the size and digest taken at ready. Without digests it is
    # dropped at ready (the kernel holds the file and freezes its size, and 10k files would
    # otherwise cost 10k fds); with digests it is kept, so that a client that says "not ready"
    # and then "ready" again gets a digest of its memory as it is now.
    fd: int | None
    size: int
    seals: int | None
    facts: FileFacts
    digest: DigestResult | None = None

    def drop_fd(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@dataclass
class ClientSession:
    name: str
    owner: str
    handle: LiveUpdateSession
    digests: bool
    files: dict[int, PreservedFile] = field(default_factory=dict)
    ready: bool = False
    owner_gone: bool = False      # the creator's bus connection closed (the daemon says so)
    # the owner keeps the session fd in its own service's fd store (option fd_store): in mode
    # fdstore the agent does not park it (systemd would hand it to only one of two stores)
    owner_fd_store: bool = False

    def entry(self, mode: str) -> SessionEntry:
        return SessionEntry(self.name, self.owner, [
            FileEntry(f.token, f.size, f.digest.hexdigest if f.digest else None,
                      f.digest.alg if f.digest else None,
                      f.digest.seconds if f.digest else None, f.seals)
            for f in sorted(self.files.values(), key=lambda f: f.token)], self.ready,
            self.digests, self.owner_fd_store and mode == "fdstore")


@dataclass
class CommitResult:
    dry_run: bool
    handoff_seconds: float | None
    plan: list[str]


@dataclass
class RecoveryResult:
    phase: Phase
    message: str
    verify_pending: bool


def _seals(fd: int) -> int | None:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # a shmem file without sealing support answers EINVAL
        return None


class Engine:
    def __init__(self, host: Host, config: EngineConfig) -> None:
        self.host = host
        self.config = config
        self.images = TargetImageCache()
        self.store = StateStore(config.state_dir)
        # the version strings of the images prepare decoded: verify, after the kexec into one
        # of them, finds its own image's strings there instead of decompressing it again
        self.image_strings = ImageStrings(config.state_dir)
        self.state = AgentState()
        self.device: LiveUpdateDevice | None = None
        self.agent_session: LiveUpdateSession | None = None
        self.clients: dict[str, ClientSession] = {}
        self.incoming: dict[str, LiveUpdateSession] = {}  # retrieved at verify, for owners
        self.commit_blocker: str | None = None
        self._lock = threading.Lock()
        self._verifying: VerifyRun | None = None  # a verification between its steps
        self._handed_off = False
        # the plan the prepared update was made with; only prepare sets it (planning calls get
        # their own copies), cancel and a failed prepare clear it
        self._plan: Plan | None = None
        self._prepared: Manifest | None = None
        # client sessions the agent dropped without their owner asking (cancel), with why: the
        # daemon tells each owner, and a later call on the name says what happened
        self.released: dict[str, str] = {}
        self.persist_problem: str | None = None  # the last state write that failed
        # monotonic time after which unclaimed incoming sessions are finished (set by verify)
        self.claim_deadline: float | None = None
        self.verified_manifest: Manifest | None = None  # what the last verify compared with
        # Called with a percentage as an operation advances (the daemon's Job.Progress); it
        # runs on the caller's thread and must not call back into the orchestrator.
        self.on_progress: Callable[[int], None] = lambda percent: None
        # Called with (step, seconds) as verify ends each of its steps (the daemon logs them):
        # after a kexec a VM manager waits on verify, so where its time goes is worth a line.
        self.on_step_timed: Callable[[str, float], None] = lambda step, seconds: None
        # Hand-off mode fdstore (fdstore.py): where commit parks the session fds (None: the
        # service has no fd store), what is parked now, and the session fds the store handed
        # back at start (name -> fd), which verify adopts instead of retrieving.
        self.fd_store: SessionFdStore | None = None
        self.parked: list[str] = []
        self.stored_sessions: dict[str, int] = {}

    # ------------------------------------------------------------------ state

    @contextmanager
    def _operation(self, name: str) -> Iterator[None]:
        self._acquire(name)
        try:
            yield
        finally:
            self._lock.release()

    def _acquire(self, name: str) -> None:
        if self._handed_off:
            raise Busy("the host has kexec'd; this agent instance is finished")
        if not self._lock.acquire(blocking=False):
            if self._verifying is not None:
                raise Busy(f"the live update is being verified; {name} was not started")
            raise Busy(f"another operation is running; {name} was not started")

    def _transition(self, phase: Phase, message: str, *, strict: bool = True,
                    **changes: Any) -> None:
        """Move to `phase`: the whole new state is built and saved first. `strict` (announce
        before acting): a state that cannot be saved raises and nothing changes, in memory
        either. Not strict (record what already happened): memory moves on anyway, and the
        save failure is kept in `persist_problem`."""
        new = copy.deepcopy(self.state)
        new.phase = phase
        new.message = message
        new.boot_id = self.sysinfo().boot_id
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

    def _transition_best_effort(self, cause: AgentError, phase: Phase, message: str,
                                **changes: Any) -> None:
        """For rollbacks: a state that cannot be written (disk full) must not hide the error
        being reported (`cause`), so it is added to it. The in-memory state moves on; the file
        keeps the earlier phase, which a restart in this boot resolves to "cancelled"."""
        self._transition(phase, message, strict=False, **changes)
        if self.persist_problem is not None:
            cause.message += (f"; in addition the agent's state could not be saved "
                              f"({self.persist_problem}): until it can, a restart of the agent "
                              "reports an earlier state")
            cause.args = (cause.message,)

    def sysinfo(self) -> SysInfo:
        return read_sysinfo(self.host.root)

    def start(self) -> RecoveryResult:
        """Load the persisted state and reconcile it with this boot (call once at start).

        Whatever is found in the state directory, this returns: a state that cannot be saved
        (a full disk, a read-only directory, a corrupt state file that cannot be moved aside)
        is reported in the state's message, and the agent runs on with it in memory, so that
        the daemon comes up and says so instead of failing in a restart loop."""
        with self.store.deferring_errors() as unsaved:
            result = self._start()
            if self.stored_sessions and not result.verify_pending:
                self._release_stored("the fd store handed back session fds but there is "
                                     "nothing to verify them against")
        if unsaved:
            result = _unsaved_at_start(self, result, unsaved[-1])
        return result

    def _start(self) -> RecoveryResult:
        boot = self.sysinfo().boot_id
        loaded = self.store.load_or_set_aside()
        self.state = loaded.state
        incoming = self._incoming_present()
        same_boot = loaded.found and self.state.boot_id == boot
        # Did a verification run in this boot already? The state says so when it is intact and
        # of this boot; otherwise only the verification's own record can, and verifying a
        # second time would find the sessions the first one retrieved missing: a false
        # "failed". Read before clear_obstacles() moves a record that is not a file aside.
        verified_here: tuple[bool, dict[str, Any], str] | None = None
        record_problem: str | None = None
        if incoming and not same_boot:
            intact = loaded.found and loaded.corrupt is None
            try:
                # with an intact state, only a record of this boot matters; without one, an
                # unreadable record matters too (it may be this boot's)
                record = self.store.read_last_verify(only_for_boot=boot if intact else None)
            except StateCorrupt as exc:
                record_problem = exc.message
            else:
                if record is not None and record.boot_id == boot:
                    verified_here = (record.ok, record.summary(MAX_FAILURES_IN_STATE),
                                     str(record.path))
        notes = [aside.describe() for aside in self.store.clear_obstacles()]
        if loaded.corrupt is not None or not loaded.found:
            corrupt = loaded.corrupt.describe() if loaded.corrupt is not None else None
            return _recover_lost_state(self, boot, corrupt, notes, incoming, verified_here,
                                       record_problem)
        if verified_here is not None:  # the state was not saved after that verification
            return _adopt_verification(self, verified_here, notes)
        phase = self.state.phase
        if same_boot and self.stored_sessions:
            self._release_stored("the fd store handed back session fds in the boot they were "
                                 "parked in (the previous agent process stopped after "
                                 "parking them)")
        if same_boot and self.state.awaiting:
            self._lost_awaiting()
        result: RecoveryResult | None = None
        if phase in (Phase.PREPARING, Phase.PREPARED, Phase.COMMITTING, Phase.CANCELLING):
            if same_boot:
                result = self._restarted_before_kexec(phase)
            elif phase in (Phase.PREPARED, Phase.COMMITTING):
                result = RecoveryResult(phase, "rebooted since the last state was written: "
                                        "verification is pending", True)
            else:
                self._transition(Phase.FAILED, f"the host rebooted while {phase.value}; "
                                 "nothing was committed", last_result={
                                     "result": "failed", "reason": f"rebooted {phase.value}"})
        elif phase is Phase.VERIFYING:
            self._transition(Phase.FAILED, "verification was interrupted (the agent stopped "
                             "while verifying); sessions it had retrieved were finished when it "
                             "exited", last_result={"result": "failed",
                                                    "reason": "verification interrupted"})
        if result is None:
            result = RecoveryResult(self.state.phase, self.state.message,
                                    not same_boot and incoming)
        if notes:  # in memory only: a save here would stamp an earlier boot's state as ours
            self.state.message = "; ".join([self.state.message, *notes])
            result = RecoveryResult(result.phase, "; ".join([result.message, *notes]),
                                    result.verify_pending)
        return result

    def _lost_awaiting(self) -> None:
        """The previous agent process of this boot held retrieved sessions for their owners and
        stopped before they claimed them: closing them finished them in the kernel."""
        lost = self.state.awaiting
        note = (f"the agent stopped while {len(lost)} retrieved session(s) waited for their "
                f"owners; they were finished when it stopped and their memory is lost: "
                f"{', '.join(lost)}")
        result = dict(self.state.last_result or {})
        result["lost_after_verify"] = lost
        self._transition(self.state.phase, note, awaiting=[],
                         discarded=sorted(set(self.state.discarded) | set(lost)),
                         last_result=result)

    def _release_stored(self, why: str) -> None:
        """Close the session fds the store handed back that nothing will use, and drop them
        from the store: an outgoing session closed here unpreserves its files, an incoming one
        is finished (its memory is discarded)."""
        names = sorted(self.stored_sessions)
        for name in names:
            os.close(self.stored_sessions.pop(name))
            self._unpark_quietly(name)
        note = f"{why}; released {len(names)}: {', '.join(names)}"
        self._transition(self.state.phase, note)

    def _unpark_quietly(self, name: str) -> None:
        if self.fd_store is None:
            return
        try:
            self.fd_store.unpark(name)
        except AgentError as exc:  # the copy stays with systemd until the service stops
            self.persist_problem = f"cannot drop session {name!r:.80} from the fd store: {exc}"

    def _incoming_present(self) -> bool:
        return self.host.path("sys/kernel/debug/kho/in/fdt").exists()

    def _restarted_before_kexec(self, phase: Phase) -> RecoveryResult:
        notes = [f"the agent restarted while {phase.value}, before any kexec: its session fds "
                 "closed with the old process, so nothing is preserved any more"]
        if self.state.loaded_by_us and self.host.kexec.loaded():
            try:
                self.host.kexec.unload()
                notes.append("the loaded kernel was unloaded")
            except KernelRefused as exc:
                notes.append(f"unloading the kernel failed: {exc.message}")
        self._remove_manifest(notes)
        message = "; ".join(notes) + ". Run prepare again."
        self._transition(Phase.IDLE, message, loaded_by_us=False, target=None,
                         last_result={"result": "cancelled", "reason": message})
        return RecoveryResult(Phase.IDLE, message, False)

    # ------------------------------------------------------------------ sessions (daemon API)

    def _device(self) -> LiveUpdateDevice:
        if self.device is None:
            self.device = self.host.liveupdate.open()
        return self.device

    def create_session(self, name: str, owner: str, digests: bool | None = None, *,
                       owner_fd_store: bool = False) -> LiveUpdateSession:
        validate_session_name(name)
        if name == AGENT_SESSION:
            raise InvalidArgument(f"session name {AGENT_SESSION!r} is the agent's own")
        if name == SYSTEMD_SESSION:
            # systemd >= 261 creates it at shutdown for its fd stores, and skips a stored
            # session of that name
            raise InvalidArgument(f"session name {SYSTEMD_SESSION!r} is systemd's own")
        if self.state.phase in (Phase.COMMITTING, Phase.CANCELLING, Phase.PREPARING):
            raise Busy(f"cannot create sessions while {self.state.phase.value}")
        if name in self.clients:
            # Never ask the kernel: a CREATE_SESSION that fails with EEXIST can leave an empty
            # block that panics the next kernel (platform notes).
            raise Busy(f"session {name!r:.80} already exists (owner {self.clients[name].owner})")
        try:
            handle = self._device().create_session(name)
        except KernelRefused as exc:
            if exc.errno == errno.EEXIST:  # from the kernel despite our records
                self.commit_blocker = (f"CREATE_SESSION {name!r:.80} failed with EEXIST: the "
                                       "kernel may hand over an empty session block that "
                                       "panics the next kernel; only a cold reboot is safe")
            raise
        self.clients[name] = ClientSession(name, owner, handle,
                                           self.config.digests if digests is None else digests,
                                           owner_fd_store=owner_fd_store)
        return handle

    def _client(self, name: str) -> ClientSession:
        client = self.clients.get(name)
        if client is None:
            why = self.released.get(name)
            if why is not None:
                raise NotFound(f"session {name!r:.80} was released: {why}")
            known = ", ".join(sorted(self.clients)[:20]) or "none"
            raise NotFound(f"no session {name!r:.80} (known: {known:.400})")
        return client

    def preserve(self, name: str, fd: int, token: int) -> None:
        client = self._client(name)
        validate_token(token)
        if token in client.files:
            raise InvalidArgument(f"token {token:#x} is already used in session {name!r:.80}")
        if self.state.phase in (Phase.COMMITTING, Phase.CANCELLING):
            raise Busy(f"cannot preserve files while {self.state.phase.value}")
        facts = file_facts(fd)
        if facts.hugetlb or not facts.shmem or facts.linked:
            raise InvalidArgument(f"fd {fd} cannot be preserved: only memfds (not hugetlb) and "
                                  "unlinked tmpfs files can")
        try:
            own = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 0)
        except OSError as exc:  # before the kernel is asked: nothing preserved, nothing to undo
            code = exc.errno or errno.EBADF
            raise KernelRefused("dup", code, (
                "the agent has no file descriptor left for its own reference to the file "
                "(raise LimitNOFILE= of the service)" if code in (errno.EMFILE, errno.ENFILE)
                else f"fd {fd} cannot be duplicated")) from exc
        try:
            client.handle.preserve_fd(fd, token)
        except BaseException:
            os.close(own)
            raise
        client.files[token] = PreservedFile(token, own, facts.size, _seals(own), facts)
        client.ready = False  # new data: the client says ready again

    def set_ready(self, name: str, ready: bool) -> None:
        """A ready client's memory is quiescent: only now are sizes and digests taken. A client
        that is no longer ready may change its memory: its digests are void until it is ready
        again (and a session is not committed while not ready, unless forced)."""
        client = self._client(name)
        client.owner_gone = False  # whoever says so is its owner (the service checked the uid)
        if ready:
            client.ready = False
            try:
                for f in client.files.values():
                    if f.fd is None:
                        continue  # measured at an earlier ready; the kernel froze its size
                    f.size = os.fstat(f.fd).st_size
                    f.seals = _seals(f.fd)
                    if client.digests:
                        f.digest = digest_fd(f.fd, f.size)
                    else:
                        f.drop_fd()
            except AgentError:  # a file changed while it was digested: not ready, no digests
                for f in client.files.values():
                    f.digest = None
                raise
        else:
            for f in client.files.values():
                f.digest = None
        client.ready = ready

    def owner_gone(self, name: str, *, never_told: bool = False) -> None:
        """The session's creator disconnected from the bus. A creator that left before the
        reply to CreateSession could reach it never learned of the session (no path, no fd):
        the session is released. Otherwise the session stays for a new connection of the same
        uid, and a commit refused for it says that its owner is gone."""
        client = self.clients.get(name)
        if client is None:
            return
        if never_told and not client.files:
            self.release_session(name)
            self._note_released(name, "its creator disconnected before the reply to "
                                "CreateSession reached it: nobody knew of the session")
            return
        client.owner_gone = True

    def release_session(self, name: str) -> None:
        """Close a client session before the kexec (the kernel unpreserves its files)."""
        client = self.clients.pop(name, None)
        if client is None:
            raise NotFound(f"no session {name!r:.80}")
        self._close_client(client)

    def _close_client(self, client: ClientSession) -> None:
        for f in client.files.values():
            f.drop_fd()
        client.handle.close()

    # ------------------------------------------------------------------ prepare

    def plan(self, target: TargetImage | None, initrd_size: int = 0,
             target_problem: str | None = None, *, margin: float | None = None) -> Plan:
        """Preflight a target (already read and decoded): reads the host, changes nothing."""
        info = self.sysinfo()
        out = kho_view(self.host, Side.OUT)
        compat = None
        scratch: ScratchPlan | None = None
        if target is not None:
            compat = compare(running_abi(self.host, info.release, out,
                                         known=self.image_strings), target.abi)
            scratch = plan_scratch(info, out.scratch, kho_boot=self._incoming_present(),
                                   image_bytes=target.memory_size, initrd_bytes=initrd_size,
                                   margin=self.config.scratch_margin if margin is None
                                   else margin)
        luo = out.luo
        errors = ([f for f in out.state.findings if f.severity is Severity.ERROR]
                  if out.state else [])
        holders = [p for p in self.host.liveupdate.holders() if p != os.getpid()]
        inputs = PreflightInputs(
            sysinfo=info, simulated=self.host.simulated,
            device_present=self.host.liveupdate.present(), device_holders=holders,
            kexec_available=self.host.kexec.available(),
            kho_debugfs=out.directory is not None, debugfs_problem=out.problem,
            running_luo=luo.compatible if luo else None, compat=compat,
            target_problem=target_problem, scratch=scratch,
            sessions=[PlannedSession(c.name, [f.facts for f in c.files.values()],
                                     c.owner_fd_store)
                      for c in self.clients.values()],
            outgoing_errors=errors, fd_store_slots=self._fd_store_slots())
        return Plan(preflight(inputs), target, scratch,
                    dict(compat.running.contracts) if compat else {},
                    dict(compat.target.contracts) if compat else {})

    def plan_files(self, files: TargetFiles | None, *, margin: float | None = None) -> Plan:
        """Preflight open target files; a target that cannot be read or decoded is a blocker
        of the report, not an error of the call."""
        if files is None:
            return self.plan(None, margin=margin)
        try:
            target = self.images.get(files.kernel)
        except AgentError as exc:
            return self.plan(None, files.initrd_size, exc.message, margin=margin)
        return self.plan(target, files.initrd_size, margin=margin)

    def gather_preflight(self, target_path: Path | None, initrd: Path | None) -> PreflightResult:
        """Preflight by file names, opened with this process's rights (rehearsal, the local
        CLI). Names that cannot be opened are a blocker of the report."""
        if target_path is None:
            return self.plan(None).result
        try:
            files = TargetFiles.open(target_path, initrd)
        except AgentError as exc:
            return self.plan(None, 0, exc.message).result
        try:
            return self.plan_files(files).result
        finally:
            files.close()

    @contextmanager
    def _target_files(self, options: PrepareOptions) -> Iterator[TargetFiles]:
        """The prepare's files: names are opened here (and closed after), open files are the
        caller's to close."""
        with ExitStack() as stack:
            kernel = options.kernel
            if not isinstance(kernel, RegularFile):
                kernel = stack.enter_context(open_regular(kernel, "target kernel",
                                                          max_size=TARGET_IMAGE_MAX))
            initrd = options.initrd
            if initrd is not None and not isinstance(initrd, RegularFile):
                initrd = stack.enter_context(open_regular(initrd, "initrd"))
            yield TargetFiles(kernel, initrd)

    def plan_prepare(self, options: PrepareOptions) -> dict[str, Any]:
        """prepare --dry-run: the preflight and the command line prepare would load the kernel
        with; nothing is loaded, written or preserved."""
        with self._operation("prepare"), self._target_files(options) as files:
            plan = self.plan_files(files)
            cmdline: str | None = None
            problem = None
            try:
                cmdline = self._cmdline(options, self.sysinfo(), plan)
            except InvalidArgument as exc:
                problem = exc.message
            return {"kernel": files.kernel.resolved_path(),
                    "initrd": files.initrd.resolved_path() if files.initrd else None,
                    "cmdline": cmdline, "cmdline_problem": problem,
                    "sessions": sorted(self.clients),
                    "would_prepare": not plan.result.blockers and problem is None,
                    "preflight": plan.result.to_json()}

    def scratch_plan(self, kernel: Path | TargetImage | None, initrd_size: int = 0,
                     margin: float | None = None) -> ScratchPlan:
        """The kho_scratch= plan for a target kernel (the running kernel's image by default).
        Changes nothing."""
        info = self.sysinfo()
        out = kho_view(self.host, Side.OUT, with_memory=False)
        if not isinstance(kernel, TargetImage):
            path = kernel or self.host.path(f"boot/vmlinuz-{info.release}")
            with open_regular(path, "kernel image", max_size=TARGET_IMAGE_MAX) as file:
                kernel = self.images.get(file)
        return plan_scratch(info, out.scratch, kho_boot=self._incoming_present(),
                            image_bytes=kernel.memory_size, initrd_bytes=initrd_size,
                            margin=self.config.scratch_margin if margin is None else margin)

    def prepare(self, options: PrepareOptions) -> Manifest:
        with self._operation("prepare"), self._target_files(options) as files:
            if self.state.phase not in (Phase.IDLE, Phase.VERIFIED, Phase.FAILED):
                raise Busy(f"cannot prepare while {self.state.phase.value}; cancel first")
            # checked before anything changes: a refusal here leaves the state as it was
            info = self.sysinfo()
            if options.cmdline is not None:
                target_cmdline(options.cmdline)
            previous = self.state.phase
            self._transition(Phase.PREPARING, f"preparing {files.kernel.resolved_path()}")
            loaded = False
            done = False
            try:
                plan = self.plan_files(files)
                self.on_progress(30)
                if plan.result.blockers:
                    raise PreflightFailed("preflight found blockers: " + "; ".join(
                        f"{c.name}: {c.message}" for c in plan.result.blockers))
                cmdline = self._cmdline(options, info, plan)
                self._check_cancelled(options)
                self.host.kexec.load(files.kernel, files.initrd, cmdline)
                loaded = True
                self.on_progress(60)
                self._check_cancelled(options)
                manifest = self._manifest(info, cmdline, plan, final=False)
                write_atomic(self.store.manifest_path, manifest_to_json(manifest))
                self._replace_agent_session(manifest)
                self.on_progress(90)
                self._check_cancelled(options)
                self._transition(Phase.PREPARED, f"prepared {files.kernel.resolved_path()}",
                                 loaded_by_us=True, target=Target(
                                     files.kernel.resolved_path(),
                                     files.initrd.resolved_path() if files.initrd else None,
                                     cmdline))
                self._plan = plan
                self._prepared = manifest
                if plan.target is not None and plan.target.digest:
                    self.image_strings.remember(plan.target.digest, plan.target.strings)
                done = True
                return manifest
            except AgentError as exc:
                self._rollback_prepare(loaded)
                verb = "cancelled" if isinstance(exc, Cancelled) else "failed"
                self._transition_best_effort(
                    exc, previous if previous is not Phase.FAILED else Phase.IDLE,
                    f"prepare {verb}: {exc.message}", loaded_by_us=False, target=None)
                done = True
                raise
            finally:
                if not done:  # a bug: undo what was done, and end in the phase we came from
                    self._rollback_prepare(loaded)
                    self._transition(previous if previous is not Phase.FAILED else Phase.IDLE,
                                     "prepare failed on an internal error; nothing is "
                                     "prepared", strict=False, loaded_by_us=False, target=None)

    @staticmethod
    def _check_cancelled(options: PrepareOptions) -> None:
        if options.cancelled():
            raise Cancelled("the prepare was cancelled; nothing stays loaded or recorded")

    def _rollback_prepare(self, loaded: bool) -> None:
        """Undo a prepare's own steps; the clients' sessions are not the prepare's and stay."""
        self._plan = None
        self._prepared = None
        if self.agent_session is not None:
            self.agent_session.close()
            self.agent_session = None
        if loaded:
            try:
                self.host.kexec.unload()
            except KernelRefused as exc:  # still loaded: say so, cancel will try again
                self.persist_problem = f"the loaded kernel could not be unloaded: {exc.message}"
        self._remove_manifest([])

    def _cmdline(self, options: PrepareOptions, info: SysInfo, plan: Plan) -> str:
        """The next kernel's command line, checked as it will read it (kernel/cmdline.py)."""
        base = options.cmdline if options.cmdline is not None else info.cmdline
        scratch = None
        if options.scratch == "auto":
            if plan.scratch is None:
                raise InvalidArgument("--scratch auto needs a scratch plan, and there is none "
                                      "for this target")
            scratch = plan.scratch.absolute_form().removeprefix("kho_scratch=")
        elif options.scratch != "keep":
            scratch = options.scratch
        return target_cmdline(base, scratch=scratch, setup_cmdline_size=plan.target.cmdline_size
                              if plan.target else None)

    def _replace_agent_session(self, manifest: Manifest) -> None:
        """The manifest memfd is sealed, so a newer manifest replaces the whole agent session
        (closing it unpreserves the old memfd)."""
        if self.agent_session is not None:
            self.agent_session.close()
            self.agent_session = None
        session = self._device().create_session(AGENT_SESSION)
        fd = manifest_memfd(manifest)
        try:
            session.preserve_fd(fd, MANIFEST_TOKEN)
        except KernelRefused:
            session.close()
            raise
        finally:
            os.close(fd)  # the kernel holds its own reference
        self.agent_session = session

    def _manifest(self, info: SysInfo, cmdline: str, plan: Plan | None, *, final: bool,
                  network: dict[str, object] | None = None) -> Manifest:
        out = kho_view(self.host, Side.OUT, with_memory=False)
        luo = out.luo
        scratch = plan.scratch if plan else None
        if network is None:
            net, _reason = netstate.snapshot_or_reason()
            network = net.to_json() if net else None
        number = luo.liveupdate_number if luo else None
        mode = self.handoff_mode(info)
        return Manifest(
            schema=1, created=now(), host=socket.gethostname(), release_from=info.release,
            release_to=(plan.target.info.release or "") if plan and plan.target else "",
            boot_id_from=info.boot_id,
            abi_from={k: v.primary for k, v in (plan.abi_running if plan else {}).items()
                      if v.primary},
            abi_to={k: v.primary for k, v in (plan.abi_target if plan else {}).items()
                    if v.primary},
            cmdline_to=cmdline,
            scratch={"areas": [{"role": a.role, "phys": a.phys, "size": a.size}
                               for a in out.scratch],
                     "kho_scratch": info.params.get("kho_scratch"),
                     "recommended": scratch.absolute_form() if scratch else None},
            liveupdate_number_from=number,
            liveupdate_number_expected=number + 1 if number is not None else None,
            sessions=[c.entry(mode) for c in self.clients.values()],
            subtrees=[SubtreeEntry(name, size, None)
                      for name, size in sorted(out.sub_blob_sizes.items())],
            network=network, final=final)

    # ------------------------------------------------------------------ commit

    def handoff_mode(self, info: SysInfo | None = None) -> str:
        """Who holds the session fds through the shutdown (preflight.handoff_mode): a systemd
        able to carry them (fdstore) needs this service to have an fd store; without one
        (kho-agent-fdstore.conf not installed) the agent holds them itself (direct)."""
        return handoff_mode(info or self.sysinfo(), self.host.simulated, self._fd_store_slots())

    def _fd_store_slots(self) -> int:
        return self.fd_store.capacity if self.fd_store is not None else 0

    def _park_sessions(self) -> None:
        """fdstore: hand every session fd to the store, all or none."""
        store = self.fd_store
        assert store is not None  # handoff_mode() says fdstore only with a store
        handles = [(c.name, c.handle) for c in self.clients.values() if not c.owner_fd_store]
        if self.agent_session is not None:
            handles.append((AGENT_SESSION, self.agent_session))
        if len(handles) > store.capacity:
            raise PreflightFailed(f"{len(handles)} session fds to park but the fd store takes "
                                  f"{store.capacity}: raise FileDescriptorStoreMax= in "
                                  "kho-agent-fdstore.conf")
        try:
            for name, handle in handles:
                store.park(name, handle.fileno())
                self.parked.append(name)
        except AgentError:
            self._unpark_all()
            raise

    def _unpark_all(self) -> None:
        for name in self.parked:
            self._unpark_quietly(name)
        self.parked = []

    def commit(self, options: CommitOptions) -> CommitResult:
        with self._operation("commit"):
            if self.state.phase is not Phase.PREPARED:
                raise NotPrepared(f"nothing is prepared (state {self.state.phase.value}); run "
                                  "prepare first")
            if self.commit_blocker:
                raise PreflightFailed(self.commit_blocker)
            waiting = [c.name + (" (its owner disconnected)" if c.owner_gone else "")
                       for c in self.clients.values() if not c.ready]
            if waiting and not options.force:
                raise Busy(f"session(s) not ready: {', '.join(waiting)}; wait for their owners "
                           "(a new connection of the same uid can SetReady) or commit with "
                           "force")
            mode = self.handoff_mode()
            plan = [f"kernel {self.state.target.kernel if self.state.target else '?'} is loaded",
                    f"{len(self.clients)} client session(s), "
                    f"{sum(len(c.files) for c in self.clients.values())} file(s)",
                    f"final manifest to {self.store.manifest_path} and session {AGENT_SESSION}",
                    f"reboot via {mode}"
                    + (" (session fds parked in systemd's fd store, /dev/liveupdate closed)"
                       if mode == "fdstore" else "")]
            if options.dry_run:
                return CommitResult(True, None, plan)
            start = time.perf_counter()
            if not self.host.kexec.loaded():
                raise NotPrepared("the prepared kernel is no longer loaded (kexec -u or another "
                                  "loader?); cancel and prepare again")
            info = self.sysinfo()
            # The network was recorded at prepare: reading it again (pyroute2) would add to
            # the blackout for no gain.
            manifest = self._manifest(info, self.state.target.cmdline if self.state.target
                                      else info.cmdline, self._plan, final=True,
                                      network=self._prepared.network if self._prepared else None)
            write_atomic(self.store.manifest_path, manifest_to_json(manifest))
            self._replace_agent_session(manifest)
            if mode == "fdstore":
                self._park_sessions()
                if self.device is not None:  # systemd-shutdown opens it: it opens only once
                    self.device.close()
                    self.device = None
            self.on_progress(90)
            handoff = time.perf_counter() - start
            # not strict: a state that cannot be saved must not stop the kexec (the next boot
            # finds "prepared" from another boot, which means the same: verify)
            self._transition(Phase.COMMITTING, "handing off to the loaded kernel", strict=False,
                             handoff_seconds=handoff)
            try:
                self.host.kexec.reboot(via_systemd=mode in ("direct", "fdstore"))
            except AgentError as exc:  # refused by the kernel, an inhibitor, or systemctl
                self._unpark_all()  # the agent holds them again; a later cancel must free them
                self._transition_best_effort(exc, Phase.PREPARED, "the kexec did not happen, "
                                             f"nothing lost: {exc.message}")
                raise
            self._handed_off = True  # only the simulator returns from a successful reboot
            return CommitResult(False, handoff, plan)

    # ------------------------------------------------------------------ verify

    def verify(self) -> VerifyReport:
        """Verify the live update this boot came through: the three steps of verifyrun.py in
        a row (the daemon runs the middle one beside the engine)."""
        run = self.verify_begin()
        try:
            try:
                while self.verify_retrieve(run) is not None:
                    pass
                found = observe(self.host, run, self.image_strings, self.on_step_timed,
                                self.on_progress)
            except (AgentError, OSError) as exc:
                self.verify_abandon(run, getattr(exc, "message", None) or str(exc))
                raise
            return self.verify_conclude(run, found)
        finally:
            self._end_verify(run)

    def verify_begin(self) -> VerifyRun:
        """Start a verification: the manifest read, the state "verifying"; verify_retrieve then
        retrieves the sessions. Until verify_conclude or verify_abandon ends the run, no other
        operation starts; the owners may claim the sessions of `run.handed_back` meanwhile."""
        self._acquire("verify")
        begun = False
        try:
            run = self._verify_begin()
            begun = True
        finally:
            if not begun:
                self._lock.release()
        self._verifying = run
        return run

    def _verify_begin(self) -> VerifyRun:
        info = self.sysinfo()
        same_boot = self.state.boot_id == info.boot_id
        if same_boot and self.state.phase in (Phase.PREPARED, Phase.COMMITTING):
            raise NotPrepared("this host has not rebooted since prepare; commit first")
        if same_boot and self.state.phase in (Phase.VERIFIED, Phase.FAILED) and \
                self.state.last_result and "counts" in self.state.last_result:
            # the sessions were retrieved by that verification and are held (or were
            # handed out): retrieving them again would report false failures
            raise NotPrepared("this boot was verified already: the result is in the state "
                              f"({self.state.last_result.get('result')}); see "
                              f"{self.store.last_verify_path}")
        if self.state.phase is Phase.IDLE and not self._incoming_present():
            raise NotPrepared("nothing to verify: this boot did not come through a live "
                              "update (no incoming KHO state) and none is recorded")
        manifest_disk: Manifest | None = None
        disk_problem = None
        with self._timed("reading the manifest on disk, recording the state"):
            try:
                manifest_disk = read_manifest(self.store.manifest_path)
            except (AgentError, OSError) as exc:
                disk_problem = str(exc)
            self._transition(Phase.VERIFYING, "verifying the live update", discarded=[])
        try:
            return self._retrieve_incoming(info, manifest_disk, disk_problem)
        except AgentError as exc:
            self._verify_failed(exc)
            raise

    def _verify_failed(self, exc: AgentError) -> None:
        self._transition_best_effort(exc, Phase.FAILED, f"verification could not run: "
                                     f"{exc.message}", last_result={
                                         "result": "failed", "reason": exc.message})

    def _retrieve_incoming(self, info: SysInfo, disk: Manifest | None,
                           disk_problem: str | None) -> VerifyRun:
        device_problem = None
        try:
            device = self._device()
        except KernelRefused as exc:
            device, device_problem = None, exc.message
        with self._timed("reading the manifest from the agent's session"):
            memfd_manifest, memfd_problem = self._session_manifest(device, device_problem)
        manifest = memfd_manifest or disk
        self.verified_manifest = manifest
        if manifest is None:
            raise NotFound("no manifest to verify against: "
                           f"disk: {disk_problem or 'absent'}; memfd: "
                           f"{memfd_problem or device_problem or 'absent'}")
        self.on_progress(10)
        # the sessions without digests first (they are handed back as soon as each is
        # retrieved, the others only at the conclusion), each kind in the manifest's order;
        # popped from the end
        def checked(entry: SessionEntry) -> bool:
            return any(f.digest is not None for f in entry.files)
        todo = [e for e in reversed(manifest.sessions) if checked(e)] + \
            [e for e in reversed(manifest.sessions) if not checked(e)]
        return VerifyRun(info, manifest, _manifests_agree(disk, memfd_manifest, memfd_problem),
                         [], device=device, device_problem=device_problem, todo=todo,
                         started=time.perf_counter())

    def verify_retrieve(self, run: VerifyRun) -> Retrieved | None:
        """Step 1, one session at a time (the daemon answers its owners between two): retrieve
        the next session, keep it for its owner, read its files' sizes and seals, and keep an
        fd of each file with a digest for step 2. None once every session is done."""
        if not run.todo:
            self._retrieved_all(run)  # a manifest without sessions comes here first
            return None
        entry = run.todo.pop()
        pending = len(run.pending)
        # a session its owner kept in its own fd store went to the owner's service: systemd
        # retrieved it at boot, and a second RETRIEVE_SESSION would fail (EINVAL on 7.3)
        if not entry.owner_fd_store:
            with ExitStack() as unwind:
                unwind.callback(run.close)  # on an error; a run that goes on keeps its fds
                run.sessions.append(self._retrieve_session(run.device, entry,
                                                           run.device_problem, run))
                unwind.pop_all()
        retrieved = entry.name in self.incoming
        held = len(run.pending) > pending
        if retrieved:
            (run.held if held else run.handed_back).append(entry.name)
        total = len(run.manifest.sessions)
        done = total - len(run.todo)
        if total < 20 or done % (total // 20) == 0:
            self.on_progress(10 + 40 * done // total)
        if not run.todo:
            self._retrieved_all(run)
        return Retrieved(entry, retrieved, held)

    def _retrieved_all(self, run: VerifyRun) -> None:
        if run.retrieved_all:
            return
        run.retrieved_all = True
        self.on_step_timed(f"retrieving {len(run.manifest.sessions)} session(s), reading their "
                           "files' sizes", time.perf_counter() - run.started)
        if self.stored_sessions:  # in the store, not in the manifest: nobody will claim them
            self._release_stored("the fd store handed back sessions the manifest does not list")

    def verify_conclude(self, run: VerifyRun, found: HostObservation) -> VerifyReport:
        """Step 3: compare with the manifest, write the report, record the verdict; every
        retrieved session is its owner's to claim from here on."""
        try:
            observation = Observation(
                boot_id=run.info.boot_id, release=run.info.release, kho_boot=found.kho_boot,
                liveupdate_number=found.liveupdate_number,
                previous_release=found.previous_release, abi=found.abi, sessions=run.sessions,
                subtrees=found.subtrees, network=found.network,
                disk_manifest_matches_memfd=run.disk_manifest_matches_memfd)
            with self._timed("comparing with the manifest"):
                report = compare_manifest(run.manifest, observation)
            self._hold_for_owners()
            verdict = Phase.VERIFIED if report.ok else Phase.FAILED
            # The full report can hold 40k items: it gets its own file, written once; the state
            # (rewritten on every transition) keeps a summary and the failures.
            full = self.store.last_verify_path
            summary = _summary(report, full)
            try:
                # the boot id on top: a restart that lost state.json can tell this boot was
                # verified (statefile.py reads it) and does not verify into a false failure
                with self._timed("writing the verification report"):
                    write_atomic(full, json.dumps({"boot_id": run.info.boot_id,
                                                   **report.to_json()}).encode() + b"\n")
            except (AgentError, OSError) as exc:
                summary["report"] = None
                summary["report_problem"] = getattr(exc, "message", None) or str(exc)
            # not strict: the sessions are retrieved and held; the verdict stands in memory
            self._transition(verdict, "verified: every preserved item came back" if report.ok
                             else "verification found problems", strict=False,
                             last_result=summary)
            return report
        finally:
            self._end_verify(run)

    def verify_abandon(self, run: VerifyRun, reason: str) -> None:
        """Step 2 failed: the verdict is "failed", the retrieved sessions stay their owners'."""
        try:
            self._hold_for_owners()
            self._verify_failed(AgentError(reason))
        finally:
            self._end_verify(run)

    def _hold_for_owners(self) -> None:
        """The incoming sessions nobody claimed yet wait for their owners (the grace period)."""
        grace = self.config.claim_grace_seconds
        self.claim_deadline = (time.monotonic() + grace
                               if grace is not None and self.incoming else None)
        self.state.awaiting = sorted(self.incoming)

    def _end_verify(self, run: VerifyRun) -> None:
        """Idempotent: the run's fds closed, other operations may start."""
        run.close()
        if self._verifying is run:
            self._verifying = None
            self._lock.release()

    def _timed(self, step: str) -> AbstractContextManager[None]:
        return timed_step(self.on_step_timed, step)

    def _session_manifest(self, device: LiveUpdateDevice | None, device_problem: str | None
                          ) -> tuple[Manifest | None, str | None]:
        """The manifest the agent put in its own session before the kexec (and FINISH that
        session), or None and why not."""
        if device is None and AGENT_SESSION not in self.stored_sessions:
            return None, None
        try:
            agent = self._incoming_session(device, AGENT_SESSION, device_problem)
        except AgentError as exc:
            return None, exc.message
        manifest: Manifest | None = None
        try:
            fd = agent.retrieve_fd(MANIFEST_TOKEN)
            try:
                manifest = manifest_from_fd(fd)
            finally:
                os.close(fd)
            agent.finish()
            return manifest, None
        except AgentError as exc:  # a failed FINISH after the read keeps the manifest
            return manifest, exc.message
        finally:
            agent.close()  # closing a retrieved session finishes it, failed FINISH or not

    def _incoming_session(self, device: LiveUpdateDevice | None, name: str,
                          device_problem: str | None) -> LiveUpdateSession:
        """An incoming session: the fd the store handed back (fdstore), else RETRIEVE_SESSION."""
        fd = self.stored_sessions.pop(name, None)
        if fd is not None:
            session = self.host.liveupdate.adopt_session(fd, name)
            # held by the agent now; a copy left in the store would keep a finished session
            # open until the service stops
            self._unpark_quietly(name)
            return session
        if device is None:
            raise NotFound(f"session {name!r:.80}: {device_problem or '/dev/liveupdate is closed'}")
        return device.retrieve_session(name)

    def _retrieve_session(self, device: LiveUpdateDevice | None, entry: SessionEntry,
                          device_problem: str | None, run: VerifyRun) -> ObservedSession:
        """One incoming session retrieved and kept for its owner; its files' sizes and seals
        read, and an fd of each file with a digest kept in `run` for step 2."""
        try:
            session = self._incoming_session(device, entry.name, device_problem)
        except AgentError as exc:
            return ObservedSession(entry.name, None, exc.message)
        self.incoming[entry.name] = session  # closing would finish it: keep it for its owner
        files: list[ObservedFile] = []
        for f in entry.files:
            try:
                fd = session.retrieve_fd(f.token)
            except AgentError as exc:
                files.append(ObservedFile(f.token, 0, None, None, exc.message))
                continue
            # the kernel allows retrieving a token again: the owner will
            with ExitStack() as unwind:
                unwind.callback(os.close, fd)
                size = os.fstat(fd).st_size
                files.append(ObservedFile(f.token, size, None, _seals(fd), None))
                if f.digest is not None:
                    run.pending.append(PendingDigest(len(run.sessions), len(files) - 1, fd,
                                                     size))
                    unwind.pop_all()
        return ObservedSession(entry.name, files, None)

    def _kept_entry(self, name: str) -> SessionEntry:
        manifest = self.verified_manifest
        if manifest is None:
            raise NotFound("no live update was verified in this boot")
        entry = next((s for s in manifest.sessions if s.name == name), None)
        if entry is None or not entry.owner_fd_store:
            raise NotFound(f"session {name!r:.80} is not one its owner kept in its own fd store "
                           "in the verified live update")
        return entry

    def kept_session_owner(self, name: str) -> str:
        """The recorded owner of a session its owner kept in its own fd store."""
        return self._kept_entry(name).owner

    def check_kept_session(self, name: str, session: LiveUpdateSession) -> list[VerifyItem]:
        """After the update: check a session its owner kept in its own fd store (option
        fd_store), through the session fd the owner hands in, against what the verified
        manifest recorded of it (sizes, seals, digests). Reads only: every file is retrieved
        (RETRIEVE_FD may be repeated; the owner retrieves them too) and closed again."""
        entry = self._kept_entry(name)
        actual = session.get_name()
        if actual != name:
            raise InvalidArgument(f"the fd passed is session {actual!r:.80}, not {name!r:.80}")
        files: list[ObservedFile] = []
        for f in entry.files:
            try:
                fd = session.retrieve_fd(f.token)
            except AgentError as exc:
                files.append(ObservedFile(f.token, 0, None, None, exc.message))
                continue
            try:
                digest = digest_fd(fd).hexdigest if f.digest is not None else None
                files.append(ObservedFile(f.token, os.fstat(fd).st_size, digest, _seals(fd),
                                          None))
            finally:
                os.close(fd)
        return check_session(entry, ObservedSession(name, files, None))

    def claim_session(self, name: str) -> LiveUpdateSession:
        """Hand a retrieved incoming session to its owner (who finishes it)."""
        session = self.incoming.pop(name, None)
        if session is None:
            if name in self.state.discarded:
                raise NotFound(f"incoming session {name!r:.80} was finished unclaimed after the "
                               "grace period; its memory is discarded")
            raise NotFound(f"no retrieved incoming session {name!r:.80}")
        if not self.incoming:
            self.claim_deadline = None
        self.state.awaiting = sorted(self.incoming)
        try:
            self.store.save(self.state)  # a restart must not report a claimed session as lost
        except AgentError as exc:  # the owner gets its session anyway; the record lags
            self.persist_problem = exc.message
        return session

    def finish_unclaimed(self) -> list[str]:
        """Finish every incoming session nobody claimed (their memory is discarded): what the
        grace period ends with, or an operator's decision. The names are recorded in the state,
        so that an owner who comes later learns what happened to its session."""
        names = sorted(self.incoming)
        problems = []
        for name in names:
            session = self.incoming.pop(name)
            try:
                session.finish()
            except KernelRefused as exc:  # closing finishes it as well
                problems.append(f"{name}: {exc.message}")
            session.close()
        self.claim_deadline = None
        self.state.awaiting = []
        if names:
            self.state.discarded = sorted(set(self.state.discarded) | set(names))
            note = (f"finished {len(names)} unclaimed incoming session(s), their memory is "
                    f"discarded: {', '.join(names)}")
            if problems:
                note += "; FINISH failed for " + "; ".join(problems)
            self._transition(self.state.phase, note, strict=False)
        return names

    def finish_expired(self, now: float | None = None) -> list[str]:
        """Called by the daemon's timer: once the grace period after verify has ended, finish
        the sessions still unclaimed. Before that, or with no grace period configured, nothing."""
        if self.claim_deadline is None or not self.incoming:
            return []
        if (time.monotonic() if now is None else now) < self.claim_deadline:
            return []
        return self.finish_unclaimed()

    # ------------------------------------------------------------------ cancel

    def cancel(self) -> str:
        """Cancel the prepared update: unload the kernel, release every client session (their
        owners are told through `released`), drop the manifest. The kernel is unloaded first:
        if that fails nothing else has changed and the update goes back to where it was. The
        steps after it cannot fail halfway, and a state that cannot be saved (disk full) does
        not stop them: the phase ends idle in memory and the message says the file lags."""
        with self._operation("cancel"):
            if self.state.phase not in (Phase.PREPARED, Phase.FAILED, Phase.PREPARING):
                raise NotPrepared(f"nothing to cancel (state {self.state.phase.value})")
            before = self.state.phase
            notes = []
            self._transition(Phase.CANCELLING, "cancelling", strict=False)
            if self.state.loaded_by_us and self.host.kexec.loaded():
                try:
                    self.host.kexec.unload()
                except KernelRefused as exc:
                    self._transition_best_effort(exc, before, "cancel failed, nothing was "
                                                 f"changed: {exc.message}")
                    raise
                notes.append("unloaded the kernel")
            self._unpark_all()
            names = sorted(self.clients)
            for client in list(self.clients.values()):
                self._close_client(client)
            self.clients.clear()
            for name in names:
                self._note_released(name, "the live update was cancelled (kho-agentctl cancel "
                                    "or Cancel()): the session was closed and its files are no "
                                    "longer preserved; create it again for the next update")
            if names:
                notes.append(f"released {len(names)} session(s): {', '.join(names)}")
            if self.agent_session is not None:
                self.agent_session.close()
                self.agent_session = None
            self._plan = None
            self._prepared = None
            self._remove_manifest(notes)
            message = "cancelled: " + (", ".join(notes) or "nothing was held")
            self._transition(Phase.IDLE, message, strict=False, loaded_by_us=False, target=None,
                             last_result={"result": "cancelled", "reason": message})
            if self.persist_problem is not None:
                message += (f"; the agent's state could not be saved ({self.persist_problem}): "
                            "until it can, a restart of the agent reports an earlier state")
            return message

    def _remove_manifest(self, notes: list[str]) -> None:
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
            notes.append(f"the manifest {path} could not be removed "
                         f"({errno.errorcode.get(exc.errno or 0, exc.errno)})")

    def _note_released(self, name: str, why: str) -> None:
        self.released[name] = why
        while len(self.released) > MAX_RELEASED_KEPT:
            del self.released[next(iter(self.released))]

    def close(self) -> None:
        """Drop every kernel handle (process exit does the same). What is parked in the fd
        store stays there: that is the point of parking."""
        for fd in self.stored_sessions.values():
            os.close(fd)
        self.stored_sessions.clear()
        for session in self.incoming.values():
            session.close()
        self.incoming.clear()
        for client in self.clients.values():
            self._close_client(client)
        self.clients.clear()
        if self.agent_session is not None:
            self.agent_session.close()
            self.agent_session = None
        if self.device is not None:
            self.device.close()
            self.device = None


def _summary(report: VerifyReport, full: Path) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for item in report.items:
        counts[item.verdict.value] = counts.get(item.verdict.value, 0) + 1
    failures = [{"kind": i.kind, "name": i.name, "verdict": i.verdict.value, "detail": i.detail}
                for i in report.failures()]
    return {"result": "verified" if report.ok else "failed", "ok": report.ok, "counts": counts,
            "failures": failures[:MAX_FAILURES_IN_STATE],
            "failures_total": len(failures), "report": str(full)}


def _manifests_agree(disk: Manifest | None, memfd: Manifest | None,
                     memfd_problem: str | None) -> bool | None:
    """Equal copies: True. A memfd copy that did not survive while the disk copy did: False (the
    handover damaged or lost it). Nothing to compare: None."""
    if disk is not None and memfd is not None:
        return disk == memfd  # dataclass equality: every field, the sessions' files too
    if disk is not None and memfd_problem is not None:
        return False
    return None


# --- start without a state to go by (issue 11) ---------------------------------------------------

def _prepared_in(agent: Engine, boot: str) -> bool:
    """A manifest written in this boot: an update was prepared in it (cancel, a failed prepare
    and a restart before the kexec all remove the manifest; after a kexec it names the boot
    before). Absent or unreadable proves nothing."""
    try:
        return read_manifest(agent.store.manifest_path).boot_id_from == boot
    except AgentError:
        return False


def _adopt_verification(agent: Engine, verified: tuple[bool, dict[str, Any], str],
                        notes: list[str]) -> RecoveryResult:
    """This boot was verified already, but the state does not say so (it was lost, or not
    saved after the verification): report that result instead of verifying again."""
    ok, summary, report = verified
    phase = Phase.VERIFIED if ok else Phase.FAILED
    message = "; ".join([
        *notes, f"this boot was verified already ({summary['result']}; the report is {report}), "
        "so it is not verified again: a second verification would report the sessions the "
        "first one retrieved as missing. Retrieved sessions that their owners had not claimed "
        "when the agent stopped were finished with it"])
    agent._transition(phase, message, last_result=summary, awaiting=[])
    return RecoveryResult(phase, message, False)


def _recover_lost_state(agent: Engine, boot: str, corrupt: str | None, notes: list[str],
                        incoming: bool, verified: tuple[bool, dict[str, Any], str] | None,
                        record_problem: str | None) -> RecoveryResult:
    """No state to go by: the state file was corrupt (`corrupt` says what, and where it was
    kept) or absent. The phase is what can be proved, never read from the lost file: IDLE
    unless the verification record shows this boot verified. Nothing acts as prepared: the
    session fds of any update the lost state recorded closed with the process that held them."""
    lost = f"the state file was corrupt: {corrupt}" if corrupt else "there was no state file"
    # Session fds that systemd's fd store handed back come only to the first start after the
    # kexec (verification takes them out of the store): with them, this boot is not verified.
    first_after_kexec = incoming and bool(agent.stored_sessions)
    if _prepared_in(agent, boot):
        # as a restart with the state intact would: the kernel that prepare loaded goes too
        agent.state.loaded_by_us = True
        result = agent._restarted_before_kexec(Phase.PREPARED)
        message = "; ".join([lost, *notes, result.message])
        agent._transition(Phase.IDLE, message)
        return RecoveryResult(Phase.IDLE, message, False)
    if verified is not None:
        return _adopt_verification(agent, verified, [lost, *notes])
    verify = False
    if corrupt is None and not first_after_kexec and record_problem is None:
        parts = ["started", *notes]  # a first start
    elif incoming and record_problem is not None and not first_after_kexec:
        parts = [lost, *notes, "this boot came through a live update, but whether it was "
                 f"verified already cannot be told ({record_problem}), so it is not verified "
                 "on its own (a second verification would report the sessions the first one "
                 "retrieved as missing): run `kho-agentctl verify` if it was not yet"]
    elif incoming:
        parts = [lost, *notes, "started idle; this boot came through a live update: verifying "
                 "it against the manifest"]
        verify = True
    else:
        parts = [lost, *notes, "started idle: no update is prepared (one that the lost state "
                 "recorded ended with the agent process that prepared it)"]
        if agent.host.kexec.loaded():
            parts.append("a kernel is loaded for kexec: if that prepare loaded it, nothing is "
                         "preserved for it any more; run prepare again, or unload it "
                         "(kexec -u)")
    message = "; ".join(parts)
    agent._transition(Phase.IDLE, message)
    return RecoveryResult(Phase.IDLE, message, verify)


def _unsaved_at_start(agent: Engine, result: RecoveryResult,
                      problem: str) -> RecoveryResult:
    """The state could not be saved while starting: the agent runs on with it in memory and
    says so. Prepare and verify save before they act, so they refuse until it can be saved; a
    pending verification is left for the operator."""
    agent.persist_problem = problem
    if agent.store.stuck is not None:
        note = ("nothing is saved until the corrupt state file can be moved aside: prepare and "
                "verify are refused until then")
    else:
        note = (f"the state could not be saved ({problem}): until it can, prepare and verify "
                "are refused")
    if result.verify_pending:
        note += ("; the pending verification did not start: run `kho-agentctl verify` once "
                 "the state can be saved")
    agent.state.message = f"{agent.state.message}; {note}"
    return RecoveryResult(agent.state.phase, f"{result.message}; {note}", False)
