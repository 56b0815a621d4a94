"""The engine on the simulated kernel: the whole cycle and every failure path."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import time
from pathlib import Path

import blake3
import pytest
from cliout import cli_json
from enginerig import Rig

from kho_agent.cli import main as cli_main
from kho_agent.engine import CommitOptions, Engine, PrepareOptions
from kho_agent.engine import prepare as prepare_mod
from kho_agent.engine import sessions as sessions_mod
from kho_agent.engine.phase import Phase
from kho_agent.engine.preflight import Check, Tier
from kho_agent.errors import (
    AgentError,
    Busy,
    Cancelled,
    InvalidArgument,
    KernelRefused,
    NotFound,
    NotPrepared,
    PreflightFailed,
    StorageFailed,
)
from kho_agent.kernel import atomicfile
from kho_agent.rehearsal import client_plans, rehearse
from kho_agent.sim import SimAbi, SimKernel

PAGE = 4096


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path)


def test_rehearsal_cycle_keeps_every_byte(tmp_path: Path) -> None:
    result = rehearse(tmp_path, sessions=2)
    assert result.ok, [(s.name, s.detail) for s in result.steps]
    assert [s.name for s in result.steps] == ["boot", "sessions", "preflight", "prepare",
                                              "commit", "reboot", "verify", "clients"]
    assert result.report is not None and result.report.ok
    kinds = {i.kind for i in result.report.items}
    assert {"session", "file"} <= kinds
    # every byte of every client file was read back: one page + a 3.5-page sparse file + text
    plans = client_plans(2)
    assert result.bytes_checked == sum(len(f.content) for p in plans for f in p.files)
    assert all(p.files[1].size == PAGE * 3 + PAGE // 2 for p in plans)
    assert result.handoff_seconds is not None and result.handoff_seconds > 0


def test_a_dry_run_commit_refuses_when_the_kernel_is_no_longer_loaded(rig: Rig) -> None:
    """The dry run holds every check the commit makes before its blackout: its "would go
    ahead" is what the CLI announces a reboot on."""
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.sim.host().kexec.unload()          # kexec -u by someone else
    with pytest.raises(NotPrepared, match="no longer loaded"):
        rig.agent.commit(CommitOptions(dry_run=True))
    assert rig.state()["phase"] == "prepared"


def test_a_target_that_is_not_a_kernel_is_invalid_not_a_policy_refusal(rig: Rig,
                                                                        tmp_path: Path) -> None:
    """prepare in this process (the rehearsal, tests) as through the daemon: a broken input is
    InvalidArgument (exit 2), not PreflightFailed (3); the state stays as it was."""
    broken = tmp_path / "vmlinuz-broken"
    broken.write_bytes(b"not a kernel image" * 64)
    for attempt in (lambda: rig.agent.prepare(PrepareOptions(kernel=broken)),
                    lambda: rig.agent.plan_prepare(PrepareOptions(kernel=broken)),
                    lambda: rig.agent.gather_preflight(broken, None)):
        with pytest.raises(InvalidArgument, match=str(broken)):
            attempt()
    assert rig.state()["phase"] == "idle"


def test_verify_proves_the_live_update(rig: Rig) -> None:
    rig.client("vm-a", {1: b"alpha" * 1000, 2: b"beta"})
    before = rig.sim.boot_id
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    agent = rig.reboot_view()
    assert rig.sim.boot_id != before
    report = agent.verify()
    assert report.ok, [(i.kind, i.name, i.detail) for i in report.items if i.verdict.value != "ok"]
    state = rig.state()
    assert state["phase"] == "verified"
    session = agent.claim_session("vm-a")
    fd = session.retrieve_fd(1)
    assert os.pread(fd, 5000, 0) == b"alpha" * 1000
    os.close(fd)
    session.finish()
    session.close()
    agent.close()



