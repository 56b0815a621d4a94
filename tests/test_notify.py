"""kho_agent.service.notify (sd_notify, the fd store, LISTEN_FDS, the verified target) and
kho_agent.service.journal (structured events), against real sockets, real fds and real processes.

The notify socket is a real AF_UNIX datagram socket bound by the test (path and abstract), so the
bytes and SCM_RIGHTS fds systemd would receive are what the test receives. LISTEN_FDS is tested in
a child process whose fds 3.. are set up by a shell before it execs Python (as systemd does), so
the test process's own fds are never touched.
"""

from __future__ import annotations

import array
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kho_agent.errors import AgentError, InvalidArgument, NotFound
from kho_agent.service import journal as journal_mod
from kho_agent.service.journal import Event, EventLog
from kho_agent.service.notify import (
    SCM_MAX_FD,
    VERIFIED_TARGET,
    Notifier,
    fdname_is_valid,
)

REPO = Path(__file__).resolve().parent.parent


# --- a notify socket as systemd has it --------------------------------------------------------

class Receiver:
    """A bound AF_UNIX datagram socket; `take()` returns one datagram and its SCM_RIGHTS fds."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5.0)

    def take(self, max_fds: int = SCM_MAX_FD) -> tuple[bytes, list[int]]:
        int_size = array.array("i").itemsize
        data, ancillary, flags, _ = self.sock.recvmsg(8192, socket.CMSG_SPACE(max_fds * int_size))
        assert not flags & socket.MSG_CTRUNC, "ancillary data truncated: fds lost"
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % int_size])
                fds.extend(got)
        return data, fds

    def empty(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(8192)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5.0)
        return False

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[tuple[Receiver, str]]:
    path = tmp_path / "notify"
    receiver = Receiver(str(path))
    yield receiver, str(path)
    receiver.close()


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[Receiver, str]]:
    name = f"kho-agent-test-{uuid.uuid4().hex}"
    receiver = Receiver(b"\0" + name.encode())
    yield receiver, "@" + name
    receiver.close()


def memfd_with(data: bytes) -> int:
    fd = os.memfd_create("kho-notify-test", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


# --- without systemd ---------------------------------------------------------------------------

def test_without_notify_socket_every_message_is_a_no_op(tmp_path: Path) -> None:
    marker = tmp_path / "systemctl-ran"
    systemctl = tmp_path / "systemctl"
    systemctl.write_text(f"#!/bin/sh\ntouch {marker}\n")
    systemctl.chmod(0o755)
    runtime = tmp_path / "run"
    notifier = Notifier.from_env({"WATCHDOG_USEC": "1000000", "FDSTORE": "8",
                                  "RUNTIME_DIRECTORY": str(runtime)}, pid=os.getpid())
    fd = memfd_with(b"x")
    try:
        assert not notifier.enabled
        assert notifier.ready("up") is False
        assert notifier.status("idle") is False
        assert notifier.stopping() is False
        assert notifier.watchdog() is False
        assert notifier.extend_timeout(10) is False
        assert notifier.store_fds("session-a", [fd]) is False
        assert notifier.remove_fds("session-a") is False
        assert notifier.start_verified_target("ok", systemctl=str(systemctl)) is False
    finally:
        os.close(fd)
    assert not marker.exists()
    assert not runtime.exists()


# --- the messages, byte for byte ---------------------------------------------------------------

def test_messages_arrive_byte_exact_on_a_path_socket(path_receiver: tuple[Receiver, str]) -> None:
    receiver, address = path_receiver
    notifier = Notifier(socket_path=address, watchdog_usec=30_000_000)
    assert notifier.ready("serving org.khoagent.Agent1")
    assert receiver.take() == (b"READY=1\nSTATUS=serving org.khoagent.Agent1", [])
    assert notifier.status("prepared: 3 sessions")
    assert receiver.take() == (b"STATUS=prepared: 3 sessions", [])
    assert notifier.watchdog()
    assert receiver.take() == (b"WATCHDOG=1", [])
    assert notifier.extend_timeout(1.5)
    assert receiver.take() == (b"EXTEND_TIMEOUT_USEC=1500000", [])
    assert notifier.stopping()
    assert receiver.take() == (b"STOPPING=1", [])
    assert notifier.last_error is None


def test_messages_arrive_on_an_abstract_socket(abstract_receiver: tuple[Receiver, str]) -> None:
    receiver, address = abstract_receiver
    notifier = Notifier.from_env({"NOTIFY_SOCKET": address}, pid=os.getpid())
    assert notifier.enabled
    assert notifier.ready()
    assert receiver.take() == (b"READY=1", [])


def test_status_text_cannot_inject_assignments(path_receiver: tuple[Receiver, str]) -> None:
    # a session name is client input: a newline in it must not become a READY=1 or FDSTORE=1
    receiver, address = path_receiver
    notifier = Notifier(socket_path=address)
    assert notifier.status("session vm\nREADY=1\rFDSTOREREMOVE=1")
    data, _ = receiver.take()
    assert data == b"STATUS=session vm READY=1 FDSTOREREMOVE=1"
    assert data.count(b"\n") == 0


def test_long_status_is_cut_on_a_character_boundary(path_receiver: tuple[Receiver, str]) -> None:
    receiver, address = path_receiver
    notifier = Notifier(socket_path=address)
    assert notifier.status("é" * 5000)  # 10000 bytes of UTF-8
    data, _ = receiver.take()
    text = data.decode("utf-8")  # raises if a character was cut in half
    assert text.startswith("STATUS=é")
    assert len(data) <= len(b"STATUS=") + 1024


def test_no_watchdog_ping_without_a_watchdog(path_receiver: tuple[Receiver, str]) -> None:
    receiver, address = path_receiver
    notifier = Notifier(socket_path=address, watchdog_usec=None)
    assert notifier.watchdog() is False
    assert receiver.empty()


def test_a_vanished_manager_is_reported_not_raised(tmp_path: Path) -> None:
    # direct mode: after PID 1 hands over to systemd-shutdown the socket file may remain with
    # nobody reading it, or be gone; the agent keeps running and a ping just fails
    stale = tmp_path / "stale"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(stale))
    sock.close()
    notifier = Notifier(socket_path=str(stale), watchdog_usec=1_000_000)
    assert notifier.watchdog() is False
    assert notifier.last_error is not None and "refused" in notifier.last_error.lower()
    gone = Notifier(socket_path=str(tmp_path / "never-bound"))
    assert gone.status("x") is False
    assert gone.last_error is not None and "no such file" in gone.last_error.lower()


def test_unsupported_notify_socket_forms_are_not_used() -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}, pid=os.getpid())
    assert notifier.ready() is False
    assert notifier.last_error is not None and "vsock:2:1234" in notifier.last_error


# --- the environment ---------------------------------------------------------------------------

@pytest.mark.parametrize(("env", "expected"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{me}"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),   # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_honours_watchdog_pid(env: dict[str, str], expected: float | None,
                                                ) -> None:
    me = 4242
    environ = {key: value.format(me=me) for key, value in env.items()}
    assert Notifier.from_env(environ, pid=me).watchdog_interval() == expected


def test_from_env_reads_fdstore_and_runtime_directory() -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", "FDSTORE": "1024",
                                  "RUNTIME_DIRECTORY": "/run/kho-agent:/run/other"}, pid=1)
    assert notifier.fdstore_max == 1024
    assert notifier.runtime_dir == Path("/run/kho-agent")
    assert Notifier.from_env({}, pid=1).fdstore_max == 0


# --- the fd store ------------------------------------------------------------------------------

def test_store_fds_passes_the_same_files(path_receiver: tuple[Receiver, str]) -> None:
    receiver, address = path_receiver
    notifier = Notifier(socket_path=address, fdstore_max=16)
    first, second = memfd_with(b"guest memory"), memfd_with(b"manifest")
    received: list[int] = []
    try:
        assert notifier.store_fds("session-vm1", [first, second])
        data, received = receiver.take()
        assert data == b"FDSTORE=1\nFDNAME=session-vm1\nFDPOLL=0"
        assert len(received) == 2
        for sent, got in zip((first, second), received, strict=True):
            assert got != sent  # a new descriptor in the receiver ...
            assert os.fstat(got).st_ino == os.fstat(sent).st_ino  # ... for the same file
        assert os.pread(received[0], 100, 0) == b"guest memory"
        assert notifier.store_fds("manifest", [second], poll=True)
        data, more = receiver.take()
        received += more
        assert data == b"FDSTORE=1\nFDNAME=manifest"
    finally:
        for fd in (first, second, *received):
            os.close(fd)


def test_more_fds_than_one_message_carries_go_in_several(
        path_receiver: tuple[Receiver, str]) -> None:
    receiver, address = path_receiver
    notifier = Notifier(socket_path=address, fdstore_max=1024)
    base = memfd_with(b"x")
    fds = [os.dup(base) for _ in range(SCM_MAX_FD + 47)]
    received: list[int] = []
    try:
        assert notifier.store_fds("many", fds)
        first_data, first = receiver.take()
        second_data, second = receiver.take()
        received = first + second
        assert first_data == second_data == b"FDSTORE=1\nFDNAME=many\nFDPOLL=0"
        assert (len(first), len(second)) == (SCM_MAX_FD, 47)
        inode = os.fstat(base).st_ino
        assert all(os.fstat(fd).st_ino == inode for fd in received)
    finally:
        for fd in (base, *fds, *received):
            os.close(fd)


def test_store_fds_without_a_store_sends_nothing(path_receiver: tuple[Receiver, str]) -> None:
    receiver, address = path_receiver
    notifier = Notifier(socket_path=address, fdstore_max=0)
    fd = memfd_with(b"x")
    try:
        assert notifier.store_fds("session-vm1", [fd]) is False
    finally:
        os.close(fd)
    assert receiver.empty()
    assert notifier.last_error is not None and "FileDescriptorStoreMax" in notifier.last_error


def test_remove_fds(path_receiver: tuple[Receiver, str]) -> None:
    receiver, address = path_receiver
    assert Notifier(socket_path=address, fdstore_max=4).remove_fds("session-vm1")
    assert receiver.take() == (b"FDSTOREREMOVE=1\nFDNAME=session-vm1", [])


@pytest.mark.parametrize("name", ["", "a:b", "x" * 256, "tab\there", "new\nline", "del\x7f"])
def test_invalid_fd_names_are_refused_before_sending(
        name: str, path_receiver: tuple[Receiver, str]) -> None:
    receiver, address = path_receiver
    notifier = Notifier(socket_path=address, fdstore_max=4)
    fd = memfd_with(b"x")
    try:
        assert not fdname_is_valid(name)
        with pytest.raises(InvalidArgument):
            notifier.store_fds(name, [fd])
        with pytest.raises(InvalidArgument):
            notifier.remove_fds(name)
    finally:
        os.close(fd)
    assert receiver.empty()


def test_valid_fd_names() -> None:
    assert fdname_is_valid("session-vm_2e1")
    assert fdname_is_valid("x" * 255)
    assert fdname_is_valid("with space")


# --- LISTEN_FDS, in a child whose fds 3.. are set up as systemd does ------------------------------

LISTEN_CHILD = textwrap.dedent("""
    import fcntl, json, os, sys
    from kho_agent.service.notify import Notifier
    before = {fd: bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC) for fd in (3, 4, 5)}
    got = Notifier.from_env().listen_fds()
    report = {
        "fds": got,
        "inodes": {str(fd): os.fstat(fd).st_ino for fds in got.values() for fd in fds},
        "cloexec_before": {str(k): v for k, v in before.items()},
        "cloexec_after": {str(fd): bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
                          for fds in got.values() for fd in fds},
        "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
    }
    print(json.dumps(report))
