"""What a hostile caller and a careless operator can do to kho-agentd (issue 11), on a private
system-type bus with the shipped policy, the daemon on the simulated kernel, and real clients
(Gio in this process, Python clients as nobody).

Each test names the class it covers: 1 planning calls leave the prepared update alone, 2 no
caller stalls the engine or learns what it may not read, 3 every failure leaves one consistent
state, 4 the next kernel's command line is checked, 6 authorization under load, 8 errors keep
their names.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agenthost import (
    ERR,
    JOB_IFACE,
    Authority,
    Host,
    create_session,
    host,
    invoke,
    kernel_option,
    memfd,
)
from dbusrig import (
    MANAGER_IFACE,
    MANAGER_PATH,
    NOBODY,
    GioClient,
    RemoteError,
    as_user,
    client_env,
    python_as,
    require_run_as,
)
from gi.repository import GLib

from kho_agent.errors import KernelRefused
from kho_agent.service.worker import os_error
from kho_agent.sim import SimAbi, SimKernel

__all__ = ["host"]  # the fixture, imported for pytest

SESSION_ACTION = "org.khoagent.Agent1.session"


def sessions(host: Host) -> dict[str, tuple[Any, ...]]:
    (rows,) = invoke(host.client(), "ListSessions")
    return {row[0]: row for row in rows}


class SlowPrepare:
    """A Prepare whose kexec load takes `seconds` (the simulated kernel's slow-load fault): the
    engine thread is busy for that long, while the test sends what must be decided meanwhile."""

    def __init__(self, host: Host, seconds: float = 2.0) -> None:
        self.host = host
        self.client = host.client()
        SimKernel(host.sim_dir).inject("slow-load", seconds=seconds)
        self.result: str | None = None

    def __enter__(self) -> SlowPrepare:
        self.removed = self.client.catch_signal("JobRemoved").__enter__()
        (self.job,) = invoke(self.client, "Prepare", "a{sv}", (kernel_option(self.host),))
        time.sleep(0.3)  # the prepare is in the load now
        return self

    def __exit__(self, *_: object) -> None:
        try:
            _id, _path, self.result = self.removed.wait(60, lambda a: a[1] == self.job)
        finally:
            self.removed.__exit__(None, None, None)


def second_target(host: Host, tmp: Path) -> Path:
    return SimKernel(host.sim_dir).write_kernel_image(tmp / "vmlinuz-7.3.2-sim",
                                                      release="7.3.2-sim", abi=SimAbi())


# --- 1. nothing but the owner's verbs changes a prepared update ------------------------------

def test_planning_calls_between_prepare_and_commit_change_nothing(host: Host,
                                                                 tmp_path: Path) -> None:
    client = host.client()
    create_session(client, "vm-1", {1: b"guest memory" * 100})
    result, props = host.run_job(client, "Prepare", kernel_option(host))
    assert result == "done", props
    (before,) = invoke(client, "GetManifest")
    other = second_target(host, tmp_path)
    # every planning call, with no kernel, with another kernel, and a dry run of another
    invoke(client, "Preflight", "a{sv}", ({},))
    invoke(client, "Preflight", "a{sv}", ({"kernel": GLib.Variant("s", str(other))},))
    invoke(client, "ScratchPlan", "a{sv}", ({"kernel": GLib.Variant("s", str(other))},))
    result, props = host.run_job(client, "Prepare", {"kernel": GLib.Variant("s", str(other)),
                                                     "dry_run": GLib.Variant("b", True)})
    assert result == "done" and json.loads(props["Result"])["dry_run"], props
    assert host.prop("State") == "prepared"
    assert host.prop("TargetKernel") == str(host.target)
    (after,) = invoke(client, "GetManifest")
    assert after == before
    # and what the commit writes is the prepared update, which verifies in the next boot
    result, props = host.run_job(client, "Commit")
    assert result == "done", props
    host.restart()
    assert host.wait_state("verified", "failed") == "verified", host.prop("LastResult")
    (manifest,) = invoke(host.client(), "GetManifest")
    assert json.loads(manifest)["release_to"] == "7.3.1-sim"


# --- 2. no caller stalls the engine or learns what it may not read ---------------------------

def test_a_fifo_or_a_device_named_as_the_kernel_does_not_block_anyone(host: Host,
                                                                      tmp_path: Path) -> None:
    fifo = tmp_path / "vmlinuz-fifo"
    os.mkfifo(fifo)
    link = tmp_path / "vmlinuz-link"
    link.symlink_to(fifo)
    client = host.client()
    for path, kind in ((fifo, "FIFO"), (link, "FIFO"), (Path("/dev/zero"), "character device"),
                       (tmp_path, "directory")):
        start = time.monotonic()
        with pytest.raises(RemoteError) as refused:  # as Prepare: an input that cannot be read
            invoke(client, "Preflight", "a{sv}", ({"kernel": GLib.Variant("s", str(path))},))
        assert time.monotonic() - start < 5
        assert refused.value.name == ERR + "InvalidArgument" and kind in refused.value.message
        result, props = host.run_job(client, "Prepare", {"kernel": GLib.Variant("s", str(path))})
        assert result == "failed" and props["ErrorName"] == ERR + "InvalidArgument", props
        assert kind in props["ErrorMessage"]
    # the engine is free: a session is created at once
    create_session(client, "vm-after", {1: b"x"})
    assert host.prop("State") == "idle"


def _nobody_call(address: str, method: str, options: str, fd_path: str | None = None,
                 ) -> dict[str, str]:
    """A Manager call made by nobody from its own process; the fd (if any) is opened there, with
    nobody's rights. Returns {"reply": ...} or {"error": name, "message": ...}."""
    code = f"""
import json, os, sys
from dbusrig import GioClient, RemoteError
from gi.repository import GLib
client = GioClient({address!r})
opts = {{k: GLib.Variant(*v) for k, v in json.loads({options!r}).items()}}
fds = []
path = {fd_path!r}
if path:
    fds = [os.open(path, os.O_RDONLY)]
    opts["kernel_fd"] = GLib.Variant("h", 0)
try:
    reply, _ = client.call_values("/org/khoagent/Agent1", "org.khoagent.Agent1.Manager",
                                  {method!r}, "a{{sv}}", (opts,), fds)
    print(json.dumps({{"reply": reply[0]}}))
except RemoteError as exc:
    print(json.dumps({{"error": exc.name, "message": exc.message}}))
"""
    done = python_as(NOBODY, code, timeout=30, check=True)
    answer: dict[str, str] = json.loads(done.stdout)
    return answer


def test_an_unprivileged_caller_passes_fds_and_learns_nothing_of_root_files(
        host: Host, tmp_path: Path) -> None:
    require_run_as(NOBODY, python=True)
    secret = tmp_path / "private"
    secret.mkdir(mode=0o700)
    hidden = SimKernel(host.sim_dir).write_kernel_image(secret / "vmlinuz", release="9.9-sim",
                                                        abi=SimAbi())
    answers = [_nobody_call(host.bus.address, "Preflight",
                            json.dumps({"kernel": ["s", str(path)]}))
               for path in (hidden, secret / "missing", Path("/dev/zero"))]
    # the same refusal whether the file exists or not: nothing is opened for nobody
    assert {a.get("error") for a in answers} == {ERR + "PermissionDenied"}
    messages = {a["message"].replace(str(hidden), "P").replace(str(secret / "missing"), "P")
                .replace("/dev/zero", "P") for a in answers}
    assert len(messages) == 1 and "kernel_fd" in messages.pop()
    # no target at all: a report on the host alone, no complaint about a target
    report = json.loads(_nobody_call(host.bus.address, "Preflight", "{}")["reply"])
    assert not [c for c in report["checks"] if c["name"] == "target-abi"
                and c["tier"] == "blocker"], report
    # a file nobody can read itself, passed as an fd: the daemon reads what nobody opened
    with tempfile.TemporaryDirectory(dir="/tmp") as shared:
        os.chmod(shared, 0o755)
        public = Path(shared) / "vmlinuz-public"
        public.write_bytes(host.target.read_bytes())
        public.chmod(0o644)
        answer = _nobody_call(host.bus.address, "Preflight", "{}", str(public))
    report = json.loads(answer["reply"])
    assert not [c for c in report["checks"] if c["name"] == "target-abi"
                and c["tier"] == "blocker"], report


def test_unprivileged_planning_waits_behind_root_and_is_bounded(host: Host) -> None:
    """Twenty concurrent Preflights from nobody: at most a few wait (the rest are told Busy at
    once), and a root call sent after them is answered before the queue has drained."""
    require_run_as(NOBODY, python=True)
    code = f"""
import json, sys, threading
from dbusrig import GioClient, RemoteError
results = []
def one():
    client = GioClient({host.bus.address!r}, timeout=60)
    try:
        client.call_values("/org/khoagent/Agent1", "org.khoagent.Agent1.Manager", "Preflight",
                           "a{{sv}}", ({{}},))
        results.append("ok")
    except RemoteError as exc:
        results.append(exc.name)
    client.close()
threads = [threading.Thread(target=one) for _ in range(20)]
for t in threads: t.start()
print("started", flush=True)
for t in threads: t.join()
print(json.dumps(results))
"""
    with SlowPrepare(host, 3.0):
        flood = subprocess.Popen([*as_user(NOBODY), sys.executable, "-c", code],
                                 stdout=subprocess.PIPE, text=True, env=client_env())
        assert flood.stdout is not None
        assert flood.stdout.readline().strip() == "started"
        time.sleep(0.5)  # the nobody calls wait behind the prepare
        root = host.client()
        invoke(root, "ListSessions")                # main loop: answered at once
        create_session(root, "vm-root", {1: b"r"})  # engine: ahead of nobody's planning
        root_done = time.monotonic()
        out, _ = flood.communicate(timeout=120)
    flood_done = time.monotonic()
    results = json.loads(out.strip().splitlines()[-1])
    assert results.count(ERR + "Busy") >= 10, results
    assert set(results) <= {"ok", ERR + "Busy"}, results
    assert root_done <= flood_done
    assert "vm-root" in sessions(host)


# --- 3. every failure leaves one consistent state ---------------------------------------------

def test_cancelling_a_running_prepare_keeps_the_clients_sessions(host: Host) -> None:
    client = host.client()
    data = os.urandom(3 * 4096)
    create_session(client, "vm-1", {1: data})
    SimKernel(host.sim_dir).inject("slow-load", seconds=2.0)
    with client.catch_signal("JobRemoved") as removed:
        (job,) = invoke(client, "Prepare", "a{sv}", (kernel_option(host),))
        time.sleep(0.3)  # loading the kernel
        client.call(job, JOB_IFACE, "Cancel")
        _id, _path, result = removed.wait(60, lambda args: args[1] == job)
    assert result == "canceled"
    assert client.get_property(job, JOB_IFACE, "ErrorName") == ERR + "Cancelled"
    assert host.prop("State") == "idle"
    assert "preparing" not in host.prop("StateMessage")
    assert set(sessions(host)) == {"vm-1"}
    assert not SimKernel(host.sim_dir).host().kexec.loaded()
    # the session is still held: the next update carries it and the owner gets its bytes
    result, props = host.run_job(client, "Prepare", kernel_option(host))
    assert result == "done" and json.loads(props["Result"])["sessions"] == ["vm-1"], props
    result, props = host.run_job(client, "Commit")
    assert result == "done", props
    host.restart()
    assert host.wait_state("verified", "failed") == "verified", host.prop("LastResult")
    owner = host.client()
    (fd_index,), fds = owner.call_values(MANAGER_PATH, MANAGER_IFACE, "RetrieveFile", "st",
                                         ("vm-1", 1))
    assert os.pread(fds[fd_index], len(data), 0) == data
    os.close(fds[fd_index])


def test_cancel_tells_every_owner_that_its_session_was_released(host: Host) -> None:
    owner = host.client()
    create_session(owner, "vm-1", {1: b"one"})
    create_session(owner, "vm-2", {1: b"two"})
    result, _ = host.run_job(owner, "Prepare", kernel_option(host))
    assert result == "done"
    with owner.catch_signal("SessionReleased") as released:
        result, _ = host.run_job(owner, "Cancel")
        first = released.wait(10)
        second = released.wait(10)
    assert result == "done"
    assert {first[0], second[0]} == {"vm-1", "vm-2"}
    assert "cancelled" in first[2]
    assert sessions(host) == {}
    with pytest.raises(RemoteError) as exc:
        invoke(owner, "SetReady", "sb", ("vm-1", True))
    assert exc.value.name == ERR + "NotFound"


def test_a_bad_command_line_is_refused_and_the_next_prepare_works(host: Host) -> None:
    client = host.client()
    for cmdline, needle in (('console="ttyS0 root=/dev/vda', "unbalanced double quote"),
                            ("root=/dev/vda kho=off", "kho=on"),
                            ("root=/dev/vda liveupdate=0", "liveupdate=on"),
                            ("x" * 5000, "shorten it")):
        with pytest.raises(RemoteError) as exc:
            host.run_job(client, "Prepare", {**kernel_option(host),
                                             "cmdline": GLib.Variant("s", cmdline)})
        assert exc.value.name == ERR + "InvalidArgument" and needle in exc.value.message
        assert host.prop("State") == "idle"
        assert "preparing" not in host.prop("StateMessage")
    result, props = host.run_job(client, "Prepare", {
        **kernel_option(host), "cmdline": GLib.Variant("s", 'root=/dev/vda x="a b" -- single')})
    assert result == "done", props
    cmdline = json.loads(props["Result"])["cmdline"]
    assert cmdline == 'root=/dev/vda x="a b" kho=on liveupdate=on -- single'


def test_a_client_that_left_during_create_session_does_not_block_a_commit(host: Host) -> None:
    client = host.client()
    create_session(client, "vm-1", {1: b"stays"})
    with client.catch_signal("SessionReleased") as released, SlowPrepare(host) as prepare:
        leaver = GioClient(host.bus.address)
        with pytest.raises(RemoteError):  # the daemon knows who it is now (uid cached)
            invoke(leaver, "SetReady", "sb", ("nope", True))
        leaver.connection.call("org.khoagent.Agent1", MANAGER_PATH, MANAGER_IFACE,
                               "CreateSession", GLib.Variant("(s)", ("vm-gone",)), None, 0, -1,
                               None, None, None)
        leaver.connection.flush_sync(None)
        leaver.close()   # gone before the engine gets to the call
        name, _path, reason = released.wait(60)
    assert prepare.result == "done"
    assert name == "vm-gone" and "disconnected" in reason
    assert set(sessions(host)) == {"vm-1"}
    result, props = host.run_job(client, "Commit", {"dry_run": GLib.Variant("b", True)})
    assert result == "done", props


# --- 6. authorization under load ---------------------------------------------------------------

def _burst(host: Host, *, connections: int, calls: int) -> dict[str, int]:
    """`calls` concurrent SetReady calls on each of `connections` connections of nobody (each
    below the bus's own limit of 128 pending calls per connection); the error names counted."""
    require_run_as(NOBODY, python=True)
    code = f"""
import json, threading
from collections import Counter
from gi.repository import Gio, GLib
from dbusrig import CONNECTION_FLAGS
answers = Counter()
lock = threading.Lock()
def connection():
    ctx = GLib.MainContext.new()
    ctx.push_thread_default()
    conn = Gio.DBusConnection.new_for_address_sync({host.bus.address!r}, CONNECTION_FLAGS,
                                                   None, None)
    pending = [{calls}]
    def done(c, res):
        try:
            c.call_finish(res)
            name = "ok"
        except GLib.Error as exc:
            name = Gio.DBusError.get_remote_error(exc) or exc.message
        with lock:
            answers[name] += 1
        pending[0] -= 1
    for i in range({calls}):
        conn.call("org.khoagent.Agent1", "/org/khoagent/Agent1", "org.khoagent.Agent1.Manager",
                  "SetReady", GLib.Variant("(sb)", (f"nope-{{i}}", True)), None, 0, 120000,
                  None, done)
    while pending[0]:
        ctx.iteration(True)
    ctx.pop_thread_default()
threads = [threading.Thread(target=connection) for _ in range({connections})]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(answers))
"""
    done = python_as(NOBODY, code, timeout=300, check=True)
    answers: dict[str, int] = json.loads(done.stdout)
    return answers


@pytest.fixture
def slow_polkit(host: Host) -> Iterator[Authority]:
    authority = Authority(host.bus.address, {SESSION_ACTION: {NOBODY}}, delay_ms=100)
    try:
        yield authority
    finally:
        authority.stop()


def test_a_burst_of_authorized_callers_is_served(host: Host, slow_polkit: Authority) -> None:
    """500 calls needing authorization from 10 connections of an authorized uid, while polkit
    takes 100 ms per answer: all are authorized (the answer is NotFound for the session they
    name), none is refused for the daemon's own load."""
    answers = _burst(host, connections=10, calls=50)
    assert answers == {ERR + "NotFound": 500}, answers
    # identical questions in flight were shared: far fewer than one per call
    assert sum(slow_polkit.asked.values()) < 100, slow_polkit.asked


def test_an_unauthorized_burst_is_refused_by_polkit_not_by_load(host: Host,
                                                                slow_polkit: Authority) -> None:
    slow_polkit.grants.clear()
    answers = _burst(host, connections=4, calls=50)
    assert answers == {ERR + "PermissionDenied": 200}, answers


# --- 8. errors keep their names -----------------------------------------------------------------

def test_an_os_error_in_the_engine_keeps_its_errno() -> None:
    error = os_error(OSError(errno.EBADF, os.strerror(errno.EBADF)))
    assert isinstance(error, KernelRefused) and error.errno == errno.EBADF
    assert "EBADF (Bad file descriptor)" in error.message
    assert error.dbus_name == ERR + "KernelRefused"


def test_a_write_only_or_non_regular_fd_is_refused_with_its_kind(host: Host,
                                                                  tmp_path: Path) -> None:
    client = host.client()
    target = tmp_path / "vmlinuz-wo"
    target.write_bytes(host.target.read_bytes())
    read_end, write_end = os.pipe()
    write_only = os.open(target, os.O_WRONLY)
    try:
        for fd, needle in ((read_end, "FIFO"), (write_only, "not open for reading")):
            with pytest.raises(RemoteError) as exc:
                client.call_values(MANAGER_PATH, MANAGER_IFACE, "ScratchPlan", "a{sv}",
                                   ({"kernel_fd": GLib.Variant("h", 0)},), [fd])
            assert exc.value.name == ERR + "InvalidArgument" and needle in exc.value.message
    finally:
        for fd in (read_end, write_end, write_only):
            os.close(fd)
    assert stat.S_ISREG(os.stat(target).st_mode)


def _daemon_fds(host: Host) -> int:
    return len(os.listdir(f"/proc/{host.daemon.pid}/fd"))


def _daemon_rss_kib(host: Host) -> int:
    for line in Path(f"/proc/{host.daemon.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_answered_calls_keep_no_fds_and_no_memory(host: Host) -> None:
    """GLib < 2.84's register_object kept every answered call (its message, arguments and fds)
    for ever; any caller could exhaust the daemon's fds and memory with refused calls."""
    client = host.client()
    invoke(client, "ListSessions")
    before_fds = _daemon_fds(host)
    for _ in range(40):
        fd = memfd(b"x" * 4096)
        try:
            client.call(MANAGER_PATH, MANAGER_IFACE, "ListSessions", None, [fd])
            with pytest.raises(RemoteError):
                client.call(MANAGER_PATH, MANAGER_IFACE, "Preserve",
                            GLib.Variant("(sht)", ("nope", 0, 1)), fds=[fd])
        finally:
            os.close(fd)
    assert _daemon_fds(host) <= before_fds + 2
    before_rss = _daemon_rss_kib(host)
    big = "v" * (1 << 20)
    for _ in range(60):
        with pytest.raises(RemoteError) as exc:
            invoke(client, "SetReady", "sb", (big, True))
        assert len(exc.value.message) < 8192   # the argument is not echoed back whole
    assert _daemon_rss_kib(host) - before_rss < 40 * 1024   # 60 MiB were sent


def test_root_ending_someone_elses_session_tells_its_owner(host: Host) -> None:
    require_run_as(NOBODY, python=True)
    authority = Authority(host.bus.address, {SESSION_ACTION: {NOBODY}})
    try:
        code = f"""
from dbusrig import GioClient
from gi.repository import GLib
client = GioClient({host.bus.address!r})
client.call("/org/khoagent/Agent1", "org.khoagent.Agent1.Manager", "CreateSession",
            GLib.Variant("(s)", ("vm-nobody",)))
"""
        python_as(NOBODY, code, timeout=30, check=True)
    finally:
        authority.stop()
    assert sessions(host)["vm-nobody"][2] == NOBODY
    root = host.client()
    with root.catch_signal("SessionReleased") as released:
        invoke(root, "ReleaseSession", "s", ("vm-nobody",))
        name, _path, reason = released.wait(10)
    assert name == "vm-nobody" and "released by uid 0" in reason
    assert "vm-nobody" not in sessions(host)
