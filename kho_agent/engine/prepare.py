"""Planning and preparing a live update, and cancelling a prepared one.

    IDLE -> PREPARING -> PREPARED          PREPARED -> CANCELLING -> IDLE

Planning (preflight, the scratch plan, prepare --dry-run) reads the host and changes nothing.
Prepare loads the target kernel, writes the manifest to disk and into the agent's own session,
and rolls every one of its own steps back when one fails or it is cancelled; the clients'
sessions are not the prepare's and stay.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import netstate
from ..abi import Severity, Side
from ..abi.compat import Spoken, compare
from ..errors import (
    AgentError,
    Busy,
    Cancelled,
    InvalidArgument,
    KernelRefused,
    NotPrepared,
    PreflightFailed,
)
from ..facts import TARGET_IMAGE_MAX, TargetFiles, TargetImage, kho_view, running_abi
from ..kernel.atomicfile import write_atomic
from ..kernel.callerfile import RegularFile, open_regular
from ..kernel.cmdline import target_cmdline
from ..kernel.sysinfo import SysInfo
from . import attempts, history
from .context import EngineContext
from .manifest import (
    AGENT_SESSION,
    MANIFEST_TOKEN,
    Manifest,
    SubtreeEntry,
    manifest_memfd,
    manifest_to_json,
)
from .phase import Phase, Target, now
from .preflight import PlannedSession, PreflightInputs, PreflightResult, preflight
from .scratch_plan import ScratchPlan, plan_scratch


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


# --------------------------------------------------------------------- planning

def plan(ctx: EngineContext, target: TargetImage | None, initrd_size: int = 0, *,
         margin: float | None = None) -> Plan:
    """Preflight a target (already read and decoded): reads the host, changes nothing."""
    info = ctx.sysinfo()
    out = kho_view(ctx.host, Side.OUT)
    compat = None
    scratch: ScratchPlan | None = None
    if target is not None:
        compat = compare(running_abi(ctx.host, info.release, out,
                                     known=ctx.image_strings), target.abi)
        scratch = plan_scratch(info, out.scratch, kho_boot=ctx.incoming_present(),
                               image_bytes=target.memory_size, initrd_bytes=initrd_size,
                               margin=ctx.config.scratch_margin if margin is None
                               else margin)
    luo = out.luo
    errors = ([f for f in out.state.findings if f.severity is Severity.ERROR]
              if out.state else [])
    holders = [p for p in ctx.host.liveupdate.holders() if p != os.getpid()]
    inputs = PreflightInputs(
        sysinfo=info, simulated=ctx.host.simulated,
        device_present=ctx.host.liveupdate.present(), device_holders=holders,
        kexec_available=ctx.host.kexec.available(),
        kho_debugfs=out.directory is not None, debugfs_problem=out.problem,
        running_luo=luo.compatible if luo else None, compat=compat,
        scratch=scratch,
        sessions=[PlannedSession(c.name, [f.facts for f in c.files.values()],
                                 c.owner_fd_store)
                  for c in ctx.clients.values()],
        outgoing_errors=errors, outgoing_decoded=out.state is not None,
        fd_store_slots=ctx.fd_store_slots())
    return Plan(preflight(inputs), target, scratch,
                dict(compat.running.contracts) if compat else {},
                dict(compat.target.contracts) if compat else {})


def plan_files(ctx: EngineContext, files: TargetFiles | None, *,
               margin: float | None = None) -> Plan:
    """Preflight open target files. A target that cannot be read or decoded is the error
    that says why (InvalidArgument, NotFound, PermissionDenied: exit 2, "cannot run"), the
    same in prepare, its dry run, preflight, scratch and compat: a missing or broken input
    is not a verdict on the host, and not a policy refusal."""
    if files is None:
        return plan(ctx, None, margin=margin)
    return plan(ctx, ctx.images.get(files.kernel), files.initrd_size, margin=margin)


def gather_preflight(ctx: EngineContext, target_path: Path | None,
                     initrd: Path | None) -> PreflightResult:
    """Preflight by file names, opened with this process's rights (rehearsal, the local
    CLI). Names that cannot be opened or read raise the error that says why (plan_files)."""
    if target_path is None:
        return plan(ctx, None).result
    files = TargetFiles.open(target_path, initrd)
    try:
        return plan_files(ctx, files).result
    finally:
        files.close()


@contextmanager
def _target_files(options: PrepareOptions) -> Iterator[TargetFiles]:
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


# the phases a prepare may start from (any other: an update is prepared or under way)
PREPARABLE = (Phase.IDLE, Phase.VERIFIED, Phase.FAILED)


def check_start(ctx: EngineContext, options: PrepareOptions) -> None:
    """What a prepare checks before it changes anything: Busy unless one may start now,
    InvalidArgument for a command line no kernel would take."""
    if ctx.state.phase not in PREPARABLE:
        raise Busy(f"cannot prepare while {ctx.state.phase.value}; cancel first")
    if options.cmdline is not None:
        target_cmdline(options.cmdline)


def no_blockers(found: Plan) -> None:
    """PreflightFailed naming the preflight's blockers, if it found any."""
    if found.result.blockers:
        raise PreflightFailed("preflight found blockers: " + "; ".join(
            f"{c.name}: {c.message}" for c in found.result.blockers))


