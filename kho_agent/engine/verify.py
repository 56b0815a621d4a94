"""Verifying the live update this boot came through, in the three steps of verifyrun.py.

    (kexec) -> VERIFYING -> VERIFIED | FAILED

The engine's part: the manifest read (the agent's own session first, the disk copy beside it),
the incoming sessions retrieved one at a time and held for their owners, and the conclusion
(the comparison, the report, the verdict). Observation (verifyrun.observe) needs no engine
state and may run on a thread of its own.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ..digest import DigestUnavailable, require_available
from ..errors import AgentError, KernelRefused, NotFound, NotPrepared, VerificationFailed
from ..kernel.atomicfile import write_atomic
from ..kernel.liveupdate import LiveUpdateDevice, LiveUpdateSession
from ..kernel.sysinfo import SysInfo
from . import attempts, history
from .context import EngineContext
from .manifest import (
    AGENT_SESSION,
    MANIFEST_TOKEN,
    Manifest,
    Observation,
    ObservedFile,
    ObservedSession,
    SessionEntry,
    VerifyReport,
    compare_manifest,
    manifest_from_fd,
    read_manifest,
)
from .phase import Phase
from .sessions import seals
from .verifyrun import HostObservation, PendingDigest, Retrieved, VerifyRun, observe

MAX_FAILURES_IN_STATE = 50


def verify(ctx: EngineContext) -> VerifyReport:
    """The three steps in a row (the daemon runs the middle one beside the engine)."""
    run = verify_begin(ctx)
    try:
        try:
            while verify_retrieve(ctx, run) is not None:
                pass
            found = verify_observe(ctx, run)
        except (AgentError, OSError) as exc:
            verify_abandon(ctx, run, getattr(exc, "message", None) or str(exc))
            raise
        return verify_conclude(ctx, run, found)
    finally:
        _end_verify(ctx, run)


def verify_begin(ctx: EngineContext) -> VerifyRun:
    """Start a verification: the manifest read, the state "verifying"; verify_retrieve then
    retrieves the sessions. Until verify_conclude or verify_abandon ends the run, no other
    operation starts; the owners may claim the sessions of `run.handed_back` meanwhile."""
    ctx.acquire("verify")
    begun = False
    try:
        run = _verify_begin(ctx)
        begun = True
    finally:
        if not begun:
            ctx.lock.release()
    ctx.verifying = run
    return run


def _verify_begin(ctx: EngineContext) -> VerifyRun:
    info = ctx.sysinfo()
    state = ctx.state
    same_boot = state.boot_id == info.boot_id
    if same_boot and state.phase in (Phase.PREPARED, Phase.COMMITTING):
        raise NotPrepared("this host has not rebooted since prepare; commit first")
    if same_boot and state.phase in (Phase.VERIFIED, Phase.FAILED) and \
            state.last_result and "counts" in state.last_result:
        # the sessions were retrieved by that verification and are held (or were
        # handed out): retrieving them again would report false failures
        raise NotPrepared(_verified_already(state.last_result, ctx.store.last_verify_path))
    if state.phase is Phase.IDLE and not ctx.incoming_present():
        raise NotPrepared("nothing to verify: this boot did not come through a live "
                          "update (no incoming KHO state) and none is recorded")
    manifest_disk: Manifest | None = None
    disk_problem = None
    with ctx.timed("reading the manifest on disk, recording the state"):
        try:
            manifest_disk = read_manifest(ctx.store.manifest_path)
        except (AgentError, OSError) as exc:
            disk_problem = str(exc)
        if manifest_disk is not None:
            _require_digest_algorithms(ctx, manifest_disk)
        ctx.transition(Phase.VERIFYING, "verifying the live update", discarded=[])
    try:
        return _retrieve_incoming(ctx, info, manifest_disk, disk_problem)
    except AgentError as exc:
        raise _verify_failed(ctx, exc)  # noqa: B904 (the error or its copy)


def _require_digest_algorithms(ctx: EngineContext, manifest: Manifest) -> None:
    """Refuse the verification before anything is retrieved or recorded when the manifest
    names a digest algorithm this installation cannot compute (blake3 without its module).
    Found after the retrieval, it would fail every such file for good: the kernel hands each
    session out once. Refused here, the sessions stay in the kernel and the state stays
    "verification pending", so a verification with the module installed runs for real (a
    restart of the agent, which loads it, verifies at its start). Only the disk copy of the
    manifest can be read without retrieving a session; without one, the algorithms are known
    only once the agent's own session is retrieved, and the verification goes on (refusing
    then would leave the sessions with no manifest to verify them against)."""
    try:
        require_available(f.digest_alg for s in manifest.sessions for f in s.files
                          if f.digest is not None and f.digest_alg is not None)
    except DigestUnavailable as exc:
        reason = (f"{exc.message}. The verification did not run and retrieved no session: "
                  "they wait in the kernel. Once the module is installed, restart kho-agentd "
                  "(systemctl restart kho-agent.service), which loads it and verifies at its "
                  "start")
        # in memory only, as recovery does: saving would stamp the earlier boot's state as
        # this boot's, and a restart would no longer see the verification pending
        ctx.state.message = f"verification is pending: it could not run: {reason}"
        raise DigestUnavailable(reason) from None


def _verified_already(last_result: dict[str, Any], report: Path) -> str:
    """Why this boot cannot be verified anew once a verification ran: the kernel hands each
    incoming session out once, and that verification took them all."""
    counts = last_result.get("counts")
    tally = ", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items())) \
        if isinstance(counts, dict) else ""
    return (f"this boot was verified already ({last_result.get('result')}"
            f"{': ' + tally if tally else ''}; the report is {report}) and cannot be verified "
            "anew: that verification retrieved every incoming session (the kernel hands each "
            "out once) and holds them for their owners or handed them over, so a second one "
            "would find them missing. A new verification runs only after one that could not "
            "run (no manifest, no device)")


def _verify_failed(ctx: EngineContext, exc: AgentError) -> AgentError:
    raised = ctx.transition_best_effort(exc, Phase.FAILED, f"verification could not run: "
                                        f"{exc.message}", last_result={
                                            "result": "failed", "reason": exc.message})
    attempts.end(ctx, history.Verdict.VERIFICATION_FAILED, error=exc,
                 detail="verification could not run")
    return raised


def _retrieve_incoming(ctx: EngineContext, info: SysInfo, disk: Manifest | None,
                       disk_problem: str | None) -> VerifyRun:
    device_problem = None
    try:
        device = ctx.open_device()
    except KernelRefused as exc:
        device, device_problem = None, exc.message
    with ctx.timed("reading the manifest from the agent's session"):
        memfd_manifest, memfd_problem = _session_manifest(ctx, device, device_problem)
    manifest = memfd_manifest or disk
    ctx.verified_manifest = manifest
    if manifest is None:
        raise NotFound("no manifest to verify against: "
                       f"disk: {disk_problem or 'absent'}; memfd: "
                       f"{memfd_problem or device_problem or 'absent'}")
    ctx.on_progress(10)
    ctx.on_phase("retrieving the sessions", 0, 0)
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


def verify_retrieve(ctx: EngineContext, run: VerifyRun) -> Retrieved | None:
    """Step 1, one session at a time (the daemon answers its owners between two): retrieve
    the next session, keep it for its owner, read its files' sizes and seals, and keep an
    fd of each file with a digest for step 2. None once every session is done."""
    if not run.todo:
        _retrieved_all(ctx, run)  # a manifest without sessions comes here first
        return None
    entry = run.todo.pop()
    pending = len(run.pending)
    # a session its owner kept in its own fd store went to the owner's service: systemd
    # retrieved it at boot, and a second RETRIEVE_SESSION would fail (EINVAL on 7.3)
    if not entry.owner_fd_store:
        with ExitStack() as unwind:
            unwind.callback(run.close)  # on an error; a run that goes on keeps its fds
            run.sessions.append(retrieve_session(ctx, run.device, entry,
                                                 run.device_problem, run))
            unwind.pop_all()
    retrieved = entry.name in ctx.incoming
    held = len(run.pending) > pending
    if retrieved:
        (run.held if held else run.handed_back).append(entry.name)
    total = len(run.manifest.sessions)
    done = total - len(run.todo)
    if total < 20 or done % (total // 20) == 0:
        ctx.on_progress(10 + 40 * done // total)
    if not run.todo:
        _retrieved_all(ctx, run)
    return Retrieved(entry, retrieved, held)


def _retrieved_all(ctx: EngineContext, run: VerifyRun) -> None:
    if run.retrieved_all:
        return
    run.retrieved_all = True
    ctx.on_step_timed(f"retrieving {len(run.manifest.sessions)} session(s), reading their "
                      "files' sizes", time.perf_counter() - run.started)
    if ctx.stored_sessions:  # in the store, not in the manifest: nobody will claim them
        ctx.release_stored("the fd store handed back sessions the manifest does not list")


def verify_observe(ctx: EngineContext, run: VerifyRun) -> HostObservation:
    """Step 2: reads the host and the run's fds only, so it may run beside the engine."""
    return observe(ctx.host, run, ctx.image_strings, ctx.on_step_timed, ctx.on_progress,
                   ctx.on_phase)


