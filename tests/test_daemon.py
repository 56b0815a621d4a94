"""kho-agentd on a real private dbus-daemon, on the simulated kernel, with real clients: pydbus,
busctl and gdbus (clients that are not ours), and Gio for the calls that pass fds.

The polkit Authority is a small real D-Bus service inside the test (polkitd is not installed
here); the daemon is told to ask it on the served bus (`--polkit-bus served`).
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pydbus
import pytest
from agenthost import (
    ERR,
    PAGE,
    SESSION_IFACE,
    Authority,
    Host,
    create_session,
    host,
    invoke,
    kernel_option,
    memfd,
)
from dbusrig import (
    BUS_NAME,
    MANAGER_IFACE,
    MANAGER_PATH,
    NOBODY,
    Daemon,
    GioClient,
    PrivateBus,
    RemoteError,
    busctl,
    gdbus,
    require_run_as,
)
from gi.repository import GLib

from kho_agent.client import session_from_fd
from kho_agent.errors import KernelRefused
from kho_agent.sim import SimAbi, SimKernel

__all__ = ["host"]  # the fixture, imported for pytest

# --- real clients that are not ours -------------------------------------------------------------

def test_pydbus_busctl_and_gdbus_read_the_manager(host: Host) -> None:
    bus = pydbus.connect(host.bus.address)
    manager = bus.get(BUS_NAME, MANAGER_PATH)
    assert manager.State == "idle" and manager.Simulated is True
    assert manager.RunningKernel == "7.3.0-sim" and manager.HandoffMode == "simulated"
    report = json.loads(manager.Preflight({"kernel": GLib.Variant("s", str(host.target))}))
    assert report["verdict"] in ("ok", "warning")
    out = busctl(host.bus.address, "--json=short", "get-property", BUS_NAME, MANAGER_PATH,
                 MANAGER_IFACE, "LiveUpdateNumber", check=True)
    assert json.loads(out.stdout) == {"type": "t", "data": 1}
    listed = gdbus(host.bus.address, "call", "--dest", BUS_NAME, "--object-path", MANAGER_PATH,
                   "--method", f"{MANAGER_IFACE}.ListSessions", check=True)
    assert listed.stdout.strip() == "(@a(sousbbb) [],)"


# --- the whole cycle with fds --------------------------------------------------------------------

def test_a_client_keeps_its_memory_across_the_simulated_kexec(host: Host) -> None:
    client = host.client()
    ram = os.urandom(3 * PAGE) + bytes(PAGE) + b"tail"
    path = create_session(client, "vm-1", {7: ram, 8: b"config"})
    assert client.get_property(path, SESSION_IFACE, "Tokens") == [7, 8]
    assert client.get_property(path, SESSION_IFACE, "Ready") is True
    owner = client.get_property(path, SESSION_IFACE, "Owner")
    assert owner == (os.getuid(), client.unique_name)
    result, job = host.run_job(client, "Prepare", kernel_option(host))
    assert result == "done" and job["Progress"] == 100, job
    assert json.loads(job["Result"])["sessions"] == ["vm-1"]
    assert host.prop("State") == "prepared" and host.prop("TargetKernel") == str(host.target)
    manifest = json.loads(invoke(client, "GetManifest")[0])
    assert [s["name"] for s in manifest["sessions"]] == ["vm-1"]
    result, job = host.run_job(client, "Commit", {})
    assert result == "done", job
    host.restart()                      # the next boot: the daemon verifies on its own
    assert host.wait_state("verified", "failed") == "verified", host.prop("LastResult")
    assert json.loads(host.prop("LastResult"))["result"] == "verified"
    assert host.prop("LiveUpdateNumber") == 2
    client = host.client()
    (rows,) = invoke(client, "ListSessions")
    assert [(r[0], r[2], r[5], r[6]) for r in rows] == [("vm-1", os.getuid(), False, True)]
    _reply, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "RetrieveSession",
                             GLib.Variant("(s)", ("vm-1",)))
    os.close(fds[0])
    for token, want in ((7, ram), (8, b"config")):
        _reply, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "RetrieveFile",
                                 GLib.Variant("(st)", ("vm-1", token)))
        try:
            assert os.fstat(fds[0]).st_size == len(want)
            assert os.pread(fds[0], len(want) + 1, 0) == want
        finally:
            os.close(fds[0])
    invoke(client, "FinishSession", "s", ("vm-1",))
    assert invoke(client, "ListSessions") == ([],)


# --- bad arguments change nothing ----------------------------------------------------------------

@pytest.mark.parametrize(("method", "signature", "values", "needle"), [
    ("Prepare", "a{sv}", ({"kernel": GLib.Variant("i", 5)},), "type"),
    ("Prepare", "a{sv}", ({"kernal": GLib.Variant("s", "/x")},), "unknown option"),
    ("Prepare", "a{sv}", ({},), "required"),
    ("ScratchPlan", "a{sv}", ({"margin": GLib.Variant("d", -1.0)},), "from 0 to 10"),
    ("ScratchPlan", "a{sv}", ({"margin": GLib.Variant("d", 1e308)},), "from 0 to 10"),
    ("Prepare", "a{sv}", ({"kernel": GLib.Variant("s", "/x"),
                           "cmdline": GLib.Variant("s", 'a="b kho=on')},), "unbalanced"),
    ("Prepare", "a{sv}", ({"kernel": GLib.Variant("s", "/x"),
                           "cmdline": GLib.Variant("s", "kho=off")},), "kho= turns KHO off"),
    ("Prepare", "a{sv}", ({"kernel": GLib.Variant("s", "/x"),
                           "scratch": GLib.Variant("s", "20E,1M,1M")},), "64 bits"),
    ("Preflight", "a{sv}", ({"kernel": GLib.Variant("s", "/x" * 3000)},), "longer than"),
    ("Commit", "a{sv}", ({"force": GLib.Variant("s", "yes")},), "type"),
    ("CreateSession", "s", ("x" * 64,), "63"),
    ("CreateSession", "s", ("",), "empty"),
    ("CreateSession", "s", ("kho-agent",), "agent"),
    ("SetReady", "sb", ("nope", True), "no session"),
    ("RetrieveFile", "st", ("nope", 0), ""),
])
def test_bad_arguments_are_refused_and_change_nothing(host: Host, method: str, signature: str,
                                                      values: tuple[Any, ...],
                                                      needle: str) -> None:
    client = host.client()
    with pytest.raises(RemoteError) as exc:
        invoke(client, method, signature, values)
    assert exc.value.name in (ERR + "InvalidArgument", ERR + "NotFound"), exc.value
    assert needle.lower() in exc.value.message.lower()
    assert host.prop("State") == "idle"
    assert invoke(client, "ListSessions") == ([],)
    assert not SimKernel(host.sim_dir).host().kexec.loaded()


def test_a_missing_fd_is_invalid_not_a_crash(host: Host) -> None:
    client = host.client()
    create_session(client, "vm-1", {})
    with pytest.raises(RemoteError) as exc:   # handle 0 but no fd list
        client.call(MANAGER_PATH, MANAGER_IFACE, "Preserve", GLib.Variant("(sht)",
                                                                         ("vm-1", 0, 1)))
    assert exc.value.name == ERR + "InvalidArgument" and "fd" in exc.value.message
    assert host.prop("Tokens", f"{MANAGER_PATH}/session/vm_2d1", SESSION_IFACE) == []


def test_errors_keep_their_name_and_the_kernels_errno(host: Host) -> None:
    client = host.client()
    result, job = host.run_job(client, "Commit", {})   # nothing prepared: the job fails
    assert result == "failed" and job["ErrorName"] == ERR + "NotPrepared", job
    assert "prepare" in job["ErrorMessage"]
    create_session(client, "vm-1", {})
    create_session(client, "vm-2", {})
    shared = memfd(b"one file, two sessions")
    try:
        client.call(MANAGER_PATH, MANAGER_IFACE, "Preserve",
                    GLib.Variant("(sht)", ("vm-1", 0, 1)), fds=[shared])
        with pytest.raises(RemoteError) as exc:   # the kernel says EBUSY
            client.call(MANAGER_PATH, MANAGER_IFACE, "Preserve",
                        GLib.Variant("(sht)", ("vm-2", 0, 1)), fds=[shared])
    finally:
        os.close(shared)
    assert exc.value.name == ERR + "KernelRefused"
    assert "PRESERVE_FD failed: EBUSY" in exc.value.message
    assert host.prop("Tokens", f"{MANAGER_PATH}/session/vm_2d2", SESSION_IFACE) == []
    regular = os.open(host.target, os.O_RDONLY)  # not a memfd: refused before the kernel
    try:
        with pytest.raises(RemoteError) as exc:
            client.call(MANAGER_PATH, MANAGER_IFACE, "Preserve",
                        GLib.Variant("(sht)", ("vm-2", 0, 2)), fds=[regular])
    finally:
        os.close(regular)
    assert exc.value.name == ERR + "InvalidArgument" and "memfd" in exc.value.message


# --- authorization -------------------------------------------------------------------------------

def test_nobody_reads_but_may_not_manage_or_touch_others_sessions(host: Host) -> None:
    require_run_as(NOBODY)
    authority = Authority(host.bus.address, {"org.khoagent.Agent1.session": {NOBODY}})
    try:
        root = host.client()
        create_session(root, "vm-root", {1: b"root's"})
        state = busctl(host.bus.address, "--json=short", "get-property", BUS_NAME, MANAGER_PATH,
                       MANAGER_IFACE, "State", uid=NOBODY, check=True)
        assert json.loads(state.stdout)["data"] == "idle"
        prepare = busctl(host.bus.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                         "Prepare", "a{sv}", "1", "kernel", "s", str(host.target), uid=NOBODY)
        assert prepare.returncode != 0 and "manage" in prepare.stderr, prepare.stderr
        others = busctl(host.bus.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                        "SetReady", "sb", "vm-root", "false", uid=NOBODY)
        assert others.returncode != 0 and "belongs to uid 0" in others.stderr, others.stderr
        own = busctl(host.bus.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                     "CreateSession", "s", "vm-nobody", uid=NOBODY, check=True)
        assert "/session/vm_2dnobody" in own.stdout
        busctl(host.bus.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE, "SetReady",
               "sb", "vm-nobody", "true", uid=NOBODY, check=True)
        assert (NOBODY, "org.khoagent.Agent1.manage") in authority.asked
        assert host.prop("State") == "idle"
        assert host.prop("Ready", f"{MANAGER_PATH}/session/vm_2droot", SESSION_IFACE) is True
        owner = host.prop("Owner", f"{MANAGER_PATH}/session/vm_2dnobody", SESSION_IFACE)
        assert owner[0] == NOBODY
    finally:
        authority.stop()


def test_without_polkit_only_root_may_act(host: Host) -> None:
    require_run_as(NOBODY)
    out = busctl(host.bus.address, "call", BUS_NAME, MANAGER_PATH, MANAGER_IFACE,
                 "CreateSession", "s", "vm-x", uid=NOBODY)
    assert out.returncode != 0 and "polkit" in out.stderr, out.stderr
    assert invoke(host.client(), "ListSessions") == ([],)


# --- the daemon killed and restarted -------------------------------------------------------------

def test_killed_after_prepare_reports_cancelled_truthfully(host: Host) -> None:
    client = host.client()
    create_session(client, "vm-1", {1: b"x" * PAGE})
    assert host.run_job(client, "Prepare", kernel_option(host))[0] == "done"
    assert SimKernel(host.sim_dir).host().kexec.loaded()
    host.daemon.kill()
    host.daemon.start()
    assert host.prop("State") == "idle"
    message = host.prop("StateMessage")
    assert "nothing is preserved" in message and "unloaded" in message
    assert json.loads(host.prop("LastResult"))["result"] == "cancelled"
    assert not SimKernel(host.sim_dir).host().kexec.loaded()
    client = host.client()
    with pytest.raises(RemoteError) as exc:
        invoke(client, "GetManifest")
    assert exc.value.name == ERR + "NotFound"
    create_session(client, "vm-1", {1: b"again"})   # the name is free in the kernel again
    assert host.run_job(client, "Prepare", kernel_option(host))[0] == "done"


def test_killed_after_verify_reports_unclaimed_sessions_lost(host: Host) -> None:
    client = host.client()
    create_session(client, "vm-1", {1: b"one"})
    create_session(client, "vm-2", {1: b"two"})
    host.run_job(client, "Prepare", kernel_option(host))
    host.run_job(client, "Commit", {})
    host.restart()
    assert host.wait_state("verified") == "verified"
    client = host.client()
    _, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "RetrieveSession",
                         GLib.Variant("(s)", ("vm-1",)))
    os.close(fds[0])
    host.daemon.kill()
    host.daemon.start()
    assert host.prop("State") == "verified"
    assert "vm-2" in host.prop("StateMessage") and "lost" in host.prop("StateMessage")
    assert json.loads(host.prop("LastResult"))["lost_after_verify"] == ["vm-2"]
    with pytest.raises(RemoteError) as exc:
        host.client().call(MANAGER_PATH, MANAGER_IFACE, "RetrieveSession",
                           GLib.Variant("(s)", ("vm-2",)))
    assert exc.value.name == ERR + "NotFound"


# --- the loop stays free while a job runs --------------------------------------------------------

def test_a_hundred_clients_are_answered_while_prepare_runs(host: Host) -> None:
    client = host.client()
    create_session(client, "vm-big", {1: os.urandom(1 << 20) * 48})   # 48 MiB of guest memory
    stop = threading.Event()
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def reader() -> None:
        with GioClient(host.bus.address) as mine:
            while not stop.is_set():
                for method in ("State", "GetManifest"):
                    t = time.perf_counter()
                    try:
                        if method == "State":
                            mine.get_property(MANAGER_PATH, MANAGER_IFACE, "State")
                        else:
                            invoke(mine, "GetManifest")
                    except RemoteError as exc:
                        if exc.name != ERR + "NotFound":  # no manifest yet is an answer
                            with lock:
                                failures.append(f"{exc.name}: {exc.message}")
                    with lock:
                        latencies.append(time.perf_counter() - t)

    threads = [threading.Thread(target=reader) for _ in range(100)]
    for thread in threads:
        thread.start()
    try:
        start = time.perf_counter()
        result, job = host.run_job(client, "Prepare", kernel_option(host))
        duration = time.perf_counter() - start
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert result == "done", job
    assert failures == []
    assert len(latencies) >= 200
    worst = max(latencies)
    print(f"prepare took {duration * 1000:.0f} ms; {len(latencies)} calls from 100 clients, "
          f"worst latency {worst * 1000:.0f} ms")
    # a loop blocked by the job would hold some call for the whole job
    assert worst < duration, (worst, duration)


# --- systemd's notify protocol -------------------------------------------------------------------

def _receive(sock: socket.socket, want: str, seen: list[str], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not any(want in m for m in seen):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {want!r} on the notify socket; got {seen}")
        sock.settimeout(left)
        seen.append(sock.recv(4096).decode())


def test_the_notify_socket_hears_ready_status_watchdog_and_stopping(tmp_path: Path) -> None:
    sim = SimKernel.create(tmp_path / "sim")
    del sim
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, PrivateBus() as bus:
        sock.bind(str(path))
        daemon = Daemon(bus.address, tmp_path / "sim", tmp_path / "state",
                        env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"})
        seen: list[str] = []
        with daemon:
            _receive(sock, "READY=1", seen)
            ready = next(m for m in seen if "READY=1" in m)
            assert "STATUS=idle" in ready
            _receive(sock, "WATCHDOG=1", seen)
            with GioClient(bus.address) as client:
                _, fds = client.call_values(MANAGER_PATH, MANAGER_IFACE, "CreateSession", "s",
                                            ("vm-1",))
                for fd in fds:
                    os.close(fd)
            daemon.stop()
            _receive(sock, "STOPPING=1", seen)
        assert daemon.returncode == 0


# --- hand-off mode fdstore: systemd's fd store on the notify socket

def _notifications(sock: socket.socket, until: str, timeout: float = 20
                   ) -> list[tuple[str, list[int]]]:
    """Datagrams (text, fds passed with it) up to and including the one containing `until`."""
    out: list[tuple[str, list[int]]] = []
    deadline = time.monotonic() + timeout
    while not out or until not in out[-1][0]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {until!r} on the notify socket; got {out}")
        sock.settimeout(left)
        data, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
        fds: list[int] = []
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += list(array.array("i", payload[:len(payload) - len(payload) % 4]))
        out.append((data.decode(), fds))
    return out


def test_fdstore_mode_parks_the_sessions_and_takes_them_back_after_the_kexec(
        tmp_path: Path) -> None:
    sim_dir = tmp_path / "sim"
    sim = SimKernel.create(sim_dir, systemd_version=261)
    target = sim.write_kernel_image(tmp_path / "vmlinuz-7.3.1-sim", release="7.3.1-sim",
                                    abi=SimAbi())
    notify = tmp_path / "notify"
    env = {"NOTIFY_SOCKET": str(notify), "FDSTORE": "16"}
    ram = os.urandom(2 * PAGE)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock, PrivateBus() as bus:
        sock.bind(str(notify))
        daemon = Daemon(bus.address, sim_dir, tmp_path / "state", env=env)
        with daemon:
            rig = Host(bus, sim_dir, tmp_path / "state", target, daemon)
            try:
                assert rig.prop("HandoffMode") == "fdstore"
                client = rig.client()
                create_session(client, "vm:1", {5: ram})
                # a manager that keeps this one in its own service's fd store: not parked
                create_session(client, "kept", {1: b"its own"},
                               {"fd_store": GLib.Variant("b", True)})
                assert rig.run_job(client, "Prepare", kernel_option(rig))[0] == "done"
                result, job = rig.run_job(client, "Commit", {})
                assert result == "done", job
                sent = _notifications(sock, "STOPPING=1")
                stored = {text.split("FDNAME=")[1].split("\n")[0]: fds
                          for text, fds in sent if "FDSTORE=1" in text}
                # one real fd per session, under the session's own name, not polled
                assert sorted(stored) == ["luo-kho-agent", "luo-vm%3A1"], sent
                assert all(len(fds) == 1 for fds in stored.values())
                assert all("FDPOLL=0" in text for text, _ in sent if "FDSTORE=1" in text)
                rig.restart_wait_exit()
                # the next boot, as systemd starts it: the stored fds at 3.., LISTEN_* set
                names = sorted(stored)
                high = [fcntl.fcntl(stored[n][0], fcntl.F_DUPFD, 100) for n in names]
                for fds in stored.values():
                    os.close(fds[0])
                moves = " ".join(f"{3 + i}<&{fd} {fd}<&-" for i, fd in enumerate(high))
                daemon.argv = ["bash", "-c", f'exec {moves}; LISTEN_PID=$$ exec "$@"', "bash",
                               sys.executable, "-m", "kho_agent.daemon"]
                daemon.env_overrides.update(LISTEN_FDS=str(len(names)),
                                            LISTEN_FDNAMES=":".join(names))
                daemon.pass_fds = tuple(high)
                daemon.start()
                for fd in high:
                    os.close(fd)
                assert rig.wait_state("verified", "failed") == "verified", \
                    rig.prop("LastResult")
                # adopted from the store (not retrieved), then dropped from it
                removed = _notifications(sock, "READY=1")
                removed += _notifications(sock, "FDSTOREREMOVE=1\nFDNAME=luo-vm%3A1")
                assert any("FDSTOREREMOVE=1\nFDNAME=luo-kho-agent" in t for t, _ in removed)
                assert "closing" not in daemon.stderr_text()  # every fd was a session
                client = rig.client()
                _reply, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "RetrieveFile",
                                          GLib.Variant("(st)", ("vm:1", 5)))
                try:
                    assert os.pread(fds[0], len(ram) + 1, 0) == ram
                finally:
                    os.close(fds[0])
                # the kept session is its owner's, from its own store: the agent says so
                report = json.loads((tmp_path / "state" / "last-verify.json").read_text())
                kept = [i for i in report["items"] if i["name"] == "kept"]
                assert [i["verdict"] for i in kept] == ["unchecked"], kept
                with pytest.raises(RemoteError, match="NotFound"):
                    client.call(MANAGER_PATH, MANAGER_IFACE, "RetrieveSession",
                                GLib.Variant("(s)", ("kept",)))
                # CheckKeptSession (the owner hands its session fd in) is for kept sessions
                # only; its check itself is tested on the engine (test_fdstore.py) and in the
                # sid guest, where the owner has a real session fd to hand in
                stray = os.memfd_create("not-a-session", os.MFD_CLOEXEC)
                try:
                    with pytest.raises(RemoteError, match=r"NotFound.*not one its owner kept"):
                        client.call(MANAGER_PATH, MANAGER_IFACE, "CheckKeptSession",
                                    GLib.Variant("(sh)", ("vm:1", 0)), fds=[stray])
                finally:
                    os.close(stray)
            finally:
                for client in rig.clients:
                    client.close()


# --- a client preserving straight into its session fd ---------------------------------------------

def test_a_client_preserves_into_its_own_session_fd_and_gets_it_back(host: Host) -> None:
    """What a VMM does: it takes the session fd from CreateSession and preserves its memory into
    it itself; on the simulated kernel the fd takes the requests over its socket
    (kho_agent.client), on a real one as ioctls (the VM suite does that)."""
    client = host.client()
    _reply, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "CreateSession",
                             GLib.Variant("(s)", ("vm-direct",)))
    session = session_from_fd(fds[0], "vm-direct", incoming=False)
    ram = os.urandom(5 * PAGE)
    fd = memfd(ram)
    session.preserve_fd(fd, 42)
    with pytest.raises(KernelRefused) as exc:  # the kernel's rule, through the socket
        session.preserve_fd(fd, 43)
    assert exc.value.errno == errno.EBUSY
    with pytest.raises(KernelRefused) as exc:
        session.retrieve_fd(42)
    assert exc.value.errno == errno.EINVAL  # RETRIEVE_FD is for incoming sessions
    assert session.get_name() == "vm-direct"
    os.close(fd)
    session.close()  # the agent keeps its own reference until the kexec
    invoke(client, "SetReady", "sb", ("vm-direct", True))
    assert host.run_job(client, "Prepare", kernel_option(host))[0] == "done"
    assert host.run_job(client, "Commit", {})[0] == "done"
    host.restart()
    assert host.wait_state("verified", "failed") == "verified", host.prop("LastResult")
    client = host.client()
    _reply, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "RetrieveSession",
                              GLib.Variant("(s)", ("vm-direct",)))
    session = session_from_fd(fds[0], "vm-direct", incoming=True)
    got = session.retrieve_fd(42)
    try:
        assert os.fstat(got).st_size == len(ram)
        assert os.pread(got, len(ram) + 1, 0) == ram
    finally:
        os.close(got)
    session.finish()
    with pytest.raises(KernelRefused) as exc:
        session.retrieve_fd(42)
    assert exc.value.errno == errno.ENOENT  # finished
    session.close()


# --- after the kexec: who waits on what ----------------------------------------------------------

def _two_sessions_committed(host: Host) -> tuple[GioClient, bytes, bytes]:
    """A session without digests ("fast") and one with ("checked"), prepared and committed."""
    client = host.client()
    fast, checked = os.urandom(5 * PAGE), os.urandom(3 * PAGE)
    for name, data, options in (("fast", fast, {"digests": GLib.Variant("b", False)}),
                                ("checked", checked, {})):  # digests by the daemon's default
        _reply, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "CreateSessionWithOptions",
                                  GLib.Variant("(sa{sv})", (name, options)))
        os.close(fds[0])
        fd = memfd(data)
        try:
            client.call(MANAGER_PATH, MANAGER_IFACE, "Preserve",
                        GLib.Variant("(sht)", (name, 0, 1)), fds=[fd])
        finally:
            os.close(fd)
        invoke(client, "SetReady", "sb", (name, True))
    assert host.run_job(client, "Prepare", kernel_option(host))[0] == "done"
    manifest = json.loads(invoke(client, "GetManifest")[0])
    digests = {s["name"]: s["files"][0]["digest"] for s in manifest["sessions"]}
    assert digests["fast"] is None and digests["checked"] is not None
    assert host.run_job(client, "Commit", {})[0] == "done"
    return client, fast, checked


def _restart_gated(host: Host, gate: Path) -> None:
    """The next boot, with the daemon's verification held after it retrieved the sessions."""
    host.restart_wait_exit()
    host.daemon.argv = [sys.executable, str(Path(__file__).parent / "gated_daemon.py"), str(gate)]
    host.daemon.start()
    deadline = time.monotonic() + 30
    while not Path(f"{gate}.waiting").exists():
        assert time.monotonic() < deadline, host.daemon.stderr_text()
        time.sleep(0.02)


