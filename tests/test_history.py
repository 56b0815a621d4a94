"""The history of attempts: the codec on bytes, the bounds, a rewrite that keeps what it cannot
read or does not know, and the engine's hooks through whole cycles on the simulated kernel
(prepare and cancel, prepare-commit-verify across the kexec, a failed prepare, refused commits,
a cancel from the failed state, a restart before the kexec)."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
from enginerig import Rig

from kho_agent.cli.history import row
from kho_agent.engine import CommitOptions, EngineConfig, PrepareOptions
from kho_agent.engine import history as history_module
from kho_agent.engine.history import (
    HISTORY_FILE,
    MAX_LINE_BYTES,
    MAX_TEXT,
    Attempt,
    HistoryLog,
    decode,
    encode,
)
from kho_agent.engine.phase import Phase
from kho_agent.errors import (
    Busy,
    Inhibited,
    KernelRefused,
    NotPrepared,
    PreflightFailed,
    StorageFailed,
)
from kho_agent.sim import SimAbi


def _attempt(n: int, **changes: object) -> Attempt:
    values: dict[str, object] = {"id": f"a{n}", "kind": "update",
                                 "started": "2026-12-04T12:00:00+00:00", "verdict": "verified",
                                 "release_from": "7.2.0"}
    values.update(changes)
    return Attempt(**values)  # type: ignore[arg-type]


# --- the codec ---------------------------------------------------------------------------------

def test_encode_decode_round_trip() -> None:
    attempts = [_attempt(1, sessions=2, files=3, bytes=4096, blackout_seconds=1.5,
                         error_name="Busy", error_message="é \udcff and a NUL \0"),
                _attempt(2, verdict="prepared")]
    read = decode(b"".join(encode(a) for a in attempts))
    assert read.problems == []
    assert read.entries[0].sessions == 2 and read.entries[0].blackout_seconds == 1.5
    # text that could not go out on D-Bus is escaped, not lost
    assert read.entries[0].error_message == "é \\udcff and a NUL \\x00"
    assert read.entries[1] == attempts[1]
    assert read.entries[1].open and not read.entries[0].open


@pytest.mark.parametrize("line, problem", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not UTF-8"),
    (b"[1, 2]", "not an object"),
    (b'{"id": "x", "kind": "update", "started": "t"}', "verdict: required field is missing"),
    (b'{"id": "x", "kind": "update", "started": "t", "verdict": 3}', "verdict: expected a string"),
    (b'{"id": "x", "kind": "update", "started": "t", "verdict": "v", "bytes": -1}',
     "bytes: expected a count"),
    (b'{"id": "x", "kind": "update", "started": "t", "verdict": "v", "bytes": true}',
     "bytes: expected a count"),
    (b'{"id": "x", "kind": "update", "started": "t", "verdict": "v", "blackout_seconds": NaN}',
     "not JSON"),
    (b'{"id": "", "kind": "update", "started": "t", "verdict": "v"}', "id: empty"),
    (b"[" * 100000 + b"]" * 100000, "more than a record holds"),
])
def test_a_bad_line_is_skipped_and_reported(line: bytes, problem: str) -> None:
    good = encode(_attempt(1)) + encode(_attempt(2))
    read = decode(encode(_attempt(1)) + line + b"\n" + encode(_attempt(2)), "h")
    assert [a.id for a in read.entries] == ["a1", "a2"]
    assert len(read.problems) == 1 and read.problems[0].startswith("h line 2 skipped: ")
    assert problem in read.problems[0]
    assert decode(good).problems == []


def test_unknown_members_are_ignored() -> None:
    line = json.dumps({**_attempt(1).to_json(), "from_a_newer_agent": {"x": 1}}).encode()
    assert decode(line).entries == [_attempt(1)]


def test_an_earlier_agents_commit_entry_is_still_read() -> None:
    """Agents before the refusals were counted on the update wrote one entry per refused
    commit; such a file reads as it did, and the open update is still the open one."""
    old = (b'{"id":"u1","kind":"update","started":"2026-12-04T12:00:00+00:00","ended":null,'
           b'"verdict":"prepared","release_from":"7.2.0","sessions":1}\n'
           b'{"id":"c1","kind":"commit","started":"2026-12-04T12:01:00+00:00","ended":'
           b'"2026-12-04T12:01:00+00:00","verdict":"commit refused","release_from":"7.2.0",'
           b'"error_name":"NotPrepared","error_message":"nothing is prepared"}\n')
    read = decode(old)
    assert read.problems == []
    update, commit = read.entries
    assert update.open and update.commits_refused is None
    assert (commit.kind, commit.verdict, commit.error_name) == (
        "commit", "commit refused", "NotPrepared")
    assert history_module.current(read.entries) == update


def test_the_file_stays_bounded_in_bytes(tmp_path: Path) -> None:
    """The byte bound (at least MAX_LINE_BYTES, so a bound below it is that): the newest lines
    that fit it are kept, whole."""
    path = tmp_path / HISTORY_FILE
    log = HistoryLog(path, max_entries=1000, max_bytes=1)
    attempts = [_attempt(n, error_message="x" * MAX_TEXT) for n in range(10, 50)]  # one size
    one = len(encode(attempts[0]))
    for attempt in attempts:
        log.record(attempt)
    fit = MAX_LINE_BYTES // one
    assert 1 < fit < len(attempts)
    assert [a.id for a in log.read().entries] == [f"a{n}" for n in range(50 - fit, 50)]
    assert len(path.read_bytes()) == fit * one <= MAX_LINE_BYTES


def test_the_file_stays_bounded(tmp_path: Path) -> None:
    log = HistoryLog(tmp_path / HISTORY_FILE, max_entries=5)
    for n in range(12):
        log.record(_attempt(n))
    assert [a.id for a in log.read().entries] == ["a7", "a8", "a9", "a10", "a11"]
    log.record(_attempt(9, verdict="cancelled"))  # an update in place
    assert [a.verdict for a in log.read().entries] == ["verified", "verified", "cancelled",
                                                       "verified", "verified"]


@pytest.mark.parametrize("shape", ["directory", "fifo", "huge", "garbage"])
def test_a_file_of_any_shape_is_reported_and_replaced(tmp_path: Path, shape: str) -> None:
    path = tmp_path / HISTORY_FILE
    log = HistoryLog(path, max_bytes=64 << 10)
    if shape == "directory":
        path.mkdir()
    elif shape == "fifo":
        os.mkfifo(path)
    elif shape == "huge":
        path.write_bytes(b"x" * (1 << 20))
    else:
        path.write_bytes(os.urandom(4096).replace(b"\n", b""))
    read = log.read()
    assert read.entries == [] and len(read.problems) == 1
    log.record(_attempt(1))
    assert log.read().entries == [_attempt(1)] and log.read().problems == []
    assert any(p.name.startswith(HISTORY_FILE + ".corrupt-") for p in tmp_path.iterdir())


# --- a rewrite keeps what it cannot read or does not know --------------------------------------

def _newer(n: int, **changes: object) -> bytes:
    """A line as a newer agent may write it: a member this version does not know, its own
    spacing."""
    obj = {**_attempt(n, **changes).to_json(), "from_a_newer_agent": {"x": [1, 2.5, None]}}
    return json.dumps(obj, indent=None, separators=(", ", ": ")).encode()


def test_a_trim_keeps_the_lines_it_keeps_as_they_were(tmp_path: Path) -> None:
    path = tmp_path / HISTORY_FILE
    lines = [_newer(1), _newer(2), _newer(3, verdict="prepared")]
    path.write_bytes(b"\n".join(lines) + b"\n")
    log = HistoryLog(path, max_entries=3)
    log.record(_attempt(4))  # a1 goes (the bound); a2 and a3 stay byte for byte
    assert path.read_bytes() == lines[1] + b"\n" + lines[2] + b"\n" + encode(_attempt(4))
    # the record written keeps the members the line it replaces had
    log.record(_attempt(3, verdict="cancelled"))
    rewritten = json.loads(path.read_bytes().split(b"\n")[1])
    assert rewritten["verdict"] == "cancelled"
    assert rewritten["from_a_newer_agent"] == {"x": [1, 2.5, None]}
    assert path.read_bytes().split(b"\n")[0] == lines[1]
    assert [a.id for a in log.read().entries] == ["a2", "a3", "a4"]


def test_an_unknown_member_that_cannot_be_written_back_is_left_out(tmp_path: Path) -> None:
    path = tmp_path / HISTORY_FILE
    # 1e999 reads as an infinity, which is not JSON: the record is written without it
    path.write_bytes(b'{"id":"a1","kind":"update","started":"2026-12-04T12:00:00+00:00",'
                     b'"verdict":"prepared","release_from":"7.2.0","huge":1e999}\n')
    log = HistoryLog(path)
    log.record(_attempt(1, verdict="cancelled"))
    assert path.read_bytes() == encode(_attempt(1, verdict="cancelled"))


def test_a_file_with_skipped_lines_is_moved_aside_once_before_a_rewrite_leaves_them_out(
        tmp_path: Path) -> None:
    """One way to keep what a rewrite leaves out, the state files' (move_aside): the whole
    file, byte for byte, whatever its skipped lines are (torn, not UTF-8, longer than a
    record)."""
    path = tmp_path / HISTORY_FILE
    notes: list[str] = []
    log = HistoryLog(path, on_note=notes.append)
    torn = b'{"id": "a2", "kind": "upd'
    original = (encode(_attempt(1)) + torn + b"\n" + b"\xff\xfe\n" + encode(_attempt(3))
                + b"{" + b"y" * (MAX_LINE_BYTES + 10) + b"\n")
    path.write_bytes(original)
    log.record(_attempt(4))
    assert path.read_bytes() == encode(_attempt(1)) + encode(_attempt(3)) + encode(_attempt(4))
    assert log.read().problems == []
    (aside,) = tmp_path.glob(HISTORY_FILE + ".corrupt-*")
    assert aside.read_bytes() == original
    (note,) = notes
    assert "3 unreadable line(s)" in note and "line 2, 3, 5" in note and str(aside) in note
    assert "the readable lines are written back" in note
    log.record(_attempt(5))  # moved once: nothing more to keep
    assert list(tmp_path.glob(HISTORY_FILE + ".corrupt*")) == [aside] and len(notes) == 1


def test_skipped_lines_that_cannot_be_moved_aside_stay_in_the_history(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / HISTORY_FILE

    def directory_read_only(target: Path) -> Path:
        raise StorageFailed(f"moving {target} aside", errno.EROFS, "the directory is read-only")
    monkeypatch.setattr(history_module, "move_aside", directory_read_only)
    notes: list[str] = []
    log = HistoryLog(path, max_entries=2, on_note=notes.append)
    path.write_bytes(encode(_attempt(1)) + b"{torn\n" + encode(_attempt(2)))
    log.record(_attempt(3))
    assert path.read_bytes() == b"{torn\n" + encode(_attempt(2)) + encode(_attempt(3))
    read = log.read()
    assert [a.id for a in read.entries] == ["a2", "a3"] and len(read.problems) == 1
    assert "stay in the history" in notes[0] and "read-only" in notes[0]


# --- the engine --------------------------------------------------------------------------------

def _history(rig: Rig) -> list[Attempt]:
    read = HistoryLog(rig.config.state_dir / HISTORY_FILE).read()
    assert read.problems == []
    return read.entries


def test_prepare_then_cancel(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.client("vm-a", {1: b"alpha" * 1000})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    (open_,) = _history(rig)
    assert (open_.verdict, open_.ended, open_.kind) == ("prepared", None, "update")
    assert open_.release_to == "7.3.1-sim" and open_.kernel_to == str(rig.target)
    assert (open_.sessions, open_.files, open_.bytes) == (1, 1, 5000)
    rig.agent.cancel()
    (done,) = _history(rig)
    assert done.id == open_.id and done.verdict == "cancelled" and done.ended is not None
    assert done.error_message is not None and "unloaded the kernel" in done.error_message
    assert rig.agent.history().entries == [done]


def test_a_live_update_is_kept_across_the_kexec(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.client("vm-a", {1: b"alpha" * 1000, 2: b"beta"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    (committed,) = _history(rig)  # not rewritten inside the blackout: the state has the time
    assert committed.verdict == "prepared" and committed.committed_at is None
    assert isinstance(rig.state()["committed_at"], float)
    agent = rig.reboot_view()
    assert agent.verify().ok
    (done,) = _history(rig)
    assert done.id == committed.id and done.verdict == "verified"
    assert (done.sessions, done.files, done.bytes) == (1, 2, 5004)
    assert done.release_from != "" and done.release_to == "7.3.1-sim"
    manifest = json.loads((rig.config.state_dir / "manifest.json").read_text())
    assert done.liveupdate_number == manifest["liveupdate_number_expected"] is not None
    assert done.committed_at == rig.state()["committed_at"]
    assert done.handoff_seconds is not None and done.handoff_seconds > 0
    assert done.blackout_seconds is not None and 0 <= done.blackout_seconds < 600
    assert done.detail is not None and "ok" in done.detail
    assert done.error_name is None
    agent.close()


def test_a_failed_prepare_is_recorded_and_a_commit_of_nothing_is_not(tmp_path: Path) -> None:
    rig = Rig(tmp_path, target_abi=SimAbi(kho="kho-v3", luo="luo-v1", memfd="memfd-v1"))
    with pytest.raises(PreflightFailed):
        rig.agent.prepare(PrepareOptions(kernel=rig.target))
    with pytest.raises(NotPrepared):  # nothing prepared: no attempt
        rig.agent.commit(CommitOptions())
    with pytest.raises(NotPrepared):  # a dry run asks: it is not an attempt
        rig.agent.commit(CommitOptions(dry_run=True))
    (failed,) = _history(rig)
    assert (failed.verdict, failed.error_name) == ("prepare failed", "PreflightFailed")
    assert failed.ended is not None and failed.kernel_to == str(rig.target)



def _commit_while_busy(rig: Rig) -> None:
    """A commit while another operation holds the engine: refused with Busy."""
    rig.agent._ctx.lock.acquire()  # another operation runs
    try:
        with pytest.raises(Busy):
            rig.agent.commit(CommitOptions())
    finally:
        rig.agent._ctx.lock.release()

def test_commits_retried_with_nothing_prepared_leave_the_history_as_it_was(
        tmp_path: Path) -> None:
    """A script retrying `kho-agentctl commit` in a loop must not push the real updates out of
    the bounded history (200 entries): a commit with nothing prepared, or refused Busy while
    nothing is prepared, records nothing."""
    rig = Rig(tmp_path)
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.cancel()
    path = rig.config.state_dir / HISTORY_FILE
    before = path.read_bytes()
    for _ in range(300):
        with pytest.raises(NotPrepared):
            rig.agent.commit(CommitOptions())
    _commit_while_busy(rig)
    assert path.read_bytes() == before
    assert [a.verdict for a in _history(rig)] == ["cancelled"]


def test_refused_commits_are_counted_on_the_prepared_update(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.client("vm-a", {1: b"a"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    for _ in range(4):
        with pytest.raises(Inhibited) as refused:
            rig.agent.commit(CommitOptions(inhibitors=("ops (database migration)",)))
        assert "ops (database migration)" in refused.value.message
    _commit_while_busy(rig)
    assert rig.agent.state.phase.value == "prepared"
    (update,) = _history(rig)  # one attempt, not one entry per refusal
    assert update.verdict == "prepared" and update.ended is None and update.open
    assert (update.commits_refused, update.commits_failed) == (5, None)
    assert update.last_commit_error_name == "Busy"
    assert "another operation is running" in (update.last_commit_error_message or "")
    assert update.last_commit_error_at is not None and update.error_name is None
    table_row = row(update.to_json())
    assert "5 commit(s) refused (last: Busy: another operation" in table_row[-1]
    rig.agent.commit(CommitOptions())
    assert rig.agent.state.phase.value == "committing"
    agent = rig.reboot_view()
    assert agent.verify().ok
    (done,) = _history(rig)  # the count stays with the update that ended
    assert done.verdict == "verified" and done.commits_refused == 5
    assert done.error_name is None
    agent.close()


def test_a_failed_kexec_is_counted_on_the_update(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.client("vm-a", {1: b"x"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.sim.inject("freeze-fails")  # the kexec itself fails: the update stays prepared
    with pytest.raises(KernelRefused):
        rig.agent.commit(CommitOptions())
    assert rig.agent.state.phase is Phase.PREPARED
    (update,) = _history(rig)
    assert update.open and (update.commits_refused, update.commits_failed) == (None, 1)
    assert update.last_commit_error_name == "KernelRefused"


def test_a_refusal_while_prepared_is_recorded_when_the_history_was_lost(
        tmp_path: Path) -> None:
    """The history file went away after the prepare: the refusal still belongs to the update
    that is prepared, recorded from its manifest."""
    rig = Rig(tmp_path)
    rig.client("vm-a", {1: b"a" * 10})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    (rig.config.state_dir / HISTORY_FILE).unlink()
    with pytest.raises(Inhibited):
        rig.agent.commit(CommitOptions(inhibitors=("ops",)))
    (update,) = _history(rig)
    assert update.open and update.commits_refused == 1 and update.bytes == 10
    assert update.detail == "the history did not see this attempt start"


def test_a_cancel_from_the_failed_state_records_no_attempt(tmp_path: Path) -> None:
    """The attempt ended when it failed (here: verification interrupted); the cancel that
    clears the failed state cancelled no attempt, and records none."""
    rig = Rig(tmp_path)
    rig.client("vm-a", {1: b"x"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.commit(CommitOptions())
    rig.reboot_view().close()
    state = rig.state()
    state["phase"] = "verifying"
    (rig.config.state_dir / "state.json").write_text(json.dumps(state))
    agent = rig.new_agent()
    assert agent.state.phase is Phase.FAILED
    (interrupted,) = _history(rig)
    assert interrupted.verdict == "interrupted" and not interrupted.open
    agent.cancel()
    assert agent.state.phase is Phase.IDLE
    assert _history(rig) == [interrupted]
    agent.close()


def test_a_restart_before_the_kexec_ends_the_attempt(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.client("vm-a", {1: b"a"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.close()
    agent = rig.new_agent()  # same boot: the sessions closed with the old process
    (done,) = _history(rig)
    assert done.verdict == "cancelled" and "restarted while prepared" in (done.error_message or "")
    agent.close()


def test_the_bound_comes_from_the_config(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.config = EngineConfig(state_dir=rig.config.state_dir, history_max_entries=3)
    rig.agent = rig.new_agent()
    for _ in range(5):
        rig.agent.prepare(PrepareOptions(kernel=rig.target))
        rig.agent.cancel()
    assert len(_history(rig)) == 3


def test_a_corrupt_history_does_not_stop_the_engine(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    (rig.config.state_dir / HISTORY_FILE).write_bytes(
        encode(_attempt(1)) + b"\x00garbage\n" + encode(_attempt(2, verdict="cancelled")))
    rig.agent = rig.new_agent()
    read = rig.agent.history()
    assert [a.id for a in read.entries] == ["a1", "a2"] and len(read.problems) == 1
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    rig.agent.cancel()
    read = rig.agent.history()
    assert [a.verdict for a in read.entries] == ["verified", "cancelled", "cancelled"]
    assert read.problems == []  # rewritten without the bad line, the file moved aside first
    (aside,) = rig.config.state_dir.glob(HISTORY_FILE + ".corrupt-*")
    assert b"\x00garbage\n" in aside.read_bytes()


def test_a_directory_where_the_history_goes_is_moved_aside(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    (rig.config.state_dir / HISTORY_FILE).mkdir()
    (rig.config.state_dir / HISTORY_FILE / "x").write_text("keeps the directory non-empty")
    rig.client("vm-a", {1: b"a"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))  # moves the directory aside, writes
    assert rig.agent.history().entries[0].verdict == "prepared"


def test_a_history_that_cannot_be_written_does_not_fail_the_update(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The write fails (a read-only state directory, as root sees it: EROFS): the prepare goes
    on, and the history's reader says which write failed and why, errno included."""
    rig = Rig(tmp_path)

    def read_only(path: Path, data: bytes, mode: int = 0o644) -> None:
        raise StorageFailed(f"writing {path}", errno.EROFS, "the state directory is read-only")
    monkeypatch.setattr(history_module, "write_atomic", read_only)
    rig.client("vm-a", {1: b"a"})
    rig.agent.prepare(PrepareOptions(kernel=rig.target))
    assert rig.agent.state.phase is Phase.PREPARED
    problems = rig.agent.history().problems
    assert any("the last history write failed" in p and "EROFS" in p for p in problems), problems