def verify_conclude(ctx: EngineContext, run: VerifyRun, found: HostObservation) -> VerifyReport:
    """Step 3: compare with the manifest, write the report, record the verdict; every
    retrieved session is its owner's to claim from here on."""
    try:
        observation = Observation(
            boot_id=run.info.boot_id, release=run.info.release, kho_boot=found.kho_boot,
            liveupdate_number=found.liveupdate_number,
            previous_release=found.previous_release, abi=found.abi, sessions=run.sessions,
            subtrees=found.subtrees, network=found.network,
            disk_manifest_matches_memfd=run.disk_manifest_matches_memfd)
        with ctx.timed("comparing with the manifest"):
            report = compare_manifest(run.manifest, observation)
        _hold_for_owners(ctx)
        verdict = Phase.VERIFIED if report.ok else Phase.FAILED
        # The full report can hold 40k items: it gets its own file, written once; the state
        # (rewritten on every transition) keeps a summary and the failures.
        full = ctx.store.last_verify_path
        summary = _summary(report, full)
        try:
            # the boot id on top: a restart that lost state.json can tell this boot was
            # verified (phase.py reads it) and does not verify into a false failure
            with ctx.timed("writing the verification report"):
                write_atomic(full, json.dumps({"boot_id": run.info.boot_id,
                                               **report.to_json()}).encode() + b"\n")
        except (AgentError, OSError) as exc:
            summary["report"] = None
            summary["report_problem"] = getattr(exc, "message", None) or str(exc)
        # not strict: the sessions are retrieved and held; the verdict stands in memory
        ctx.transition(verdict, "verified: every preserved item came back" if report.ok
                       else "verification found problems", strict=False,
                       last_result=summary)
        _record(ctx, run, report, summary)
        return report
    finally:
        _end_verify(ctx, run)