def _retrieve_file(client: GioClient, name: str, token: int) -> bytes:
    _reply, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "RetrieveFile",
                              GLib.Variant("(st)", (name, token)))
    try:
        return os.pread(fds[0], os.fstat(fds[0]).st_size, 0)
    finally:
        os.close(fds[0])


def test_a_session_without_digests_is_handed_back_before_verification_ends(
        host: Host, tmp_path: Path) -> None:
    """The policy (docs/vmm-integration.md): a session whose owner did not ask for digests is
    claimable as soon as the agent retrieved it; one with digests only once they are checked,
    so that nobody writes to it while the agent reads it."""
    client, fast, checked = _two_sessions_committed(host)
    gate = tmp_path / "gate"
    _restart_gated(host, gate)
    # verification is running (held before its observation step) ...
    client = host.client()
    assert host.wait_state("verifying") == "verifying"
    (rows,) = invoke(client, "ListSessions")
    assert sorted((r[0], r[6]) for r in rows) == [("checked", True), ("fast", True)]
    # ... and the session without digests is its owner's already, whole
    _reply, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "RetrieveSession",
                             GLib.Variant("(s)", ("fast",)))
    os.close(fds[0])
    assert _retrieve_file(client, "fast", 1) == fast
    # the one with digests waits for them, and says so
    with pytest.raises(RemoteError) as exc:
        client.call(MANAGER_PATH, MANAGER_IFACE, "RetrieveSession",
                    GLib.Variant("(s)", ("checked",)))
    assert exc.value.name == ERR + "Busy" and "digests" in exc.value.message
    with pytest.raises(RemoteError) as exc:
        _retrieve_file(client, "checked", 1)
    assert exc.value.name == ERR + "Busy"
    # no other operation starts meanwhile
    with pytest.raises(RemoteError) as exc:
        invoke(client, "Prepare", "a{sv}", (kernel_option(host),))
    assert exc.value.name == ERR + "Busy"
    assert host.prop("State") == "verifying"
    gate.write_text("go")
    assert host.wait_state("verified", "failed") == "verified", host.prop("LastResult")
    assert json.loads(host.prop("LastResult"))["result"] == "verified"
    assert _retrieve_file(client, "checked", 1) == checked
    invoke(client, "FinishSession", "s", ("fast",))
    invoke(client, "FinishSession", "s", ("checked",))
    assert invoke(client, "ListSessions") == ([],)
    log = host.daemon.stderr_text()
    assert "verify: 1 incoming session(s) can be claimed, 1 with digests once they are " \
           "checked" in log, log


