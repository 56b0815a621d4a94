"""Starting: the persisted state reconciled with this boot, after a restart of the agent, a
crash, or a kexec.

A restart in the boot of a prepare finds its session fds gone with the old process: the update
is cancelled, and said so. A start after a kexec leaves verification pending. A state that is
lost or corrupt is never guessed at: the phase is what can be proved (the verification record,
the manifest of this boot, the incoming KHO state).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ..errors import AgentError, KernelRefused, StateCorrupt
from . import attempts, history
from .context import EngineContext
from .manifest import read_manifest
from .phase import Phase
from .verify import MAX_FAILURES_IN_STATE


@dataclass
class RecoveryResult:
    phase: Phase
    message: str
    verify_pending: bool
    # the previous agent process ended in the middle of something (prepared, verifying, holding
    # retrieved sessions) or the state was lost, unsaved or in the way: what the operator must
    # look at. A start after a kexec with verification pending is the normal path, not this.
    disrupted: bool = False
    boot_id: str = ""  # this boot's, as start read it (set by start(), for the daemon's use)


def start(ctx: EngineContext) -> RecoveryResult:
    """Load the persisted state and reconcile it with this boot (call once at start).

    Whatever is found in the state directory, this returns: a state that cannot be saved
    (a full disk, a read-only directory, a corrupt state file that cannot be moved aside)
    is reported in the state's message, and the agent runs on with it in memory, so that
    the daemon comes up and says so instead of failing in a restart loop."""
    boot = ctx.boot_id()
    with ctx.store.deferring_errors() as unsaved:
        result = _start(ctx, boot)
        if ctx.stored_sessions and not result.verify_pending:
            ctx.release_stored("the fd store handed back session fds but there is "
                               "nothing to verify them against")
    if unsaved:
        result = _unsaved_at_start(ctx, result, unsaved[-1])
    return replace(result, boot_id=boot)


def _disrupted(result: RecoveryResult) -> RecoveryResult:
    return RecoveryResult(result.phase, result.message, result.verify_pending, True)


def _start(ctx: EngineContext, boot: str) -> RecoveryResult:
    loaded = ctx.store.load_or_set_aside()
    ctx.state = loaded.state
    incoming = ctx.incoming_present()
    same_boot = loaded.found and ctx.state.boot_id == boot
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
            record = ctx.store.read_last_verify(only_for_boot=boot if intact else None)
        except StateCorrupt as exc:
            record_problem = exc.message
        else:
            if record is not None and record.boot_id == boot:
                verified_here = (record.ok, record.summary(MAX_FAILURES_IN_STATE),
                                 str(record.path))
    notes = [aside.describe() for aside in ctx.store.clear_obstacles()]
    if loaded.corrupt is not None or not loaded.found:
        corrupt = loaded.corrupt.describe() if loaded.corrupt is not None else None
        return _recover_lost_state(ctx, boot, corrupt, notes, incoming, verified_here,
                                   record_problem)
    if verified_here is not None:  # the state was not saved after that verification
        return _disrupted(_adopt_verification(ctx, verified_here, notes))
    phase = ctx.state.phase
    if same_boot and ctx.stored_sessions:
        ctx.release_stored("the fd store handed back session fds in the boot they were "
                           "parked in (the previous agent process stopped after "
                           "parking them)")
    disrupted = bool(notes)
    if same_boot and ctx.state.awaiting:
        _lost_awaiting(ctx)
        disrupted = True
    result: RecoveryResult | None = None
    if phase in (Phase.PREPARING, Phase.PREPARED, Phase.COMMITTING, Phase.CANCELLING):
        if same_boot:
            result = _restarted_before_kexec(ctx, phase)
        elif phase in (Phase.PREPARED, Phase.COMMITTING):
            result = RecoveryResult(phase, "rebooted since the last state was written: "
                                    "verification is pending", True)
        else:
            disrupted = True
            ctx.transition(Phase.FAILED, f"the host rebooted while {phase.value}; "
                           "nothing was committed", last_result={
                               "result": "failed", "reason": f"rebooted {phase.value}"})
            attempts.end(ctx, history.Verdict.INTERRUPTED,
                         message=f"the host rebooted while {phase.value}")
    elif phase is Phase.VERIFYING:
        disrupted = True
        ctx.transition(Phase.FAILED, "verification was interrupted (the agent stopped "
                       "while verifying); sessions it had retrieved were finished when it "
                       "exited", last_result={"result": "failed",
                                              "reason": "verification interrupted"})
        attempts.end(ctx, history.Verdict.INTERRUPTED,
                     message="verification was interrupted (the agent stopped)")
    if result is None:
        result = RecoveryResult(ctx.state.phase, ctx.state.message,
                                not same_boot and incoming)
    if notes:  # in memory only: a save here would stamp an earlier boot's state as ours
        ctx.state.message = "; ".join([ctx.state.message, *notes])
        result = RecoveryResult(result.phase, "; ".join([result.message, *notes]),
                                result.verify_pending)
    return _disrupted(result) if disrupted or result.disrupted else result


def _lost_awaiting(ctx: EngineContext) -> None:
    """The previous agent process of this boot held retrieved sessions for their owners and
    stopped before they claimed them: closing them finished them in the kernel."""
    lost = ctx.state.awaiting
    note = (f"the agent stopped while {len(lost)} retrieved session(s) waited for their "
            f"owners; they were finished when it stopped and their memory is lost: "
            f"{', '.join(lost)}")
    result = dict(ctx.state.last_result or {})
    result["lost_after_verify"] = lost
    ctx.transition(ctx.state.phase, note, awaiting=[],
                   discarded=sorted(set(ctx.state.discarded) | set(lost)),
                   last_result=result)


def _restarted_before_kexec(ctx: EngineContext, phase: Phase) -> RecoveryResult:
    notes = [f"the agent restarted while {phase.value}, before any kexec: its session fds "
             "closed with the old process, so nothing is preserved any more"]
    if ctx.state.loaded_by_us and ctx.host.kexec.loaded():
        try:
            ctx.host.kexec.unload()
            notes.append("the loaded kernel was unloaded")
        except KernelRefused as exc:
            notes.append(f"unloading the kernel failed: {exc.message}")
    ctx.remove_manifest(notes)
    message = "; ".join(notes) + ". Run prepare again."
    ctx.transition(Phase.IDLE, message, loaded_by_us=False, target=None,
                   last_result={"result": "cancelled", "reason": message})
    attempts.end(ctx, history.Verdict.CANCELLED, message=message)
    return RecoveryResult(Phase.IDLE, message, False, True)


# --- start without a state to go by (issue 11) ---------------------------------------------------

def _prepared_in(ctx: EngineContext, boot: str) -> bool:
    """A manifest written in this boot: an update was prepared in it (cancel, a failed prepare
    and a restart before the kexec all remove the manifest; after a kexec it names the boot
    before). Absent or unreadable proves nothing."""
    try:
        return read_manifest(ctx.store.manifest_path).boot_id_from == boot
    except AgentError:
        return False


def _adopt_verification(ctx: EngineContext, verified: tuple[bool, dict[str, Any], str],
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
    ctx.transition(phase, message, last_result=summary, awaiting=[])
    attempts.end(ctx, history.Verdict.VERIFIED if ok else history.Verdict.VERIFICATION_FAILED,
                 message=None if ok else f"{summary['failures_total']} item(s) failed",
                 detail="recorded at a restart: the verification's own record")
    return RecoveryResult(phase, message, False)


def _recover_lost_state(ctx: EngineContext, boot: str, corrupt: str | None, notes: list[str],
                        incoming: bool, verified: tuple[bool, dict[str, Any], str] | None,
                        record_problem: str | None) -> RecoveryResult:
    """No state to go by: the state file was corrupt (`corrupt` says what, and where it was
    kept) or absent. The phase is what can be proved, never read from the lost file: IDLE
    unless the verification record shows this boot verified. Nothing acts as prepared: the
    session fds of any update the lost state recorded closed with the process that held them."""
    lost = f"the state file was corrupt: {corrupt}" if corrupt else "there was no state file"
    # Session fds that systemd's fd store handed back come only to the first start after the
    # kexec (verification takes them out of the store): with them, this boot is not verified.
    first_after_kexec = incoming and bool(ctx.stored_sessions)
    if _prepared_in(ctx, boot):
        # as a restart with the state intact would: the kernel that prepare loaded goes too
        ctx.state.loaded_by_us = True
        result = _restarted_before_kexec(ctx, Phase.PREPARED)
        message = "; ".join([lost, *notes, result.message])
        ctx.transition(Phase.IDLE, message)
        return RecoveryResult(Phase.IDLE, message, False, True)
    if verified is not None:
        return _disrupted(_adopt_verification(ctx, verified, [lost, *notes]))
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
        if ctx.host.kexec.loaded():
            parts.append("a kernel is loaded for kexec: if that prepare loaded it, nothing is "
                         "preserved for it any more; run prepare again, or unload it "
                         "(kexec -u)")
    message = "; ".join(parts)
    ctx.transition(Phase.IDLE, message)
    return RecoveryResult(Phase.IDLE, message, verify, parts[0] != "started")


def _unsaved_at_start(ctx: EngineContext, result: RecoveryResult,
                      problem: str) -> RecoveryResult:
    """The state could not be saved while starting: the agent runs on with it in memory and
    says so. Prepare and verify save before they act, so they refuse until it can be saved; a
    pending verification is left for the operator."""
    ctx.persist_problem = problem
    if ctx.store.stuck is not None:
        note = ("nothing is saved until the corrupt state file can be moved aside: prepare and "
                "verify are refused until then")
    else:
        note = (f"the state could not be saved ({problem}): until it can, prepare and verify "
                "are refused")
    if result.verify_pending:
        note += ("; the pending verification did not start: run `kho-agentctl verify` once "
                 "the state can be saved")
    ctx.state.message = f"{ctx.state.message}; {note}"
    return RecoveryResult(ctx.state.phase, f"{result.message}; {note}", False, True)