def verify_abandon(ctx: EngineContext, run: VerifyRun, reason: str) -> None:
    """Step 2 failed: the verdict is "failed", the retrieved sessions stay their owners'."""
    try:
        _hold_for_owners(ctx)
        _verify_failed(ctx, AgentError(reason))
    finally:
        _end_verify(ctx, run)


def _hold_for_owners(ctx: EngineContext) -> None:
    """The incoming sessions nobody claimed yet wait for their owners (the grace period)."""
    grace = ctx.config.claim_grace_seconds
    ctx.claim_deadline = (time.monotonic() + grace
                          if grace is not None and ctx.incoming else None)
    ctx.state.awaiting = sorted(ctx.incoming)


def _end_verify(ctx: EngineContext, run: VerifyRun) -> None:
    """Idempotent: the run's fds closed, other operations may start."""
    run.close()
    if ctx.verifying is run:
        ctx.verifying = None
        ctx.lock.release()


def _session_manifest(ctx: EngineContext, device: LiveUpdateDevice | None,
                      device_problem: str | None) -> tuple[Manifest | None, str | None]:
    """The manifest the agent put in its own session before the kexec (and FINISH that
    session), or None and why not."""
    if device is None and AGENT_SESSION not in ctx.stored_sessions:
        return None, None
    try:
        agent = _incoming_session(ctx, device, AGENT_SESSION, device_problem)
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


def _incoming_session(ctx: EngineContext, device: LiveUpdateDevice | None, name: str,
                      device_problem: str | None) -> LiveUpdateSession:
    """An incoming session: the fd the store handed back (fdstore), else RETRIEVE_SESSION."""
    fd = ctx.stored_sessions.pop(name, None)
    if fd is not None:
        session = ctx.host.liveupdate.adopt_session(fd, name)
        # held by the agent now; a copy left in the store would keep a finished session
        # open until the service stops
        ctx.unpark_quietly(name)
        return session
    if device is None:
        raise NotFound(f"session {name!r:.80}: {device_problem or '/dev/liveupdate is closed'}")
    return device.retrieve_session(name)


def retrieve_session(ctx: EngineContext, device: LiveUpdateDevice | None, entry: SessionEntry,
                     device_problem: str | None, run: VerifyRun) -> ObservedSession:
    """One incoming session retrieved and kept for its owner; its files' sizes and seals
    read, and an fd of each file with a digest kept in `run` for step 2."""
    try:
        session = _incoming_session(ctx, device, entry.name, device_problem)
    except AgentError as exc:
        return ObservedSession(entry.name, None, exc.message)
    ctx.incoming[entry.name] = session  # closing would finish it: keep it for its owner
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
            files.append(ObservedFile(f.token, size, None, seals(fd), None))
            if f.digest is not None and f.digest_alg is not None:  # both or neither (codec)
                run.pending.append(PendingDigest(len(run.sessions), len(files) - 1, fd, size,
                                                 f.digest_alg))
                unwind.pop_all()
    return ObservedSession(entry.name, files, None)


def _record(ctx: EngineContext, run: VerifyRun, report: VerifyReport,
            summary: dict[str, Any]) -> None:
    """The attempt ends in the history. The blackout ends when this agent started handing the
    sessions back (retrieval began): the wall clock of then, from the monotonic one."""
    resumed_at = time.time() - (time.perf_counter() - run.started) if run.started else None
    counts = ", ".join(f"{n} {verdict}" for verdict, n in sorted(summary["counts"].items()))
    error = None
    if not report.ok:
        first = "; ".join(f"{f['kind']} {f['name']}: {f['verdict']}"
                          for f in summary["failures"][:3])
        error = VerificationFailed(f"{summary['failures_total']} item(s) failed: {first}")
    attempts.end(ctx, history.Verdict.VERIFIED if report.ok
                 else history.Verdict.VERIFICATION_FAILED, error=error, manifest=run.manifest,
                 resumed_at=resumed_at, detail=counts or None)


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
