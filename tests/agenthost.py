"""A kho-agentd test host: a private system-type bus, a simulated kernel with a target image,
the daemon on both, and a polkit Authority stand-in on the same bus (polkitd is not installed
here; the daemon asks it with `--polkit-bus served`). Shared by the daemon test modules."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from dbusrig import (
    CONNECTION_FLAGS,
    DBUS_IFACE,
    DBUS_NAME,
    DBUS_PATH,
    MANAGER_IFACE,
    MANAGER_PATH,
    Daemon,
    GioClient,
    PrivateBus,
)
from gi.repository import Gio, GLib

from kho_agent.sim import SimAbi, SimKernel

SESSION_IFACE = "org.khoagent.Agent1.Session"
JOB_IFACE = "org.khoagent.Agent1.Job"
ERR = "org.khoagent.Agent1.Error."
PAGE = 4096

POLKIT_NAME = "org.freedesktop.PolicyKit1"
POLKIT_POLICY = f"""
  <policy user="root">
    <allow own="{POLKIT_NAME}"/>
  </policy>
  <policy context="default">
    <allow send_destination="{POLKIT_NAME}"/>
  </policy>
"""

AUTHORITY_XML = """
<node>
  <interface name="org.freedesktop.PolicyKit1.Authority">
    <method name="CheckAuthorization">
      <arg type="(sa{sv})" name="subject" direction="in"/>
      <arg type="s" name="action_id" direction="in"/>
      <arg type="a{ss}" name="details" direction="in"/>
      <arg type="u" name="flags" direction="in"/>
      <arg type="s" name="cancellation_id" direction="in"/>
      <arg type="(bba{ss})" name="result" direction="out"/>
    </method>
  </interface>