def test_verify_reports_where_its_time_goes(rig: Rig) -> None:
    """After a kexec the VM managers wait on verify: each of its steps is reported with its
    duration (the daemon logs them), in the order they ran, and together they are the verify."""
    rig.client("vm-a", {1: b"alpha" * 1000})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    agent = rig.reboot_view()
    steps: list[tuple[str, float]] = []
    agent._ctx.on_step_timed = lambda step, seconds: steps.append((step, seconds))
    start = time.perf_counter()
    assert agent.verify().ok
    elapsed = time.perf_counter() - start
    assert [name for name, _ in steps] == [
        "reading the manifest on disk, recording the state",
        "reading the manifest from the agent's session",
        "retrieving 1 session(s), reading their files' sizes",
        "digests of 1 file(s), 5000 bytes",
        "decoding the incoming and outgoing KHO state",
        "reading the network",
        "reading the running kernel's ABI",
        "comparing with the manifest",
        "writing the verification report"]
    assert all(seconds >= 0 for _, seconds in steps)
    assert sum(seconds for _, seconds in steps) <= elapsed
    agent.close()

def test_prepare_refuses_an_incompatible_target(tmp_path: Path) -> None:
    rig = Rig(tmp_path, target_abi=SimAbi(kho="kho-v3", luo="luo-v1", memfd="memfd-v1"))
    with pytest.raises(PreflightFailed) as exc:
        rig.agent.prepare(PrepareOptions(kernel=rig.target))
    assert "target-abi" in exc.value.message and exc.value.exit_code == 3
    assert not rig.sim.host().kexec.loaded()
    assert rig.state()["phase"] == "idle"
    assert not rig.config.state_dir.joinpath("manifest.json").exists()


def test_commit_needs_prepare_and_ready_clients(rig: Rig) -> None:
    with pytest.raises(NotPrepared):
        rig.agent.commit(CommitOptions())
    rig.client("vm-slow", {1: b"x"}, ready=False)
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    with pytest.raises(Busy, match="vm-slow"):
        rig.agent.commit(CommitOptions())
    dry = rig.agent.commit(CommitOptions(force=True, dry_run=True))
    assert dry.dry_run and rig.state()["phase"] == "prepared"
    rig.agent.commit(CommitOptions(force=True))
    report = rig.reboot_view().verify()
    assert report.ok


def test_duplicate_session_name_never_reaches_the_kernel(rig: Rig) -> None:
    rig.client("vm-a", {1: b"x"})
    with pytest.raises(Busy, match="already exists"):
        rig.agent.create_session("vm-a", "someone else")
    assert rig.agent._ctx.commit_blocker is None


