"""What kho-agentd tells the operator (issue 15, "a CLI that tells the truth"): journal
priorities and sizes, and what a stop while prepared does. A real daemon on a private bus, on the
simulated kernel; the journal records are checked on what EventLog hands to systemd.journal.send.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from agenthost import PAGE, Host, create_session, host, invoke, kernel_option
from dbusrig import MANAGER_IFACE, MANAGER_PATH
from gi.repository import GLib

from kho_agent.errors import (
    Busy,
    InvalidArgument,
    KernelRefused,
    NotFound,
    PreflightFailed,
    StorageFailed,
    VerificationFailed,
)
from kho_agent.service import journal
from kho_agent.service.journal import Event, EventLog
from kho_agent.sim import SimKernel

__all__ = ["host"]  # the fixture, imported for pytest

LONGEST_LINE = journal.MAX_MESSAGE + 100


# --- the records ----------------------------------------------------------------------------------

def test_a_refusal_is_not_logged_as_the_agents_failure() -> None:
    assert journal.failure_priority(InvalidArgument("bad")) == journal.LOG_NOTICE
    assert journal.failure_priority(NotFound("no such session")) == journal.LOG_NOTICE
    assert journal.failure_priority(PreflightFailed("blocked")) == journal.LOG_WARNING
    assert journal.failure_priority(Busy("a job runs")) == journal.LOG_WARNING
    assert journal.failure_priority(KernelRefused("PRESERVE_FD", 16, "close it")) == journal.LOG_ERR
    assert journal.failure_priority(StorageFailed("write", 28, "free space")) == journal.LOG_ERR
    assert journal.failure_priority(VerificationFailed("lost vm-1")) == journal.LOG_ERR


def test_a_record_has_its_priority_a_short_message_and_the_details_in_fields(
        tmp_path: Path) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []
    stream = (tmp_path / "stderr").open("w")
    log = EventLog(send=lambda message, **fields: sent.append((message, fields)),
                   stream=stream, environ={})
    result = json.dumps({"sessions": [f"vm-{i}" for i in range(300)]})
    assert len(result) > 2000
    log.log_event(Event.FAILED, "prepare refused for uid 1000 (:1.7): " + "blocker; " * 300,
                  journal.LOG_WARNING, error="org.khoagent.Agent1.Error.PreflightFailed",
                  job="3", result=result)
    log.log_event(Event.STOPPED_PREPARED, "stopped while prepared", sessions=["vm-1"])
    stream.close()
    (message, fields), (_, stopped) = sent
    assert fields["PRIORITY"] == str(journal.LOG_WARNING)
    assert len(message) <= journal.MAX_MESSAGE and message.endswith("...")
    assert fields["KHO_AGENT_RESULT"] == result and fields["KHO_AGENT_JOB"] == "3"
    assert stopped["PRIORITY"] == str(journal.LOG_WARNING)
    assert stopped["MESSAGE_ID"] == Event.STOPPED_PREPARED.message_id
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert len(lines) == 2 and all(len(line) <= LONGEST_LINE for line in lines), lines


def test_the_real_journal_send_takes_a_refusal_at_warning_with_its_fields(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # as test_notify does: the real systemd.journal.send, caught at sendv (no journald here)
    from systemd import journal as sd_journal

    lines: list[tuple[Any, ...]] = []
    monkeypatch.setattr(sd_journal, "sendv", lambda *args: lines.append(args))
    EventLog(stream=io.StringIO(), environ={}).log_event(
        Event.FAILED, "commit refused for uid 1000 (:1.9): session(s) not ready: vm-1",
        journal.failure_priority(Busy("not ready")), error="org.khoagent.Agent1.Error.Busy",
        caller="uid 1000 (:1.9)", job="4", job_type="commit", result=None)
    (fields,) = lines
    assert "PRIORITY=4" in fields and "PRIORITY=3" not in fields
    assert "KHO_AGENT_CALLER=uid 1000 (:1.9)" in fields and "KHO_AGENT_JOB_TYPE=commit" in fields
    assert not any(field.startswith("KHO_AGENT_RESULT=") for field in fields)


# --- the daemon -----------------------------------------------------------------------------------

def _long_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if len(line) > LONGEST_LINE]


def test_a_successful_live_update_logs_no_warning_at_the_next_start(host: Host) -> None:
    client = host.client()
    create_session(client, "vm-1", {1: os.urandom(2 * PAGE)})
    assert host.run_job(client, "Prepare", kernel_option(host))[0] == "done"
    first = host.daemon.stderr_text()
    assert "job 1 (prepare) done: " in first and not _long_lines(first), first
    assert host.run_job(client, "Commit", {})[0] == "done"
    host.restart()
    assert host.wait_state("verified", "failed") == "verified", host.prop("LastResult")
    log = host.daemon.stderr_text()
    assert "[verified]" in log
    assert "[recovered]" not in log, log      # after a kexec, verifying is the normal path
    assert "started after a live update" in log
    assert not _long_lines(log), _long_lines(log)


def test_a_refused_commit_is_logged_as_refused_with_the_caller(host: Host) -> None:
    client = host.client()
    client.call(MANAGER_PATH, MANAGER_IFACE, "CreateSession", GLib.Variant("(s)", ("vm-1",)))
    assert host.run_job(client, "Prepare", kernel_option(host))[0] == "done"
    result, job = host.run_job(client, "Commit", {})   # vm-1 is not ready
    assert result == "failed" and job["ErrorName"].endswith(".Busy"), job
    log = host.daemon.stderr_text()
    assert f"[failed] commit refused for uid {os.getuid()} ({client.unique_name})" in log, log
    assert "commit failed" not in log


# --- a stop while prepared ------------------------------------------------------------------------

def test_a_stop_while_prepared_cancels_the_update_and_says_which_sessions_went(
        host: Host) -> None:
    client = host.client()
    create_session(client, "vm-1", {1: b"x" * PAGE})
    create_session(client, "vm-2", {1: b"y" * PAGE})
    assert host.run_job(client, "Prepare", kernel_option(host))[0] == "done"
    assert SimKernel(host.sim_dir).host().kexec.loaded()
    assert host.daemon.stop() == 0                      # SIGTERM, as systemctl stop sends
    # before any restart: the stopped agent left nothing loaded and a state that says why
    assert not SimKernel(host.sim_dir).host().kexec.loaded()
    assert not (host.state_dir / "manifest.json").exists()
    state = json.loads((host.state_dir / "state.json").read_text())
    assert state["phase"] == "idle", state
    assert state["last_result"]["result"] == "cancelled"
    assert "stopped (signal 15) while the update was prepared" in json.dumps(state)
    log = host.daemon.stderr_text()
    assert "[stopped-prepared]" in log and "2 session(s) dropped (vm-1, vm-2)" in log, log
    host.daemon.start()
    assert host.prop("State") == "idle"
    assert "[recovered]" not in host.daemon.stderr_text()   # nothing was left halfway
    client = host.client()
    create_session(client, "vm-1", {1: b"again"})   # the name is free in the kernel again
    assert host.run_job(client, "Prepare", kernel_option(host))[0] == "done"
    assert invoke(client, "GetManifest")