</node>
"""


class Authority:
    """A polkit Authority on the private bus: allows `grants[action]` uids, counts the
    questions by (uid, action), and answers `delay_ms` late (a busy polkitd)."""

    def __init__(self, address: str, grants: dict[str, set[int]], delay_ms: int = 0) -> None:
        self.grants = grants
        self.delay_ms = delay_ms
        self.asked: Counter[tuple[int, str]] = Counter()
        self.context = GLib.MainContext.new()
        self.loop = GLib.MainLoop.new(self.context, False)
        self.ready = threading.Event()
        self.failure: str | None = None
        self.thread = threading.Thread(target=self._run, args=(address,), daemon=True)
        self.thread.start()
        if not self.ready.wait(10) or self.failure:
            raise RuntimeError(f"the polkit stand-in did not start: {self.failure}")

    def _run(self, address: str) -> None:
        self.context.push_thread_default()
        try:
            conn = Gio.DBusConnection.new_for_address_sync(address, CONNECTION_FLAGS, None, None)
            info = Gio.DBusNodeInfo.new_for_xml(AUTHORITY_XML).interfaces[0]
            conn.register_object("/org/freedesktop/PolicyKit1/Authority", info, self._call,
                                 None, None)
            reply = conn.call_sync(DBUS_NAME, DBUS_PATH, DBUS_IFACE, "RequestName",
                                   GLib.Variant("(su)", (POLKIT_NAME, 4)), None,
                                   Gio.DBusCallFlags.NONE, 5000, None)
            if reply.unpack()[0] != 1:
                self.failure = f"could not own {POLKIT_NAME}"
        except GLib.Error as exc:
            self.failure = exc.message
        self.ready.set()
        if self.failure is None:
            self.loop.run()
            conn.close_sync(None)
        self.context.pop_thread_default()

    def _call(self, conn: Gio.DBusConnection, _sender: str, _path: str, _iface: str,
              _method: str, params: GLib.Variant, invocation: Gio.DBusMethodInvocation) -> None:
        (_kind, details), action, _d, _flags, _cancel = params.unpack()
        try:
            uid = conn.call_sync(DBUS_NAME, DBUS_PATH, DBUS_IFACE, "GetConnectionUnixUser",
                                 GLib.Variant("(s)", (details["name"],)), None,
                                 Gio.DBusCallFlags.NONE, 5000, None).unpack()[0]
        except (GLib.Error, KeyError) as exc:
            invocation.return_dbus_error("org.freedesktop.PolicyKit1.Error.Failed", str(exc))
            return
        self.asked[(uid, action)] += 1
        answer = GLib.Variant("((bba{ss}))", ((uid in self.grants.get(action, set()), False,
                                               {}),))
        if not self.delay_ms:
            invocation.return_value(answer)
            return

        def later(*_: object) -> bool:
            invocation.return_value(answer)
            return False
        source = GLib.timeout_source_new(self.delay_ms)
        source.set_callback(later)
        source.attach(self.context)

    def stop(self) -> None:
        self.loop.quit()
        self.thread.join(5)


@dataclass
class Host:
    """A private bus, a simulated host with a target kernel image, and the daemon on both."""

    bus: PrivateBus
    sim_dir: Path
    state_dir: Path
    target: Path
    daemon: Daemon
    clients: list[GioClient] = field(default_factory=list)

    def client(self) -> GioClient:
        client = GioClient(self.bus.address)
        self.clients.append(client)
        return client

    def prop(self, name: str, path: str = MANAGER_PATH, iface: str = MANAGER_IFACE) -> Any:
        return self.client().get_property(path, iface, name)

    def run_job(self, client: GioClient, method: str, options: dict[str, GLib.Variant] | None
                = None) -> tuple[str, dict[str, Any]]:
        """Start a job; wait for its JobRemoved; return (result, the Job's properties)."""
        with client.catch_signal("JobRemoved") as removed:
            if method in ("Cancel", "Verify"):
                (job,) = invoke(client, method)
            else:
                (job,) = invoke(client, method, "a{sv}", (options or {},))
            _id, _path, result = removed.wait(30, lambda args: args[1] == job)
        props = {name: client.get_property(job, JOB_IFACE, name)
                 for name in ("Type", "State", "Progress", "Result", "ErrorName",
                              "ErrorMessage")}
        return result, props

    def wait_state(self, *states: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = str(self.prop("State"))
            if state in states:
                return state
            time.sleep(0.05)
        raise AssertionError(f"State never became {states}; daemon stderr:\n"
                             f"{self.daemon.stderr_text()}")

    def restart_wait_exit(self) -> None:
        """After a simulated kexec the old daemon exits by itself."""
        deadline = time.monotonic() + 10
        while self.daemon.returncode is None and time.monotonic() < deadline:
            time.sleep(0.02)
        self.daemon.stop()

    def restart(self) -> None:
        """The next boot."""
        self.restart_wait_exit()
        self.daemon.start()


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    sim_dir = tmp_path / "sim"
    sim = SimKernel.create(sim_dir)
    target = sim.write_kernel_image(tmp_path / "vmlinuz-7.3.1-sim", release="7.3.1-sim",
                                    abi=SimAbi())
    with PrivateBus(extra_policy=POLKIT_POLICY) as bus:
        daemon = Daemon(bus.address, sim_dir, tmp_path / "state", ["--polkit-bus", "served"])
        with daemon:
            rig = Host(bus, sim_dir, tmp_path / "state", target, daemon)
            try:
                yield rig
            finally:
                for client in rig.clients:
                    client.close()


def invoke(client: GioClient, method: str, signature: str = "",
           values: tuple[Any, ...] = ()) -> tuple[Any, ...]:
    """A Manager method call without fds: the unpacked reply."""
    return client.call_values(MANAGER_PATH, MANAGER_IFACE, method, signature, values)[0]


def memfd(data: bytes) -> int:
    fd = os.memfd_create("guest", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    return fd


def create_session(client: GioClient, name: str, files: dict[int, bytes],
                   options: dict[str, GLib.Variant] | None = None) -> str:
    if options is None:
        reply, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "CreateSession",
                                 GLib.Variant("(s)", (name,)))
    else:
        reply, fds = client.call(MANAGER_PATH, MANAGER_IFACE, "CreateSessionWithOptions",
                                 GLib.Variant("(sa{sv})", (name, options)))
    path, _handle = reply.unpack()
    assert len(fds) == 1
    os.fstat(fds[0])  # a real descriptor arrived
    os.close(fds[0])
    for token, data in files.items():
        fd = memfd(data)
        try:
            client.call(MANAGER_PATH, MANAGER_IFACE, "Preserve",
                        GLib.Variant("(sht)", (name, 0, token)), fds=[fd])
        finally:
            os.close(fd)
    invoke(client, "SetReady", "sb", (name, True))
    return str(path)


def kernel_option(host: Host) -> dict[str, GLib.Variant]:
    return {"kernel": GLib.Variant("s", str(host.target))}
