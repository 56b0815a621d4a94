"""The private D-Bus rig itself (tests/dbusrig.py), without kho-agentd: real dbus-daemon, real
busctl and gdbus, a tiny Gio service in a thread that passes real memfds, and privilege dropping
to nobody."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from dbusrig import (
    BUS_NAME,
    CONNECTION_FLAGS,
    DBUS_IFACE,
    DBUS_NAME,
    DBUS_PATH,
    MANAGER_IFACE,
    MANAGER_PATH,
    NOBODY,
    SHIPPED_POLICY,
    ClientError,
    Daemon,
    GioClient,
    PrivateBus,
    RemoteError,
    RigError,
    SignalTimeout,
    busctl,
    call_json,
    gdbus,
    get_property,
    python_as,
    require_run_as,
    wait_signal,
)
from gi.repository import Gio, GLib

from kho_agent.service import interfaces

TEST_IFACE = "org.khoagent.RigTest"
TEST_XML = f"""
<node>
  <interface name="{TEST_IFACE}">
    <method name="Echo">
      <arg name="fd" type="h" direction="in"/>
      <arg name="marker" type="ay" direction="in"/>
      <arg name="same" type="h" direction="out"/>
      <arg name="inode" type="t" direction="out"/>
    </method>
    <method name="Fail">
      <arg name="name" type="s" direction="in"/>
      <arg name="message" type="s" direction="in"/>
    </method>
    <method name="WhoAmI">
      <arg name="uid" type="u" direction="out"/>
    </method>
    <method name="Emit">
      <arg name="id" type="u" direction="in"/>
      <arg name="result" type="s" direction="in"/>
    </method>
    <property name="Label" type="s" access="read"/>
  </interface>
