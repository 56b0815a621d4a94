"""kho_agent.client.AgentClient, the helper for VM managers written in Python, against the real
daemon on a private bus and the simulated kernel: the calls of docs/vmm-integration.md, the
agent's errors as its own classes, and the wait for a session after the kexec."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from agenthost import PAGE, Host, host, kernel_option, memfd
from dbusrig import CONNECTION_FLAGS
from gi.repository import Gio

from kho_agent.client import AgentClient
from kho_agent.errors import InvalidArgument, NotFound
from kho_agent.kernel.liveupdate import LiveUpdateSession

__all__ = ["host"]  # the fixture, imported for pytest


def _client(host: Host) -> AgentClient:
    conn = Gio.DBusConnection.new_for_address_sync(host.bus.address, CONNECTION_FLAGS, None,
                                                   None)
    return AgentClient(conn, call_timeout_s=30)


def _preserved(client: AgentClient, name: str, data: bytes, *, digests: bool) -> None:
    path, session = client.create_session(name, digests=digests)
    assert path.endswith(name) and session.name == name
    session.close()
    fd = memfd(data)
    try:
        client.preserve(name, fd, 1)
    finally:
        os.close(fd)
    client.set_ready(name)


def _read(session: LiveUpdateSession, token: int) -> bytes:
    fd = session.retrieve_fd(token)
    try:
        return os.pread(fd, os.fstat(fd).st_size, 0)
    finally:
        os.close(fd)


def test_a_manager_waits_for_its_sessions_through_the_kexec(host: Host, tmp_path: Path) -> None:
    client = _client(host)
    fast, checked = os.urandom(4 * PAGE), os.urandom(2 * PAGE)
    _preserved(client, "fast", fast, digests=False)
    _preserved(client, "checked", checked, digests=True)
    gio = host.client()
    assert host.run_job(gio, "Prepare", kernel_option(host))[0] == "done"
    assert host.run_job(gio, "Commit", {})[0] == "done"
    host.restart_wait_exit()
    # the manager asks before the agent is even on the bus: it waits instead of failing
    got: dict[str, tuple[LiveUpdateSession, float]] = {}

    def wait_for(name: str) -> None:
        session = _client(host).retrieve_session(name, wait_s=60, poll_s=0.02)
        got[name] = (session, time.monotonic())
    threads = [threading.Thread(target=wait_for, args=(name,)) for name in ("fast", "checked")]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    assert got == {}
    gate = tmp_path / "gate"
    host.daemon.argv = [sys.executable, str(Path(__file__).parent / "gated_daemon.py"), str(gate)]
    host.daemon.start()
    deadline = time.monotonic() + 30
    while "fast" not in got:
        assert time.monotonic() < deadline, host.daemon.stderr_text()
        time.sleep(0.02)
    # the session with digests waits for them (verification held at the gate)
    time.sleep(0.3)
    assert "checked" not in got and host.prop("State") == "verifying"
    opened = time.monotonic()
    gate.write_text("go")
    for thread in threads:
        thread.join(60)
    assert got["checked"][1] >= opened
    assert _read(got["fast"][0], 1) == fast and _read(got["checked"][0], 1) == checked
    fd = client.retrieve_file("checked", 1)
    assert os.pread(fd, len(checked) + 1, 0) == checked
    os.close(fd)
    for name, (session, _) in got.items():
        session.close()
        client.finish_session(name)
    assert host.prop("State") == "verified"


def test_the_agents_errors_come_back_as_its_own(host: Host) -> None:
    client = _client(host)
    with pytest.raises(InvalidArgument) as bad:
        client.create_session("x" * 64)
    assert bad.value.exit_code == InvalidArgument.exit_code and "63" in bad.value.message
    assert not bad.value.message.startswith("GDBus.Error"), bad.value.message
    # a session the agent does not have is an answer, not a reason to wait
    start = time.monotonic()
    with pytest.raises(NotFound):
        client.retrieve_session("nobody-has-this", wait_s=30)
    assert time.monotonic() - start < 10


def _workload(host: Host, tmp_path: Path, command: str) -> dict[str, object]:
    """The guest's VM-manager stand-in (tests/vm/jobs/workload.py), on this private bus."""
    out = tmp_path / f"{command}.json"
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": host.bus.address,
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.run([sys.executable, str(WORKLOAD), command, "wl", str(out), "1"],
                          capture_output=True, text=True, timeout=120, env=env, check=False)
    report = dict(json.loads(out.read_text())) if out.exists() else {}
    assert proc.returncode == (0 if report.get("ok") else 1), proc.stderr
    return report


WORKLOAD = Path(__file__).resolve().parent / "vm" / "jobs" / "workload.py"


def test_the_guests_stand_in_manager_runs_on_the_client(host: Host, tmp_path: Path) -> None:
    """The QEMU suite's workload is written on AgentClient: it is run here on the simulated
    kernel, so a broken job fails in seconds instead of in a 30-minute guest run."""
    preserved = _workload(host, tmp_path, "preserve")
    assert preserved["ok"], preserved
    gio = host.client()
    assert host.run_job(gio, "Prepare", kernel_option(host))[0] == "done"
    assert host.run_job(gio, "Commit", {})[0] == "done"
    host.restart()
    assert host.wait_state("verified", "failed") == "verified", host.prop("LastResult")
    checked = _workload(host, tmp_path, "check")
    assert checked["ok"], checked
    assert all(f["ok"] for f in checked["files"].values()), checked  # type: ignore[attr-defined]
