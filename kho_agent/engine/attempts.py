"""The history's hooks in the phase transitions (history.py holds the records and the file).

Each function records one step of an attempt: prepare done or failed, a commit refused, the end
(verified, verification failed, cancelled, interrupted). Nothing is written inside the commit's
blackout: the time of the kexec is in the state (`committed_at`), and the attempt takes it, with
the blackout, when it ends after the kexec. A history
that cannot be written never fails the operation it records: the problem is kept in
`ctx.history_problem` and the operation goes on.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from ..errors import AgentError, SystemCallFailed
from .history import Attempt, Kind, Verdict, current, ended, new_id, now_iso

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
    """A commit that did not happen: its own entry; the update it was for stays open."""
    update = _open(ctx)
    info = ctx.sysinfo()
    verdict = (Verdict.COMMIT_FAILED if isinstance(error, SystemCallFailed)
               else Verdict.COMMIT_REFUSED)
    base = Attempt(id=new_id(), kind=Kind.COMMIT.value, started=now_iso(),
                   verdict=verdict.value, release_from=info.release,
                   kernel_from=running_image(info.params))
    if update is not None:
        base = replace(base, release_to=update.release_to, kernel_to=update.kernel_to,
                       sessions=update.sessions, files=update.files, bytes=update.bytes,
                       detail=f"for the update prepared at {update.started}")
    _write(ctx, ended(base, verdict, error=error))


def end(ctx: EngineContext, verdict: Verdict, *, error: AgentError | None = None,
        message: str | None = None, manifest: Manifest | None = None,
        resumed_at: float | None = None, detail: str | None = None) -> None:
    """The open attempt ends. Without one (the history was lost, or started after the
    prepare), the attempt is recorded from what is known (the manifest, after a kexec)."""
    update = _open(ctx)
    if update is None:
        if manifest is None and verdict is not Verdict.CANCELLED:
            return  # nothing was attempted that the history could name
        info = ctx.sysinfo()
        update = Attempt(id=new_id(), kind=Kind.UPDATE.value,
                         started=manifest.created if manifest else now_iso(),
                         verdict=verdict.value,
                         release_from=manifest.release_from if manifest else info.release,
                         release_to=manifest.release_to if manifest else None,
                         detail="the history did not see this attempt start")
        if manifest is not None:
            update = replace(update, **_carried(manifest))
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