def plan_prepare(ctx: EngineContext, options: PrepareOptions) -> dict[str, Any]:
    """prepare --dry-run: the preflight and the command line prepare would load the kernel
    with, whether the target is the kernel running (`kho-agentctl update`'s "up to date"),
    and the error the prepare would be refused with now (`prepare_refused`: the state, a
    blocker, the command line; the prepare's own checks, in its order); nothing is loaded,
    written or preserved."""
    with ctx.operation("prepare"), _target_files(options) as files:
        found = plan_files(ctx, files)
        info = ctx.sysinfo()
        cmdline: str | None = None
        problem: InvalidArgument | None = None
        try:
            cmdline = _cmdline(options, info, found)
        except InvalidArgument as exc:
            problem = exc
        refusal: AgentError | None = None
        try:
            check_start(ctx, options)
            no_blockers(found)
        except (Busy, InvalidArgument, PreflightFailed) as exc:
            refusal = exc
        if refusal is None:  # the last check the prepare makes
            refusal = problem
        image = found.target.info if found.target else None
        release = image.release if image else None
        version = image.uts_version if image else None
        return {"kernel": files.kernel.resolved_path(),
                "initrd": files.initrd.resolved_path() if files.initrd else None,
                "release": release, "version": version,
                "running": {"release": info.release, "version": info.version},
                "target_is_running": same_build(info, release, version),
                "cmdline": cmdline, "cmdline_problem": problem.message if problem else None,
                "sessions": sorted(ctx.clients),
                "would_prepare": refusal is None,
                "prepare_refused": refusal.to_json() if refusal else None,
                "preflight": found.result.to_json()}


def same_build(running: SysInfo, release: str | None, version: str | None) -> bool:
    """Whether a kernel image of this release and `uname -v` is the kernel running: both are
    known and equal. `uname -v` holds the build number and time, so a rebuild under the same
    release (a developer's habit) is another kernel; an image whose version cannot be read is
    never taken for the running one."""
    return (release is not None and version is not None and running.version is not None
            and (release, version) == (running.release, running.version))


def scratch_plan(ctx: EngineContext, kernel: Path | TargetImage | None, initrd_size: int,
                 margin: float | None) -> ScratchPlan:
    """The kho_scratch= plan for a target kernel (the running kernel's image by default).
    Changes nothing."""
    info = ctx.sysinfo()
    out = kho_view(ctx.host, Side.OUT, with_memory=False)
    if not isinstance(kernel, TargetImage):
        path = kernel or ctx.host.path(f"boot/vmlinuz-{info.release}")
        with open_regular(path, "kernel image", max_size=TARGET_IMAGE_MAX) as file:
            kernel = ctx.images.get(file)
    return plan_scratch(info, out.scratch, kho_boot=ctx.incoming_present(),
                        image_bytes=kernel.memory_size, initrd_bytes=initrd_size,
                        margin=ctx.config.scratch_margin if margin is None else margin)


def outgoing_liveupdate_number(ctx: EngineContext) -> int | None:
    luo = kho_view(ctx.host, Side.OUT, with_memory=False).luo
    return luo.liveupdate_number if luo else None


# --------------------------------------------------------------------- prepare