def test_restart_after_prepare_reports_cancelled_and_unloads(rig: Rig) -> None:
    rig.client("vm-a", {1: b"x"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    assert rig.sim.host().kexec.loaded()
    rig.agent.close()  # the process dies: its fds close, the kernel drops the sessions
    agent = rig.new_agent()
    assert agent.state.phase is Phase.IDLE
    assert "nothing is preserved" in agent.state.message
    assert not rig.sim.host().kexec.loaded()
    assert rig.state()["last_result"] == {"result": "cancelled", "reason": agent.state.message}


@pytest.mark.parametrize("phase", ["preparing", "committing", "cancelling"])
def test_killed_in_a_transient_phase_in_the_same_boot(rig: Rig, phase: str) -> None:
    rig.agent.close()
    state = rig.state()
    state["phase"] = phase
    (rig.config.state_dir / "state.json").write_text(json.dumps(state))
    agent = rig.new_agent()
    assert agent.state.phase is Phase.IDLE and phase in agent.state.message


def test_killed_while_verifying_is_failed_not_verified(rig: Rig) -> None:
    rig.client("vm-a", {1: b"x"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    agent = rig.reboot_view()
    agent.close()
    state = rig.state()
    state["phase"] = "verifying"
    (rig.config.state_dir / "state.json").write_text(json.dumps(state))
    again = rig.new_agent()
    assert again.state.phase is Phase.FAILED and "interrupted" in again.state.message


def test_corrupt_state_file_is_kept_aside(rig: Rig) -> None:
    rig.agent.close()
    (rig.config.state_dir / "state.json").write_text("{not json")
    agent = rig.new_agent()
    assert agent.state.phase is Phase.IDLE
    assert list(rig.config.state_dir.glob("state.json.corrupt-*"))


def test_cancel_releases_everything(rig: Rig) -> None:
    rig.client("vm-a", {1: b"x"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    message = rig.agent.cancel()
    assert "unloaded" in message and not rig.sim.host().kexec.loaded()
    assert not rig.config.state_dir.joinpath("manifest.json").exists()
    # released in the kernel too: the same name and file can be used again
    rig.client("vm-a", {1: b"y"})
    with pytest.raises(NotPrepared):
        rig.agent.commit(CommitOptions())


def test_freeze_failure_keeps_everything_prepared(rig: Rig) -> None:
    rig.client("vm-a", {1: b"x" * PAGE})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.sim.inject("freeze-fails")
    with pytest.raises(KernelRefused) as exc:
        rig.agent.commit(CommitOptions())
    assert exc.value.errno == errno.EINVAL
    assert rig.state()["phase"] == "prepared"
    rig.sim.clear_faults()
    rig.agent.commit(CommitOptions())
    assert rig.reboot_view().verify().ok


def test_disk_full_while_writing_the_manifest(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.client("vm-a", {1: b"x"})
    real_fsync = os.fsync

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomicfile.os, "fsync", full)
    with pytest.raises(AgentError) as exc:
        rig.agent.prepare(PrepareOptions(kernel=rig.target))
    monkeypatch.setattr(atomicfile.os, "fsync", real_fsync)
    assert "ENOSPC" in exc.value.message or "No space" in exc.value.message
    # the agent's own disk, not the kernel: StorageFailed, exit 2, the errno kept
    assert type(exc.value) is StorageFailed and exc.value.errno == errno.ENOSPC
    assert exc.value.exit_code == 2 and exc.value.to_json()["error"] == "StorageFailed"
    assert not rig.sim.host().kexec.loaded()
    assert rig.agent.state.phase is Phase.IDLE


@pytest.mark.parametrize(("fault", "params", "expect"), [
    ("corrupt-file", {"session": "kho-agent", "token": 0, "offset": 10}, "manifest"),
    ("drop-kho", {}, "session"),
    ("corrupt-handover", {}, "session"),
    ("luo-mismatch", {}, "session"),
])
def test_faults_in_the_handover_fail_verification(rig: Rig, fault: str,
                                                  params: dict[str, object],
                                                  expect: str) -> None:
    rig.client("vm-a", {1: b"payload" * 100})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.sim.inject(fault, **params)
    rig.agent.commit(CommitOptions())
    agent = rig.reboot_view()
    report = agent.verify()
    assert not report.ok
    bad = [i for i in report.items if i.verdict.value in ("mismatch", "missing", "failed")]
    assert any(expect in i.kind for i in bad), [(i.kind, i.detail) for i in bad]
    assert rig.state()["phase"] == "failed"


def test_cli_rehearse_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["rehearse", "--dir", str(tmp_path / "r"), "--sessions", "1", "--json"])
    out = cli_json(capsys.readouterr().out)
    assert code == 0 and out["ok"] is True
    assert out["verify"]["ok"] is True


def test_cli_rehearse_incompatible_target_is_refused(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["rehearse", "--dir", str(tmp_path / "r"), "--sessions", "1",
                     "--target-abi", "old"])
    text = capsys.readouterr().out
    assert code == 1 and "FAIL" in text and "prepare" in text


# --- readiness and digests ----------------------------------------------------------------------

def _entry(agent: Engine, name: str) -> list[tuple[int, str | None]]:
    return [(f.token, f.digest) for f in agent._ctx.clients[name].entry("direct").files]


def test_not_ready_voids_digests_and_ready_takes_them_again(rig: Rig) -> None:
    rig.agent.create_session("vm-a", "test", digests=True)
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    try:
        os.write(fd, b"before" * 1000)
        rig.agent.preserve("vm-a", fd, 1)
        rig.agent.set_ready("vm-a", True)
        first = _entry(rig.agent, "vm-a")
        assert first[0][1] == blake3.blake3(b"before" * 1000).hexdigest()
        rig.agent.set_ready("vm-a", False)        # the guest runs again: memory changes
        assert _entry(rig.agent, "vm-a") == [(1, None)]
        os.pwrite(fd, b"after!" * 1000, 0)
        rig.agent.set_ready("vm-a", True)
        assert _entry(rig.agent, "vm-a") == [(1, blake3.blake3(b"after!" * 1000).hexdigest())]
    finally:
        os.close(fd)
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    report = rig.reboot_view().verify()
    assert report.ok
    digest = [i for i in report.items if i.kind == "file-digest"]
    assert [(i.name, i.verdict.value) for i in digest] == [("vm-a/1", "ok")]


def test_no_fd_left_for_the_agent_preserves_nothing(rig: Rig,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    rig.agent.create_session("vm-a", "test")
    fd = os.memfd_create("m", os.MFD_CLOEXEC)
    os.write(fd, b"x")
    real = sessions_mod.fcntl.fcntl

    def no_fds(f: int, cmd: int, arg: int = 0) -> int:
        if cmd == fcntl.F_DUPFD_CLOEXEC:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real(f, cmd, arg)

    monkeypatch.setattr(sessions_mod.fcntl, "fcntl", no_fds)
    with pytest.raises(KernelRefused, match="LimitNOFILE") as exc:
        rig.agent.preserve("vm-a", fd, 1)
    assert exc.value.errno == errno.EMFILE
    monkeypatch.setattr(sessions_mod.fcntl, "fcntl", real)
    assert rig.agent._ctx.clients["vm-a"].files == {}
    rig.agent.preserve("vm-a", fd, 1)  # the kernel did not keep it: no EBUSY, no EEXIST
    os.close(fd)
    assert list(rig.agent._ctx.clients["vm-a"].files) == [1]


# --- after the reboot: claiming, grace period ----------------------------------------------------

def test_unclaimed_sessions_are_finished_after_the_grace_period(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.config.claim_grace_seconds = 60.0
    rig.client("vm-a", {1: b"a"})
    rig.client("vm-b", {1: b"b"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    agent = rig.reboot_view()
    assert agent.verify().ok
    assert agent.claim_deadline is not None
    start = agent.claim_deadline - 60.0
    claimed = agent.claim_session("vm-a")
    assert agent.finish_expired(start + 59.0) == []   # still inside the grace period
    assert agent.finish_expired(start + 60.0) == ["vm-b"]
    assert rig.state()["discarded"] == ["vm-b"] and "vm-b" in str(rig.state()["message"])
    with pytest.raises(NotFound, match="grace period"):
        agent.claim_session("vm-b")
    claimed.finish()
    claimed.close()
    agent.close()
    dev = SimKernel(tmp_path / "sim").host().liveupdate.open()
    with pytest.raises(KernelRefused) as exc:   # FINISHed in the kernel, not just forgotten
        dev.retrieve_session("vm-b")
    assert exc.value.errno == errno.ENOENT


def test_without_a_grace_period_sessions_wait_for_their_owner(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.config.claim_grace_seconds = None
    rig.client("vm-a", {1: b"a"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    agent = rig.reboot_view()
    assert agent.verify().ok
    assert agent.claim_deadline is None and agent.finish_expired(1e12) == []
    assert agent.claim_session("vm-a").name == "vm-a"


def test_a_state_that_cannot_be_saved_is_added_to_the_error(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.client("vm-a", {1: b"x"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.sim.inject("freeze-fails")
    kexec = rig.agent._ctx.host.kexec
    real_reboot = kexec.reboot

    def reboot_then_disk_full(*, via_systemd: bool) -> None:
        def full(state: object) -> None:
            raise StorageFailed("writing state.json", errno.ENOSPC, "the disk is full")
        monkeypatch.setattr(rig.agent._ctx.store, "save", full)
        real_reboot(via_systemd=via_systemd)

    monkeypatch.setattr(kexec, "reboot", reboot_then_disk_full)
    with pytest.raises(KernelRefused) as exc:
        rig.agent.commit(CommitOptions())
    assert exc.value.errno == errno.EINVAL           # the kernel's refusal stays the error
    assert "could not be saved" in exc.value.message and "disk is full" in exc.value.message
    assert rig.agent.persist_problem is not None
    assert rig.state()["phase"] == "committing"      # what a restart would find


def test_the_error_being_raised_is_not_changed_when_the_state_cannot_be_saved(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rollback's note goes on a copy of the error (same class, errno and advice), not
    onto the exception already on its way out; with the state saved, the error is the same."""
    ctx = rig.agent._ctx
    cause = KernelRefused("kexec_file_load", errno.EINVAL, "the image is refused")
    assert ctx.transition_best_effort(cause, ctx.state.phase, "rolled back") is cause

    def full(state: object) -> None:
        raise StorageFailed("writing state.json", errno.ENOSPC, "the disk is full")
    monkeypatch.setattr(ctx.store, "save", full)
    raised = ctx.transition_best_effort(cause, ctx.state.phase, "rolled back")
    assert raised is not cause and type(raised) is KernelRefused
    assert (raised.op, raised.errno, raised.advice) == (cause.op, cause.errno, cause.advice)
    assert raised.message.startswith(cause.message) and "could not be saved" in raised.message
    assert "could not be saved" not in cause.message and str(cause) == cause.message


def test_a_restart_after_verify_reports_unclaimed_sessions_as_lost(rig: Rig) -> None:
    rig.client("vm-a", {1: b"a"})
    rig.client("vm-b", {1: b"b"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    agent = rig.reboot_view()
    assert agent.verify().ok
    assert rig.state()["awaiting"] == ["vm-a", "vm-b"]
    claimed = agent.claim_session("vm-a")
    assert rig.state()["awaiting"] == ["vm-b"]
    claimed.finish()
    claimed.close()
    agent.close()            # the agent stops: vm-b closes with it
    again = rig.new_agent()
    assert again.state.phase is Phase.VERIFIED   # the update itself was verified
    assert "vm-b" in again.state.message and "lost" in again.state.message
    assert rig.state()["discarded"] == ["vm-b"] and rig.state()["awaiting"] == []
    result = rig.state()["last_result"]
    assert isinstance(result, dict) and result["lost_after_verify"] == ["vm-b"]
    dev = SimKernel(rig.tmp / "sim").host().liveupdate.open()
    with pytest.raises(KernelRefused) as exc:   # and the kernel agrees: finished
        dev.retrieve_session("vm-b")
    assert exc.value.errno == errno.ENOENT


def test_a_second_verify_in_the_same_boot_is_refused_not_failed(rig: Rig) -> None:
    rig.client("vm-a", {1: b"a"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    agent = rig.reboot_view()
    assert agent.verify().ok
    with pytest.raises(NotPrepared, match="verified already"):
        agent.verify()   # its sessions are held for their owners: a rerun would see them busy
    assert rig.state()["phase"] == "verified"


# --- issue 11, class 3: every failure leaves one consistent state ------------------------------

def _disk_full(monkeypatch: pytest.MonkeyPatch, rig: Rig) -> None:
    """The agent's state directory is full (the simulated kernel's own files are not)."""
    real_fsync = os.fsync
    state_dir = str(rig.config.state_dir)

    def full(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").startswith(state_dir):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)
    monkeypatch.setattr(atomicfile.os, "fsync", full)


def _consistent(agent: Engine) -> None:
    """What the engine says equals what it is and holds."""
    phase, message = agent.state.phase, agent.state.message
    for other in Phase:
        if other is not phase and message.startswith(other.value):
            raise AssertionError(f"state {phase.value} with message {message!r}")
    if phase is Phase.IDLE:
        assert agent._ctx.agent_session is None and agent._ctx.plan is None
        assert not agent._ctx.host.kexec.loaded()


def test_a_failed_prepare_on_a_full_disk_changes_nothing(rig: Rig,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    rig.client("vm-a", {1: b"x"})
    before = rig.state()
    _disk_full(monkeypatch, rig)
    with pytest.raises(AgentError, match=r"ENOSPC|No space"):
        rig.agent.prepare(PrepareOptions(kernel=rig.target))
    # the announcement could not be saved: nothing happened, in memory either
    assert rig.agent.state.phase is Phase.IDLE
    assert rig.agent.state.message == before["message"]
    _consistent(rig.agent)
    monkeypatch.undo()
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    assert rig.agent.state.phase is Phase.PREPARED


def test_cancel_on_a_full_disk_ends_idle_and_the_next_prepare_works(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.client("vm-a", {1: b"x"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    _disk_full(monkeypatch, rig)
    message = rig.agent.cancel()
    assert "could not be saved" in message
    assert rig.agent.state.phase is Phase.IDLE and rig.agent._ctx.clients == {}
    assert rig.agent.released_sessions()["vm-a"].startswith("the live update was cancelled")
    _consistent(rig.agent)
    assert rig.state()["phase"] == "prepared"   # the file lags; a restart resolves it
    monkeypatch.undo()
    rig.client("vm-a", {1: b"y"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    assert rig.state()["phase"] == "prepared"


def test_a_cancelled_prepare_rolls_back_and_keeps_the_sessions(rig: Rig) -> None:
    rig.client("vm-a", {1: b"x"})
    steps = []

    def cancelled() -> bool:
        steps.append(rig.sim.host().kexec.loaded())
        return len(steps) == 2       # cancelled after the kernel was loaded
    with pytest.raises(Cancelled):
        rig.agent.prepare(PrepareOptions(kernel=rig.target, cancelled=cancelled))
    assert steps == [False, True]
    assert not rig.sim.host().kexec.loaded()
    assert set(rig.agent._ctx.clients) == {"vm-a"} and rig.agent.released_sessions() == {}
    assert "prepare cancelled" in rig.agent.state.message
    _consistent(rig.agent)
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    assert rig.reboot_view().verify().ok


def test_an_internal_error_in_prepare_still_leaves_one_state(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    rig.client("vm-a", {1: b"x"})

    def bug(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")
    monkeypatch.setattr(prepare_mod, "replace_agent_session", bug)
    with pytest.raises(ZeroDivisionError):
        rig.agent.prepare(PrepareOptions(kernel=rig.target))
    assert rig.agent.state.phase is Phase.IDLE and "internal error" in rig.agent.state.message
    _consistent(rig.agent)
    monkeypatch.undo()
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    assert rig.agent.state.phase is Phase.PREPARED


def test_a_refused_unload_keeps_the_update_prepared(rig: Rig) -> None:
    rig.client("vm-a", {1: b"x"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    host = rig.agent._ctx.host

    def refuse() -> None:
        raise KernelRefused("kexec_file_load(UNLOAD)", errno.EBUSY, "held")
    real = host.kexec.unload
    host.kexec.unload = refuse  # type: ignore[method-assign]
    with pytest.raises(KernelRefused):
        rig.agent.cancel()
    assert rig.agent.state.phase is Phase.PREPARED and "cancel failed" in rig.agent.state.message
    assert set(rig.agent._ctx.clients) == {"vm-a"}
    host.kexec.unload = real  # type: ignore[method-assign]
    assert "unloaded the kernel" in rig.agent.cancel()
    _consistent(rig.agent)


def test_planning_never_changes_what_prepare_chose(rig: Rig, tmp_path: Path) -> None:
    rig.client("vm-a", {1: b"x"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    other = rig.sim.write_kernel_image(tmp_path / "boot" / "vmlinuz-7.9-sim", release="7.9-sim",
                                       abi=SimAbi())
    rig.agent.gather_preflight(None, None)
    rig.agent.gather_preflight(other, None)
    rig.agent.scratch_plan(other)
    rig.agent.plan_prepare(PrepareOptions(kernel=other))
    rig.agent.commit(CommitOptions())
    agent = rig.reboot_view()
    assert agent.verify().ok
    assert agent.verified_manifest is not None
    assert agent.verified_manifest.release_to == "7.3.1-sim"


# --- scratch through a chain of live updates ----------------------------------------------------
# A 1 GiB machine whose cold boot set 64 MiB scratch areas (lowmem and node 0): its own early
# allocations take 60 MiB (40 MiB kernel, 16 MiB memmap, 4 MiB node data), so every boot of the
# chain fits them. 96 MiB carried over is more than an area: counted as "kernel-reserved", it
# made the next preflight block for the whole boot, even after the session was finished.
CHAIN_CMDLINE = "console=ttyS0 kho=on liveupdate=on kho_scratch=64M,0,64M"
CARRIED = 96 << 20


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _scratch_check(agent: Engine, target: Path, initrd: Path | None = None) -> Check:
    return next(c for c in agent.gather_preflight(target, initrd).checks if c.name == "scratch")


def test_memory_a_live_update_carried_is_not_scratch_the_next_one_needs(tmp_path: Path) -> None:
    rig = Rig(tmp_path, memory_mib=1024, cmdline=CHAIN_CMDLINE)
    rig.agent.create_session("vm-a", "test")
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, CARRIED)          # the kernel preserves every page, holes filled
    os.pwrite(fd, b"guest", 0)
    rig.agent.preserve("vm-a", fd, 1)
    os.close(fd)
    rig.agent.set_ready("vm-a", True)
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    agent = rig.reboot_view()
    assert agent.verify().ok
    session = agent.claim_session("vm-a")
    session.finish()
    session.close()

    check = _scratch_check(agent, rig.target)
    assert check.tier is Tier.OK, check.message
    plan = agent.scratch_plan(rig.target)
    assert plan.kho_boot and plan.kern_source == "memblock"
    assert plan.sufficient and plan.warnings == []
    # what this boot allocated inside the inherited areas, as the next boot will: 60 MiB
    assert plan.kern.total == 60 << 20
    assert plan.preserved_left_out >= CARRIED

    # and the simulated kernel agrees: the next update of the chain boots in the same areas
    agent.prepare(PrepareOptions(kernel=rig.target))
    agent.commit(CommitOptions())
    agent.close()
    after = rig.reboot_view()
    assert rig.sim.boot_count == 3 and after.verify().ok
    after.close()


def test_a_next_kernel_that_outgrows_the_inherited_areas_still_blocks(tmp_path: Path) -> None:
    rig = Rig(tmp_path, memory_mib=1024, cmdline=CHAIN_CMDLINE)
    rig.client("vm-a", {1: b"a"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    agent = rig.reboot_view()
    assert agent.verify().ok
    big = _sparse(tmp_path / "initrd-big", 80 << 20)     # more than any 64 MiB area
    check = _scratch_check(agent, rig.target, big)
    assert check.tier is Tier.BLOCKER
    assert "initrd (80.0 MiB) does not fit" in check.message
    assert "boot cold with kho_scratch=" in check.fix
    with pytest.raises(PreflightFailed, match="EADDRNOTAVAIL"):
        agent.prepare(PrepareOptions(kernel=rig.target, initrd=big))
    agent.close()


def test_the_first_prepare_says_how_far_the_areas_go(tmp_path: Path) -> None:
    """On the cold boot: the areas stay until the next cold boot, so say how large an initrd
    they take, and warn when the next kernel has less room to grow than the margin."""
    rig = Rig(tmp_path, memory_mib=1024, cmdline=CHAIN_CMDLINE)
    check = _scratch_check(rig.agent, rig.target)
    assert check.tier is Tier.OK
    assert ("until the next cold boot they take an initrd of up to 64.0 MiB"
            in check.message)
    tight = _sparse(tmp_path / "initrd-tight", 56 << 20)  # 56 MiB + 25% > 64 MiB
    check = _scratch_check(rig.agent, rig.target, tight)
    assert check.tier is Tier.WARNING
    assert "stay unchanged through every live update until the next cold boot" in \
        check.message
    assert "initrd of at most 64.0 MiB (this one: 56.0 MiB)" in \
        check.message
    assert "kho_scratch=" in check.fix
