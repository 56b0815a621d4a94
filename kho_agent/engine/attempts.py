"""The history's hooks in the phase transitions (history.py holds the records and the file).

Each function records one step of an attempt: prepare done or failed, a commit refused (counted
on the prepared update's record), the end (verified, verification failed, cancelled,
interrupted). Only what was attempted is recorded: a commit or a cancel with no update to act
on leaves the history as it was, so no caller can push real updates out of the bounded
history. Nothing is written inside the commit's blackout: the time of the kexec is in the state
(`committed_at`), and the attempt takes it, with the blackout, when it ends after the kexec. A
history that cannot be written never fails the operation it records: the problem is kept in
`ctx.history_problem` and the operation goes on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import AgentError, SystemCallFailed
from .history import Attempt, Kind, Verdict, current, ended, new_id, now_iso
from .phase import Phase

if TYPE_CHECKING:
    from .context import EngineContext
    from .manifest import Manifest


def _write(ctx: EngineContext, attempt: Attempt) -> None:
    try:
        ctx.history.record(attempt)
    except AgentError as exc:
        ctx.history_problem = exc.message
    else:
        ctx.history_problem = None


def _open(ctx: EngineContext) -> Attempt | None:
    return current(ctx.history.read().entries)


def _carried(manifest: Manifest) -> dict[str, Any]:
    files = [f for s in manifest.sessions for f in s.files]
    return {"sessions": len(manifest.sessions), "files": len(files),
            "bytes": sum(f.size for f in files),
            "liveupdate_number": manifest.liveupdate_number_expected}


def running_image(params: dict[str, str | None]) -> str | None:
    return params.get("BOOT_IMAGE")


def prepared(ctx: EngineContext, started: str, kernel: str, manifest: Manifest) -> None:
    """A prepare succeeded: a new open attempt. An attempt still open from before (a restart
    the history did not see end) is closed as interrupted first."""
    stale = _open(ctx)
    if stale is not None:
        _write(ctx, ended(stale, Verdict.INTERRUPTED,
                          message="superseded by a new prepare; how it ended was not recorded"))
    info = ctx.sysinfo()
    _write(ctx, Attempt(id=new_id(), kind=Kind.UPDATE.value, started=started,
                        verdict=Verdict.PREPARED.value, release_from=info.release,
                        release_to=manifest.release_to or None,
                        kernel_from=running_image(info.params), kernel_to=kernel,
                        **_carried(manifest)))


def prepare_failed(ctx: EngineContext, started: str, kernel: str, error: AgentError) -> None:
    info = ctx.sysinfo()
    verdict = Verdict.CANCELLED if error.name == "Cancelled" else Verdict.PREPARE_FAILED
    _write(ctx, ended(Attempt(id=new_id(), kind=Kind.UPDATE.value, started=started,
                              verdict=verdict.value, release_from=info.release,
                              kernel_from=running_image(info.params), kernel_to=kernel),
                      verdict, error=error))


def commit_refused(ctx: EngineContext, error: AgentError) -> None:
    """A commit that did not happen (refused, or the kexec failed) while an update is prepared
    belongs to that update: it is counted on the update's record, with the last one's time and
    error, and the update stays open. With nothing prepared (NotPrepared, a Busy agent while
    another operation runs) nothing was attempted and nothing is recorded."""
    if ctx.state.phase is not Phase.PREPARED:
        return
    update = _open(ctx)
    if update is None:  # the history was lost, or started after the prepare
        if ctx.prepared is None:
            return
        update = _unseen(ctx, Verdict.PREPARED, ctx.prepared)
    failed = isinstance(error, SystemCallFailed)
    _write(ctx, replace(
        update,
        commits_refused=update.commits_refused if failed else (update.commits_refused or 0) + 1,
        commits_failed=(update.commits_failed or 0) + 1 if failed else update.commits_failed,
        last_commit_error_at=now_iso(), last_commit_error_name=error.name,
        last_commit_error_message=error.message))


def cancelled(ctx: EngineContext, message: str, *, was_failed: bool) -> None:
    """cancel ended the update. From the failed state the attempt ended when it failed: the
    cancel only clears the state and records nothing, unless an attempt is still open (its
    end was not recorded), which ends cancelled."""
    if was_failed and _open(ctx) is None:
        return
    end(ctx, Verdict.CANCELLED, message=message)


def _unseen(ctx: EngineContext, verdict: Verdict, manifest: Manifest | None) -> Attempt:
    """An attempt the history did not see start, from what is known (the manifest)."""
    info = ctx.sysinfo()
    update = Attempt(id=new_id(), kind=Kind.UPDATE.value,
                     started=manifest.created if manifest else now_iso(),
                     verdict=verdict.value,
                     release_from=manifest.release_from if manifest else info.release,
                     release_to=manifest.release_to if manifest else None,
                     detail="the history did not see this attempt start")
    return replace(update, **_carried(manifest)) if manifest is not None else update


def end(ctx: EngineContext, verdict: Verdict, *, error: AgentError | None = None,
        message: str | None = None, manifest: Manifest | None = None,
        resumed_at: float | None = None, detail: str | None = None) -> None:
    """The open attempt ends. Without one (the history was lost, or started after the
    prepare), the attempt is recorded from what is known (the manifest, after a kexec)."""
    update = _open(ctx)
    if update is None:
        if manifest is None and verdict is not Verdict.CANCELLED:
            return  # nothing was attempted that the history could name
        update = _unseen(ctx, verdict, manifest)
    changes: dict[str, Any] = {}
    if detail is not None:
        changes["detail"] = detail
    committed_at = ctx.state.committed_at
    if committed_at is not None and update.committed_at is None:
        changes["committed_at"] = committed_at
        changes["handoff_seconds"] = ctx.state.handoff_seconds
        if resumed_at is not None:
            changes["blackout_seconds"] = max(0.0, resumed_at - committed_at)
    _write(ctx, ended(update, verdict, error=error, message=message, **changes))