""")


def run_listen_child(listen_pid: str, names: str | None) -> dict[str, Any]:
    files = [memfd_with(b"a"), memfd_with(b"b"), memfd_with(b"c")]
    # high numbers, so the shell's `exec 3<&N` cannot overwrite a source it still needs
    high = [fcntl_dupfd(fd, 200 + i) for i, fd in enumerate(files)]
    inodes = [os.fstat(fd).st_ino for fd in files]
    # $$ is the shell's pid, and exec keeps it: LISTEN_PID names the process that reads it
    # (bash, not sh: dash takes only one-digit fds in redirections)
    pid_expr = "$$" if listen_pid == "self" else listen_pid
    names_export = f"export LISTEN_FDNAMES='{names}'; " if names is not None else ""
    script = (f"exec 3<&{high[0]} 4<&{high[1]} 5<&{high[2]} "
              f"{high[0]}<&- {high[1]}<&- {high[2]}<&-; "
              f"export LISTEN_FDS=3 LISTEN_PID={pid_expr}; {names_export}"
              f"exec {sys.executable} -c \"$CHILD\"")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO),
           "CHILD": LISTEN_CHILD}
    try:
        done = subprocess.run(["/bin/bash", "-c", script], pass_fds=high, env=env,
                              capture_output=True, text=True, timeout=30, check=False)
    finally:
        for fd in (*files, *high):
            os.close(fd)
    assert done.returncode == 0, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    report["expected_inodes"] = inodes
    return report


def fcntl_dupfd(fd: int, lowest: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)


def test_listen_fds_groups_by_name_and_sets_cloexec() -> None:
    report = run_listen_child("self", "session-a:session-a:manifest")
    assert report["fds"] == {"session-a": [3, 4], "manifest": [5]}
    assert [report["inodes"][str(fd)] for fd in (3, 4, 5)] == report["expected_inodes"]
    assert report["cloexec_before"] == {"3": False, "4": False, "5": False}
    assert report["cloexec_after"] == {"3": True, "4": True, "5": True}
    assert report["env_left"] == []


def test_listen_fds_without_names_are_unknown() -> None:
    report = run_listen_child("self", None)
    assert report["fds"] == {"unknown": [3, 4, 5]}


def test_listen_fds_meant_for_another_process_are_left_alone() -> None:
    report = run_listen_child("1", "a:b:c")
    assert report["fds"] == {}
    assert report["cloexec_before"] == {"3": False, "4": False, "5": False}
    assert report["env_left"] == []  # unset anyway, as sd_listen_fds(1) does


def test_listen_fds_refuses_an_inconsistent_environment() -> None:
    me = os.getpid()
    with pytest.raises(InvalidArgument, match="LISTEN_FDNAMES has 2 names"):
        Notifier(environ={"LISTEN_FDS": "3", "LISTEN_PID": str(me),
                          "LISTEN_FDNAMES": "a:b"}).listen_fds()
    with pytest.raises(InvalidArgument, match="not a number"):
        Notifier(environ={"LISTEN_FDS": "x", "LISTEN_PID": str(me)}).listen_fds()
    assert Notifier(environ={"LISTEN_FDS": "0", "LISTEN_PID": str(me)}).listen_fds() == {}


# --- the verified target -----------------------------------------------------------------------

def fake_systemctl(directory: Path, status: int, stderr: str = "") -> tuple[Path, Path]:
    """A systemctl that records its arguments, one per line, and exits with `status`."""
    record = directory / "argv"
    script = directory / "systemctl"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {record}\n"
                      f"printf '%s' '{stderr}' >&2\nexit {status}\n")
    script.chmod(0o755)
    return script, record


def test_start_verified_target_writes_the_flag_then_queues_the_target(
        tmp_path: Path, path_receiver: tuple[Receiver, str]) -> None:
    _, address = path_receiver
    runtime = tmp_path / "run" / "kho-agent"
    systemctl, record = fake_systemctl(tmp_path, 0)
    notifier = Notifier(socket_path=address, runtime_dir=runtime)
    assert notifier.start_verified_target('{"verdict": "verified"}', systemctl=str(systemctl))
    assert record.read_text().splitlines() == ["start", "--no-block", VERIFIED_TARGET]
    flag = runtime / "verified"
    assert flag.read_text() == '{"verdict": "verified"}\n'
    assert stat.S_IMODE(flag.stat().st_mode) == 0o644  # PID 1 evaluates the condition
    assert [p.name for p in runtime.iterdir()] == ["verified"]  # no temporary file left


def test_start_verified_target_reports_a_failing_systemctl(
        tmp_path: Path, path_receiver: tuple[Receiver, str]) -> None:
    _, address = path_receiver
    systemctl, _ = fake_systemctl(tmp_path, 5, "Unit kho-agent-verified.target not found.")
    notifier = Notifier(socket_path=address, runtime_dir=tmp_path / "run")
    with pytest.raises(AgentError, match=re.escape("exit status 5: Unit "
                                                   "kho-agent-verified.target not found")):
        notifier.start_verified_target("ok", systemctl=str(systemctl))
    assert (tmp_path / "run" / "verified").exists()  # the verification did succeed
    with pytest.raises(NotFound, match="not found"):
        notifier.start_verified_target("ok", systemctl=str(tmp_path / "no-such-systemctl"))


def test_start_verified_target_with_the_real_systemctl_fails_clearly_here(
        tmp_path: Path, path_receiver: tuple[Receiver, str]) -> None:
    # the real binary, on a machine whose PID 1 is not systemd (or where the target is not
    # installed): it must fail with systemctl's own words in the message, never pass silently
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        pytest.skip("systemctl is not installed")
    if Path("/run/systemd/system").is_dir() and Path(
            "/etc/systemd/system/kho-agent-verified.target").exists():
        pytest.skip("a systemd host with the target installed: starting it would be real")
    _, address = path_receiver
    notifier = Notifier(socket_path=address, runtime_dir=tmp_path / "run")
    with pytest.raises(AgentError, match=r"systemctl start --no-block kho-agent-verified.target"
                                         r"` failed with exit status [1-9]"):
        notifier.start_verified_target("ok", systemctl=systemctl)


# --- journal events ----------------------------------------------------------------------------

class Sent:
    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        self.calls.append((args, kwargs))


def test_event_ids_are_distinct_128_bit_ids() -> None:
    ids = [event.message_id for event in Event]
    assert len(set(ids)) == len(ids)
    for message_id in ids:
        assert uuid.UUID(hex=message_id).hex == message_id  # 32 lower-case hex digits
    assert Event.FAILED.priority < Event.SESSION_DISCARDED.priority < Event.VERIFIED.priority


def test_log_event_sends_message_id_priority_and_fields() -> None:
    sent = Sent()
    stream = io.StringIO()
    events = EventLog(send=sent, stream=stream, environ={})
    line = sys._getframe().f_lineno + 1
    events.log_event(Event.PREPARED, "prepared /boot/vmlinuz-7.3 with 2 sessions",
                     state="prepared", target="/boot/vmlinuz-7.3", sessions=2, digests=True,
                     session_names=["vm 1", "vm:2"], scratch=None)
    ((args, kwargs),) = sent.calls
    assert args == ("prepared /boot/vmlinuz-7.3 with 2 sessions",)
    assert kwargs == {
        "MESSAGE_ID": "61993f5581d94c17bb5c15ae690281c3",
        "PRIORITY": "5",
        "SYSLOG_IDENTIFIER": "kho-agentd",
        "KHO_AGENT_EVENT": "prepared",
        "KHO_AGENT_STATE": "prepared",
        "KHO_AGENT_TARGET": "/boot/vmlinuz-7.3",
        "KHO_AGENT_SESSIONS": "2",
        "KHO_AGENT_DIGESTS": "yes",
        "KHO_AGENT_SESSION_NAMES": '["vm 1", "vm:2"]',
        # the caller's location, not journal.py's
        "CODE_FILE": __file__,
        "CODE_LINE": line,
        "CODE_FUNC": "test_log_event_sends_message_id_priority_and_fields",
    }
    assert stream.getvalue() == ("kho-agentd: [prepared] prepared /boot/vmlinuz-7.3 with 2 "
                                 "sessions\n")


def test_the_real_journal_send_accepts_what_log_event_passes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # systemd.journal.send formats the fields and hands them to sendv; catch them there, so the
    # real send() checks our argument shapes (there is no journald here to receive them)
    from systemd import journal as sd_journal

    lines: list[tuple[Any, ...]] = []
    monkeypatch.setattr(sd_journal, "sendv", lambda *args: lines.append(args))
    EventLog(stream=io.StringIO(), environ={}).log_event(
        Event.FAILED, "verify failed: digest mismatch", state="failed",
        error="VerificationFailed")
    assert len(lines) == 1
    fields = lines[0]
    assert fields[0] == "MESSAGE=verify failed: digest mismatch"
    assert "MESSAGE_ID=64051fc43644409f8cdac54b27b90e97" in fields
    assert "PRIORITY=3" in fields
    assert "KHO_AGENT_ERROR=VerificationFailed" in fields
    assert any(field.startswith("CODE_LINE=") for field in fields)


def test_no_echo_when_stderr_is_the_journal_stream(tmp_path: Path) -> None:
    with (tmp_path / "stream").open("w") as stream:
        st = os.fstat(stream.fileno())
        sent = Sent()
        EventLog(send=sent, stream=stream,
                 environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}).log_event(
            Event.VERIFIED, "verified")
        EventLog(send=sent, stream=stream,
                 environ={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}).log_event(
            Event.CANCELLED, "cancelled\nby operator")
    assert len(sent.calls) == 2
    assert (tmp_path / "stream").read_text() == "kho-agentd: [cancelled] cancelled by operator\n"


@pytest.mark.parametrize("name", ["bad-name", "x" * 60, "event", "ünicode"])
def test_bad_field_names_are_refused(name: str) -> None:
    sent = Sent()
    with pytest.raises(InvalidArgument):
        EventLog(send=sent, stream=io.StringIO(), environ={}).log_event(
            Event.RECOVERED, "recovered", **{name: "x"})
    assert sent.calls == []


def test_field_values() -> None:
    assert journal_mod.field_value(False) == "no"
    assert journal_mod.field_value(3.5) == "3.5"
    assert journal_mod.field_value(("a", "b")) == '["a", "b"]'