def prepare(ctx: EngineContext, options: PrepareOptions) -> Manifest:
    with ctx.operation("prepare"), _target_files(options) as files:
        # checked before anything changes: a refusal here leaves the state as it was
        check_start(ctx, options)
        info = ctx.sysinfo()
        previous = ctx.state.phase
        started = history.now_iso()
        ctx.transition(Phase.PREPARING, f"preparing {files.kernel.resolved_path()}",
                       committed_at=None)
        loaded = False
        done = False
        try:
            ctx.on_phase("planning: reading the outgoing KHO state", 0, 0)
            found = plan_files(ctx, files)
            ctx.on_progress(30)
            no_blockers(found)
            cmdline = _cmdline(options, info, found)
            _check_cancelled(options)
            ctx.on_phase("loading the kernel", 0, 0)
            ctx.host.kexec.load(files.kernel, files.initrd, cmdline)
            loaded = True
            ctx.on_progress(60)
            _check_cancelled(options)
            ctx.on_phase("writing the manifest", 0, 0)
            manifest = build_manifest(ctx, info, cmdline, found, final=False)
            write_atomic(ctx.store.manifest_path, manifest_to_json(manifest))
            ctx.on_phase("preserving the agent's session", 0, 0)
            replace_agent_session(ctx, manifest)
            ctx.on_progress(90)
            _check_cancelled(options)
            ctx.transition(Phase.PREPARED, f"prepared {files.kernel.resolved_path()}",
                           loaded_by_us=True, target=Target(
                               files.kernel.resolved_path(),
                               files.initrd.resolved_path() if files.initrd else None,
                               cmdline))
            ctx.plan = found
            ctx.prepared = manifest
            attempts.prepared(ctx, started, files.kernel.resolved_path(), manifest)
            if found.target is not None and found.target.digest:
                ctx.image_strings.remember(found.target.digest, found.target.strings)
            done = True
            return manifest
        except AgentError as exc:
            _rollback_prepare(ctx, loaded)
            verb = "cancelled" if isinstance(exc, Cancelled) else "failed"
            failed = ctx.transition_best_effort(
                exc, previous if previous is not Phase.FAILED else Phase.IDLE,
                f"prepare {verb}: {exc.message}", loaded_by_us=False, target=None)
            attempts.prepare_failed(ctx, started, files.kernel.resolved_path(), exc)
            done = True
            raise failed  # noqa: B904 (the error or its copy)
        finally:
            if not done:  # a bug: undo what was done, and end in the phase we came from
                _rollback_prepare(ctx, loaded)
                ctx.transition(previous if previous is not Phase.FAILED else Phase.IDLE,
                               "prepare failed on an internal error; nothing is "
                               "prepared", strict=False, loaded_by_us=False, target=None)


def _check_cancelled(options: PrepareOptions) -> None:
    if options.cancelled():
        raise Cancelled("the prepare was cancelled; nothing stays loaded or recorded")


def _rollback_prepare(ctx: EngineContext, loaded: bool) -> None:
    """Undo a prepare's own steps; the clients' sessions are not the prepare's and stay."""
    ctx.plan = None
    ctx.prepared = None
    if ctx.agent_session is not None:
        ctx.agent_session.close()
        ctx.agent_session = None
    if loaded:
        try:
            ctx.host.kexec.unload()
        except KernelRefused as exc:  # still loaded: say so, cancel will try again
            ctx.persist_problem = f"the loaded kernel could not be unloaded: {exc.message}"
    ctx.remove_manifest([])


def _cmdline(options: PrepareOptions, info: SysInfo, found: Plan) -> str:
    """The next kernel's command line, checked as it will read it (kernel/cmdline.py)."""
    base = options.cmdline if options.cmdline is not None else info.cmdline
    scratch = None
    if options.scratch == "auto":
        if found.scratch is None:
            raise InvalidArgument("--scratch auto needs a scratch plan, and there is none "
                                  "for this target")
        scratch = found.scratch.absolute_form().removeprefix("kho_scratch=")
    elif options.scratch != "keep":
        scratch = options.scratch
    return target_cmdline(base, scratch=scratch, setup_cmdline_size=found.target.cmdline_size
                          if found.target else None)


def replace_agent_session(ctx: EngineContext, manifest: Manifest) -> None:
    """The manifest memfd is sealed, so a newer manifest replaces the whole agent session
    (closing it unpreserves the old memfd)."""
    if ctx.agent_session is not None:
        ctx.agent_session.close()
        ctx.agent_session = None
    session = ctx.open_device().create_session(AGENT_SESSION)
    fd = manifest_memfd(manifest)
    try:
        session.preserve_fd(fd, MANIFEST_TOKEN)
    except KernelRefused:
        session.close()
        raise
    finally:
        os.close(fd)  # the kernel holds its own reference
    ctx.agent_session = session