def test_a_verification_that_cannot_observe_fails_and_keeps_the_sessions(
        host: Host, tmp_path: Path) -> None:
    """The middle step fails (a read error): the verdict is "failed" with the reason, nothing
    retrieved is lost, and the agent takes the next operation."""
    client, fast, checked = _two_sessions_committed(host)
    gate = tmp_path / "gate"
    _restart_gated(host, gate)
    gate.write_text("fail")
    assert host.wait_state("verified", "failed") == "failed"
    result = json.loads(host.prop("LastResult"))
    assert result["result"] == "failed" and "EIO" in result["reason"], result
    client = host.client()
    assert _retrieve_file(client, "fast", 1) == fast
    assert _retrieve_file(client, "checked", 1) == checked
    for name in ("fast", "checked"):
        invoke(client, "FinishSession", "s", (name,))
    assert invoke(client, "ListSessions") == ([],)
    result, job = host.run_job(client, "Prepare", kernel_option(host))
    assert result == "done", job


def test_each_session_is_handed_back_as_soon_as_it_is_retrieved(host: Host) -> None:
    """Retrieval runs one session per engine call: a VM manager gets its session while the
    agent is still retrieving the others, instead of after all of them."""
    client = host.client()
    count = 300
    for i in range(count):
        _reply, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "CreateSessionWithOptions",
                                  GLib.Variant("(sa{sv})", (f"vm-{i}", {
                                      "digests": GLib.Variant("b", False)})))
        os.close(fds[0])
        fd = memfd(f"vm-{i}".encode())
        try:
            client.call(MANAGER_PATH, MANAGER_IFACE, "Preserve",
                        GLib.Variant("(sht)", (f"vm-{i}", 0, 1)), fds=[fd])
        finally:
            os.close(fd)
        invoke(client, "SetReady", "sb", (f"vm-{i}", True))
    assert host.run_job(client, "Prepare", kernel_option(host))[0] == "done"
    assert host.run_job(client, "Commit", {})[0] == "done"
    host.restart_wait_exit()
    host.daemon.start()
    client = host.client()
    deadline = time.monotonic() + 60
    while True:
        try:
            _reply, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "RetrieveSession",
                                      GLib.Variant("(s)", ("vm-0",)))
            break
        except RemoteError as exc:
            assert exc.name == ERR + "Busy" and time.monotonic() < deadline, exc
            time.sleep(0.005)
    (rows,) = invoke(client, "ListSessions")
    os.close(fds[0])
    assert 0 < len(rows) < count, len(rows)   # the others were still being retrieved
    assert _retrieve_file(client, "vm-0", 1) == b"vm-0"
    assert host.wait_state("verified", "failed", timeout=120) == "verified"
    assert len(invoke(client, "ListSessions")[0]) == count


def test_the_watchdogs_sigabrt_leaves_every_threads_stack_in_the_log(host: Host) -> None:
    """systemd's watchdog ends a daemon whose main loop stopped turning with SIGABRT; the log
    must then say where each thread was (faulthandler), or the cause is lost."""
    import signal as signals

    os.kill(host.daemon.pid, signals.SIGABRT)
    deadline = time.monotonic() + 10
    while host.daemon.returncode is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert host.daemon.returncode == -signals.SIGABRT
    log = host.daemon.stderr_text()
    assert "Fatal Python error: Aborted" in log, log
    assert "kho-agent-engine" in log or log.count("Thread 0x") >= 2, log
    assert "daemon.py" in log, log
    host.daemon.start()   # the fixture's teardown expects a running daemon