</node>
"""
LABEL = "rig-service"


class RigTestService:
    """A minimal service on its own connection, dispatched by a GLib main loop in a thread.

    Echo(h, ay) writes the marker at offset 0 of the received file and sends the same file back
    with the inode it saw; Fail(name, message) replies with that D-Bus error; WhoAmI() returns the
    caller's uid as the bus reports it; Emit(id, result) emits the Manager's JobRemoved."""

    def __init__(self, address: str, name: str = BUS_NAME) -> None:
        self.name = name
        self.connection = Gio.DBusConnection.new_for_address_sync(
            address, CONNECTION_FLAGS, None, None)
        self._context = GLib.MainContext.new()
        self._loop = GLib.MainLoop.new(self._context, False)
        info = Gio.DBusNodeInfo.new_for_xml(TEST_XML).interfaces[0]
        # method calls are dispatched to the context that is thread-default at registration
        self._context.push_thread_default()
        try:
            self._registration = self.connection.register_object(
                MANAGER_PATH, info, self._on_call, self._on_get_property, None)
        finally:
            self._context.pop_thread_default()
        self._thread = threading.Thread(target=self._loop.run, name="rig-test-service",
                                        daemon=True)
        self._thread.start()
        reply = self.connection.call_sync(
            DBUS_NAME, DBUS_PATH, DBUS_IFACE, "RequestName", GLib.Variant("(su)", (name, 4)),
            None, Gio.DBusCallFlags.NONE, 5000, None)
        assert reply.unpack() == (1,), f"could not become the primary owner of {name}"

    def _on_get_property(self, _conn: Gio.DBusConnection, _sender: str, _path: str,
                         _iface: str, prop: str) -> GLib.Variant:
        assert prop == "Label"
        return GLib.Variant("s", LABEL)

    def _on_call(self, conn: Gio.DBusConnection, sender: str, _path: str, _iface: str,
                 method: str, params: GLib.Variant,
                 invocation: Gio.DBusMethodInvocation) -> None:
        if method == "Echo":
            index, marker = params.unpack()
            fd = invocation.get_message().get_unix_fd_list().get(index)
            try:
                os.pwrite(fd, bytes(marker), 0)
                out = Gio.UnixFDList.new()
                out.append(fd)
                invocation.return_value_with_unix_fd_list(
                    GLib.Variant("(ht)", (0, os.fstat(fd).st_ino)), out)
            finally:
                os.close(fd)
        elif method == "Fail":
            name, message = params.unpack()
            invocation.return_dbus_error(name, message)
        elif method == "WhoAmI":
            uid = conn.call_sync(DBUS_NAME, DBUS_PATH, DBUS_IFACE, "GetConnectionUnixUser",
                                 GLib.Variant("(s)", (sender,)), None, Gio.DBusCallFlags.NONE,
                                 5000, None)
            invocation.return_value(uid)
        elif method == "Emit":
            job_id, result = params.unpack()
            conn.emit_signal(None, MANAGER_PATH, MANAGER_IFACE, "JobRemoved",
                             GLib.Variant("(uos)", (job_id, f"{MANAGER_PATH}/job/{job_id}",
                                                    result)))
            invocation.return_value(None)

    def close(self) -> None:
        self._loop.quit()
        self._thread.join(timeout=5)
        self.connection.unregister_object(self._registration)
        self.connection.close_sync(None)


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    # the permissive fallback, whatever policy file the tree ships, so the test interface below
    # is callable
    with PrivateBus(policy="permissive") as private:
        yield private


@pytest.fixture
def service(bus: PrivateBus) -> Iterator[RigTestService]:
    svc = RigTestService(bus.address)
    try:
        yield svc
    finally:
        svc.close()


@pytest.fixture
def client(bus: PrivateBus) -> Iterator[GioClient]:
    with GioClient(bus.address) as gio:
        yield gio


def test_constants_match_the_service_contract() -> None:
    assert (BUS_NAME, MANAGER_PATH, MANAGER_IFACE) == (
        interfaces.BUS_NAME, interfaces.MANAGER_PATH, interfaces.MANAGER_IFACE)


# --- the bus -------------------------------------------------------------------------------

def test_private_bus_answers_busctl_list_with_its_own_peers(
        bus: PrivateBus, client: GioClient) -> None:
    listing = busctl(bus.address, "list", "--no-legend", check=True).stdout
    names = {line.split()[0] for line in listing.splitlines() if line.strip()}
    # our Gio connection is a peer of that bus, and the bus driver is there: busctl really
    # reached this bus and not another one
    assert client.unique_name in names
    assert DBUS_NAME in names
    assert bus.socket_path.is_socket()
    assert bus.address.startswith(f"unix:path={bus.socket_path}")


def test_bus_id_agrees_between_busctl_gdbus_and_gio(bus: PrivateBus, client: GioClient) -> None:
    (gio_id,), _ = client.call_values(DBUS_PATH, DBUS_IFACE, "GetId", dest=DBUS_NAME)
    by_busctl = call_json(bus.address, DBUS_PATH, DBUS_IFACE, "GetId", dest=DBUS_NAME)
    by_gdbus = gdbus(bus.address, "call", "--dest", DBUS_NAME, "--object-path", DBUS_PATH,
                     "--method", f"{DBUS_IFACE}.GetId", check=True).stdout.strip()
    assert by_busctl == {"type": "s", "data": [gio_id]}
    assert by_gdbus == f"('{gio_id}',)"
    assert len(gio_id) == 32 and int(gio_id, 16) >= 0


def test_two_private_buses_are_separate() -> None:
    with PrivateBus("session") as one, PrivateBus("session") as two:
        assert one.socket_path != two.socket_path
        with GioClient(one.address) as a, GioClient(two.address) as b:
            assert a.request_name("org.khoagent.RigOnlyOnOne") == 1
            assert a.name_owner("org.khoagent.RigOnlyOnOne") == a.unique_name
            assert b.name_owner("org.khoagent.RigOnlyOnOne") is None


def test_stop_terminates_dbus_daemon_and_removes_its_directory() -> None:
    bus = PrivateBus().start()
    pid, directory = bus.pid, bus.directory
    bus.stop()
    assert not directory.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # reaped, not a zombie
    with pytest.raises(RigError, match="not started"):
        _ = bus.address


def test_bad_extra_policy_fails_start_with_dbus_daemons_complaint() -> None:
    bus = PrivateBus(extra_policy="<policy context='nonsense'><allow own='x'/></policy>")
    with pytest.raises(RigError, match="dbus-daemon exited") as failure:
        bus.start()
    assert "nonsense" in str(failure.value)
    assert bus._dir is None  # the temporary directory went away with the failed start


# --- policies ------------------------------------------------------------------------------

def test_permissive_fallback_lets_root_own_the_agent_name_and_nothing_else(
        bus: PrivateBus, client: GioClient) -> None:
    assert bus.policy_source == "permissive"
    assert client.request_name(BUS_NAME) == 1
    assert client.name_owner(BUS_NAME) == client.unique_name
    # still a system-type bus: the default policy denies owning any other name
    with pytest.raises(RemoteError) as denied:
        client.request_name("org.khoagent.NotTheAgent")
    assert denied.value.name == "org.freedesktop.DBus.Error.AccessDenied"


def test_auto_policy_falls_back_when_no_policy_is_shipped(tmp_path: Path) -> None:
    with PrivateBus(shipped_policy=tmp_path / "missing.conf") as private, \
            GioClient(private.address) as gio:
        assert private.policy_source == "permissive"
        assert gio.request_name(BUS_NAME) == 1


def test_auto_policy_uses_the_shipped_file_when_it_exists(tmp_path: Path) -> None:
    shipped = tmp_path / "org.khoagent.Agent1.conf"
    shipped.write_text('<busconfig><policy user="root">'
                       '<allow own="org.khoagent.RigShipped"/></policy></busconfig>')
    with PrivateBus(shipped_policy=shipped) as private, GioClient(private.address) as gio:
        assert private.policy_source == f"shipped: {shipped}"
        # the shipped file's hole is open and the fallback's is not: the copy replaced it
        assert gio.request_name("org.khoagent.RigShipped") == 1
        with pytest.raises(RemoteError) as denied:
            gio.request_name(BUS_NAME)
        assert denied.value.name == "org.freedesktop.DBus.Error.AccessDenied"


def test_shipped_policy_choice_requires_the_file(tmp_path: Path) -> None:
    with pytest.raises(RigError, match="does not exist"):
        PrivateBus(policy="shipped", shipped_policy=tmp_path / "missing.conf").start()


def test_the_trees_shipped_policy_lets_root_own_the_agent_name() -> None:
    if not SHIPPED_POLICY.is_file():
        pytest.skip(f"{SHIPPED_POLICY} is not written yet")
    with PrivateBus(policy="shipped") as private, GioClient(private.address) as gio:
        assert gio.request_name(BUS_NAME) == 1


def test_reload_applies_a_policy_installed_after_start(
        bus: PrivateBus, client: GioClient) -> None:
    late = "org.khoagent.RigLate"
    with pytest.raises(RemoteError):
        client.request_name(late)
    bus.install_policy("late.conf", f'<busconfig><policy user="root"><allow own="{late}"/>'
                                    "</policy></busconfig>")
    bus.reload()
    assert client.request_name(late) == 1


def test_session_flavour_lets_anyone_own_any_name() -> None:
    with PrivateBus("session") as private, GioClient(private.address) as gio:
        assert gio.request_name("org.khoagent.AnyNameAtAll") == 1


# --- GioClient: fds, errors, signals --------------------------------------------------------

def test_gio_client_passes_a_memfd_both_ways(client: GioClient, service: RigTestService) -> None:
    memfd = os.memfd_create("rig-echo")
    try:
        os.write(memfd, b"\0" * 4096)
        (index, seen_inode), fds = client.call_values(
            MANAGER_PATH, TEST_IFACE, "Echo", "hay", (0, b"from-the-service"), [memfd])
        assert len(fds) == 1
        back = fds[index]
        try:
            mine = os.fstat(memfd)
            assert seen_inode == mine.st_ino  # the service received our file
            assert os.fstat(back).st_ino == mine.st_ino  # and sent the same one back
            assert os.fstat(back).st_dev == mine.st_dev
            # the service's write is visible through our own fd: one file, not a copy
            assert os.pread(memfd, 16, 0) == b"from-the-service"
            assert back != memfd
        finally:
            os.close(back)
    finally:
        os.close(memfd)


def test_gio_client_keeps_the_callers_fd_open(client: GioClient, service: RigTestService) -> None:
    memfd = os.memfd_create("rig-keep")
    try:
        _, fds = client.call_values(MANAGER_PATH, TEST_IFACE, "Echo", "hay", (0, b"x"), [memfd])
        for fd in fds:
            os.close(fd)
        os.fstat(memfd)  # still ours: the fd list sent a duplicate
    finally:
        os.close(memfd)


@pytest.mark.parametrize(("name", "message"), [
    ("org.khoagent.Agent1.Error.Busy", "a prepare job is running: wait for JobRemoved"),
    ("org.khoagent.Agent1.Error.KernelRefused",
     "CREATE_SESSION: EEXIST (errno 17): GDBus.Error:looks-like-a-prefix: keep it"),
])
def test_gio_client_maps_a_dbus_error_to_remote_error(
        client: GioClient, service: RigTestService, name: str, message: str) -> None:
    with pytest.raises(RemoteError) as failure:
        client.call_values(MANAGER_PATH, TEST_IFACE, "Fail", "ss", (name, message))
    assert failure.value.name == name
    assert failure.value.message == message


def test_gio_client_maps_bus_errors_too(client: GioClient) -> None:
    with pytest.raises(RemoteError) as failure:
        client.call(MANAGER_PATH, MANAGER_IFACE, "GetManifest")  # nobody owns the name
    assert failure.value.name == "org.freedesktop.DBus.Error.ServiceUnknown"


def test_gio_client_refuses_non_tuple_arguments(client: GioClient) -> None:
    with pytest.raises(TypeError, match="tuple"):
        client.call(DBUS_PATH, DBUS_IFACE, "GetId", GLib.Variant("s", "x"), dest=DBUS_NAME)


def test_get_property_through_busctl_and_gio(
        bus: PrivateBus, client: GioClient, service: RigTestService) -> None:
    assert get_property(bus.address, MANAGER_PATH, TEST_IFACE, "Label") == LABEL
    assert client.get_property(MANAGER_PATH, TEST_IFACE, "Label") == LABEL


def test_call_json_raises_with_busctls_message(bus: PrivateBus, service: RigTestService) -> None:
    with pytest.raises(ClientError) as failure:
        call_json(bus.address, MANAGER_PATH, TEST_IFACE, "Fail", "ss",
                  "org.khoagent.Agent1.Error.NotFound", "no session named vm1")
    assert failure.value.returncode != 0
    assert "no session named vm1" in failure.value.stderr


def test_call_json_of_a_method_without_out_arguments(
        bus: PrivateBus, service: RigTestService) -> None:
    assert call_json(bus.address, MANAGER_PATH, TEST_IFACE, "Emit", "us", "1", "done") == {
        "type": "", "data": []}


def test_signal_catcher_returns_the_matching_job_removed(
        client: GioClient, service: RigTestService) -> None:
    with client.catch_signal("JobRemoved") as catcher:
        for job_id in (1, 2, 3):
            client.call_values(MANAGER_PATH, TEST_IFACE, "Emit", "us", (job_id, f"r{job_id}"))
        args = catcher.wait(5.0, predicate=lambda a: a[0] == 2)
        assert args == (2, f"{MANAGER_PATH}/job/2", "r2")
        # the others stay queued, in order
        assert catcher.wait(5.0) == (1, f"{MANAGER_PATH}/job/1", "r1")
        assert catcher.wait(5.0) == (3, f"{MANAGER_PATH}/job/3", "r3")


def test_wait_signal_with_a_trigger(bus: PrivateBus, service: RigTestService) -> None:
    with GioClient(bus.address) as other:
        args = wait_signal(bus.address, trigger=lambda: other.call_values(
            MANAGER_PATH, TEST_IFACE, "Emit", "us", (7, "done")), timeout=5.0)
    assert args == (7, f"{MANAGER_PATH}/job/7", "done")


def test_wait_signal_times_out_and_names_what_it_saw(
        client: GioClient, service: RigTestService) -> None:
    with client.catch_signal("JobRemoved") as catcher:
        client.call_values(MANAGER_PATH, TEST_IFACE, "Emit", "us", (5, "failed"))
        with pytest.raises(SignalTimeout, match="failed") as failure:
            catcher.wait(0.3, predicate=lambda a: a[0] == 6)
    assert "JobRemoved" in str(failure.value)


def test_signal_from_another_sender_is_ignored(bus: PrivateBus, client: GioClient) -> None:
    # the catcher filters on the agent's bus name: a JobRemoved from an unrelated connection
    # (which owns no name) must not count
    with GioClient(bus.address) as impostor, client.catch_signal("JobRemoved") as catcher:
        impostor.connection.emit_signal(None, MANAGER_PATH, MANAGER_IFACE, "JobRemoved",
                                        GLib.Variant("(uos)", (9, MANAGER_PATH + "/job/9", "x")))
        impostor.connection.flush_sync(None)
        with pytest.raises(SignalTimeout):
            catcher.wait(0.3)


# --- unprivileged clients -------------------------------------------------------------------

def test_busctl_as_nobody_reaches_the_bus_as_nobody(
        bus: PrivateBus, service: RigTestService) -> None:
    require_run_as(NOBODY)
    done = call_json(bus.address, MANAGER_PATH, TEST_IFACE, "WhoAmI", uid=NOBODY)
    # the service asked the bus who called: the bus saw uid 65534, not root
    assert done == {"type": "u", "data": [NOBODY]}
    assert call_json(bus.address, MANAGER_PATH, TEST_IFACE, "WhoAmI") == {
        "type": "u", "data": [0]}


def test_nobody_cannot_own_the_agent_name_under_the_fallback(bus: PrivateBus) -> None:
    require_run_as(NOBODY)
    # nobody reaches the bus (so a refusal below is the policy, not the socket's mode)
    busctl(bus.address, "call", DBUS_NAME, DBUS_PATH, DBUS_IFACE, "GetId", uid=NOBODY,
           check=True)
    done = busctl(bus.address, "call", DBUS_NAME, DBUS_PATH, DBUS_IFACE, "RequestName", "su",
                  BUS_NAME, "4", uid=NOBODY)
    assert done.returncode != 0
    assert "Call failed: Access denied" in done.stderr


def test_gdbus_as_nobody(bus: PrivateBus, service: RigTestService) -> None:
    require_run_as(NOBODY)
    done = gdbus(bus.address, "call", "--dest", BUS_NAME, "--object-path", MANAGER_PATH,
                 "--method", f"{TEST_IFACE}.WhoAmI", uid=NOBODY, check=True)
    assert done.stdout.strip() == f"(uint32 {NOBODY},)"


def test_gio_client_as_nobody_in_python(bus: PrivateBus, service: RigTestService) -> None:
    require_run_as(NOBODY, python=True)
    code = ("import os, sys, dbusrig\n"
            "with dbusrig.GioClient(sys.argv[1]) as c:\n"
            "    (uid,), _ = c.call_values(dbusrig.MANAGER_PATH, sys.argv[2], 'WhoAmI')\n"
            "print(uid, os.getuid())\n")
    done = python_as(NOBODY, code, bus.address, TEST_IFACE, check=True)
    assert done.stdout.split() == [str(NOBODY), str(NOBODY)]


def test_python_as_reports_failures(bus: PrivateBus) -> None:
    require_run_as(NOBODY, python=True)
    with pytest.raises(ClientError) as failure:
        python_as(NOBODY, "import os, sys; sys.exit(f'uid {os.getuid()} says no')", check=True)
    assert f"uid {NOBODY} says no" in failure.value.stderr


# --- Daemon, with stand-in commands ----------------------------------------------------------

# Owns the name it is told to (the agent's by default), logs its arguments and environment to
# stderr, and exits 0 on SIGTERM.
FAKE_DAEMON = r"""
import argparse, os, signal, sys
from gi.repository import Gio, GLib
p = argparse.ArgumentParser()
p.add_argument("--bus-address", required=True)
p.add_argument("--simulate")
p.add_argument("--state-dir", required=True)
p.add_argument("--own", default="org.khoagent.Agent1")
a = p.parse_args()
flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
         | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