def build_manifest(ctx: EngineContext, info: SysInfo, cmdline: str, found: Plan | None, *,
                   final: bool, network: dict[str, object] | None = None) -> Manifest:
    out = kho_view(ctx.host, Side.OUT, with_memory=False)
    luo = out.luo
    scratch = found.scratch if found else None
    if network is None:
        net, _reason = netstate.observe()
        network = net.to_json() if net else None
    number = luo.liveupdate_number if luo else None
    mode = ctx.handoff_mode(info)
    return Manifest(
        schema=1, created=now(), host=socket.gethostname(), release_from=info.release,
        release_to=(found.target.info.release or "") if found and found.target else "",
        boot_id_from=info.boot_id,
        abi_from={k: v.primary for k, v in (found.abi_running if found else {}).items()
                  if v.primary},
        abi_to={k: v.primary for k, v in (found.abi_target if found else {}).items()
                if v.primary},
        cmdline_to=cmdline,
        scratch={"areas": [{"role": a.role, "phys": a.phys, "size": a.size}
                           for a in out.scratch],
                 "kho_scratch": info.params.get("kho_scratch"),
                 "recommended": scratch.absolute_form() if scratch else None},
        liveupdate_number_from=number,
        liveupdate_number_expected=number + 1 if number is not None else None,
        sessions=[c.entry(mode) for c in ctx.clients.values()],
        subtrees=[SubtreeEntry(name, size, None)
                  for name, size in sorted(out.sub_blob_sizes.items())],
        network=network, final=final)


# --------------------------------------------------------------------- cancel

CANCELLED_ON_REQUEST = ("the live update was cancelled (kho-agentctl cancel or Cancel()): the "
                       "session was closed and its files are no longer preserved; create it "
                       "again for the next update")


def cancel(ctx: EngineContext, why: str = CANCELLED_ON_REQUEST) -> str:
    """Cancel the prepared update: unload the kernel, release every client session (their
    owners are told through `released`, with `why`), drop the manifest. The kernel is unloaded
    first:
    if that fails nothing else has changed and the update goes back to where it was. The
    steps after it cannot fail halfway, and a state that cannot be saved (disk full) does
    not stop them: the phase ends idle in memory and the message says the file lags."""
    with ctx.operation("cancel"):
        if ctx.state.phase not in (Phase.PREPARED, Phase.FAILED, Phase.PREPARING):
            raise NotPrepared(f"nothing to cancel (state {ctx.state.phase.value})")
        before = ctx.state.phase
        notes = []
        ctx.transition(Phase.CANCELLING, "cancelling", strict=False)
        if ctx.state.loaded_by_us and ctx.host.kexec.loaded():
            try:
                ctx.host.kexec.unload()
            except KernelRefused as exc:
                raise ctx.transition_best_effort(  # noqa: B904 (the error or its copy)
                    exc, before, f"cancel failed, nothing was changed: {exc.message}")
            notes.append("unloaded the kernel")
        ctx.unpark_all()
        names = sorted(ctx.clients)
        for client in list(ctx.clients.values()):
            client.close()
        ctx.clients.clear()
        for name in names:
            ctx.note_released(name, why)
        if names:
            notes.append(f"released {len(names)} session(s): {', '.join(names)}")
        if ctx.agent_session is not None:
            ctx.agent_session.close()
            ctx.agent_session = None
        ctx.plan = None
        ctx.prepared = None
        ctx.remove_manifest(notes)
        message = "cancelled: " + (", ".join(notes) or "nothing was held")
        if why != CANCELLED_ON_REQUEST:  # not asked for: the state says what ended it
            message += f"; {why}"
        ctx.transition(Phase.IDLE, message, strict=False, loaded_by_us=False, target=None,
                       last_result={"result": "cancelled", "reason": message})
        attempts.cancelled(ctx, message, was_failed=before is Phase.FAILED)
        if ctx.persist_problem is not None:
            message += (f"; the agent's state could not be saved ({ctx.persist_problem}): "
                        "until it can, a restart of the agent reports an earlier state")
        return message