conn = Gio.DBusConnection.new_for_address_sync(a.bus_address, flags, None, None)
conn.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
               "RequestName", GLib.Variant("(su)", (a.own, 4)), None, 0, 5000, None)
print("simulate", a.simulate, file=sys.stderr)
print("state-dir", a.state_dir, file=sys.stderr)
print("cwd", os.getcwd(), file=sys.stderr)
print("pythonpath", os.environ.get("PYTHONPATH"), file=sys.stderr)
print("notify", os.environ.get("NOTIFY_SOCKET"), file=sys.stderr, flush=True)
loop = GLib.MainLoop()
def bye():
    print("bye", file=sys.stderr, flush=True)
    loop.quit()
    return False
GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, bye)
loop.run()
"""
FAKE = [sys.executable, "-c", FAKE_DAEMON]


@pytest.fixture
def session_bus() -> Iterator[PrivateBus]:
    with PrivateBus("session") as private:
        yield private


def _stderr_fields(text: str) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        fields[key] = value
    return fields


def test_daemon_that_exits_at_once_fails_start_with_its_stderr(
        session_bus: PrivateBus, tmp_path: Path) -> None:
    daemon = Daemon(session_bus.address, tmp_path / "sim", tmp_path / "state",
                    argv=[sys.executable, "-c", "import sys; sys.exit('boom')"])
    with pytest.raises(RigError) as failure:
        daemon.start()
    text = str(failure.value)
    assert "exited with status 1 before owning org.khoagent.Agent1" in text
    assert "boom" in text
    assert "--bus-address" in text  # the command is in the message
    assert daemon.returncode == 1
    daemon.close()


def test_daemon_that_never_owns_the_name_is_killed_after_the_timeout(
        session_bus: PrivateBus, tmp_path: Path) -> None:
    stuck = ("import sys, time; print('stuck here', file=sys.stderr, flush=True); "
             "time.sleep(60)")
    daemon = Daemon(session_bus.address, None, tmp_path / "state",
                    argv=[sys.executable, "-c", stuck], start_timeout=1.0)
    with pytest.raises(RigError, match=r"did not own org\.khoagent\.Agent1 within 1\.0 s") as e:
        daemon.start()
    assert "stuck here" in str(e.value)
    assert daemon.returncode == -9
    daemon.close()


def test_daemon_start_stop_passes_arguments_and_environment(
        session_bus: PrivateBus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")  # must not leak into the daemon
    sim, state = tmp_path / "sim", tmp_path / "state"
    with Daemon(session_bus.address, sim, state, argv=FAKE) as daemon, \
            GioClient(session_bus.address) as gio:
        assert daemon.owner is not None
        assert gio.name_owner(BUS_NAME) == daemon.owner
        assert daemon.returncode is None
        # the pid the bus reports for the owner is our subprocess
        (pid,), _ = gio.call_values(DBUS_PATH, DBUS_IFACE, "GetConnectionUnixProcessID", "s",
                                    (daemon.owner,), dest=DBUS_NAME)
        assert pid == daemon.pid
        assert daemon.stop() == 0
    fields = _stderr_fields(daemon.stderr_text())
    assert fields["simulate"] == str(sim)
    assert fields["state-dir"] == str(state)
    assert Path(fields["cwd"]) == Path(__file__).resolve().parent.parent
    assert fields["pythonpath"] == str(Path(__file__).resolve().parent.parent)
    assert fields["notify"] == "None"
    assert "bye" in fields


def test_daemon_extra_args_env_and_custom_name(session_bus: PrivateBus, tmp_path: Path) -> None:
    with Daemon(session_bus.address, None, tmp_path, ["--own", "org.khoagent.RigOther"],
                argv=FAKE, name="org.khoagent.RigOther",
                env={"NOTIFY_SOCKET": "/tmp/rig-notify"}) as daemon, \
            GioClient(session_bus.address) as gio:
        assert gio.name_owner("org.khoagent.RigOther") == daemon.owner
        assert gio.name_owner(BUS_NAME) is None
    fields = _stderr_fields(daemon.stderr_text())
    assert fields["simulate"] == "None"  # no --simulate when simulate_dir is None
    assert fields["notify"] == "/tmp/rig-notify"


def test_daemon_kill_and_restart_gets_a_new_owner(
        session_bus: PrivateBus, tmp_path: Path) -> None:
    with Daemon(session_bus.address, None, tmp_path, argv=FAKE) as daemon:
        first = daemon.owner
        first_pid = daemon.pid
        assert daemon.kill() == -9
        assert daemon.returncode == -9
        assert "bye" not in daemon.stderr_text()  # SIGKILL: no clean shutdown
        daemon.start()
        assert daemon.owner not in (None, first)
        assert daemon.pid != first_pid
        with GioClient(session_bus.address) as gio:
            assert gio.name_owner(BUS_NAME) == daemon.owner
        assert daemon.runs == 2


def test_daemon_refuses_a_second_start_while_running(
        session_bus: PrivateBus, tmp_path: Path) -> None:
    with Daemon(session_bus.address, None, tmp_path, argv=FAKE) as daemon, \
            pytest.raises(RigError, match="already running"):
        daemon.start()


def test_daemon_stop_reports_a_daemon_that_ignores_sigterm(
        session_bus: PrivateBus, tmp_path: Path) -> None:
    stubborn = FAKE_DAEMON.replace(
        "GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, bye)",
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    assert stubborn != FAKE_DAEMON
    daemon = Daemon(session_bus.address, None, tmp_path, argv=[sys.executable, "-c", stubborn])
    daemon.start()
    try:
        with pytest.raises(RigError, match=r"did not exit within 0\.3 s of SIGTERM"):
            daemon.stop(timeout=0.3)
        assert daemon.returncode == -9
    finally:
        daemon.close(check=False)


def test_the_real_daemon_command_line() -> None:
    daemon = Daemon("unix:path=/x", Path("/sim"), Path("/state"), ["--verbose"])
    try:
        assert daemon.command == [sys.executable, "-m", "kho_agent.daemon", "--bus-address",
                                  "unix:path=/x", "--simulate", "/sim", "--state-dir", "/state",
                                  "--verbose"]
    finally:
        daemon.close()
