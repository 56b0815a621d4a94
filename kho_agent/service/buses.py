"""Which D-Bus bus a name means, and how to get a kho-agentd onto one: shared by kho-agentd (its
"cannot connect" names the bus and the address it tried) and kho-agentctl (its "not running"
advice is a command that works on this host).

GLib finds the buses as libdbus does: the system bus at $DBUS_SYSTEM_BUS_ADDRESS or the fixed
socket; the session bus at $DBUS_SESSION_BUS_ADDRESS, else $XDG_RUNTIME_DIR/bus when that socket
exists, else X11 autolaunch (never there for root on a server). A root shell on a server has no
session bus at all, and a container or a host without the package has no kho-agent.service: the
advice says what is there, not what a desktop would have.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

SYSTEM_BUS_DEFAULT = "unix:path=/run/dbus/system_bus_socket"
UNIT = "kho-agent.service"
# where systemd looks for units (systemd.unit(5)), most specific first
UNIT_DIRS = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
             "/usr/lib/systemd/system", "/lib/systemd/system")
# a bus of its own and the simulated kernel: needs only dbus-daemon (the dbus package)
TRIAL = ('`ADDR=$(dbus-daemon --session --fork --print-address)`, then '
         '`kho-agentd --bus-address "$ADDR" --simulate DIR &` (DIR: the simulated host, created '
         'when absent; it is ready when it logs "serving"), then '
         '`kho-agentctl --bus-address "$ADDR" status`')


def bus_address(kind: str, environ: Mapping[str, str]) -> str | None:
    """The address GLib connects to for the `kind` ("system" or "session") bus; None: no
    session bus can be found (GLib would try X11 autolaunch, which fails without $DISPLAY)."""
    if kind == "system":
        return environ.get("DBUS_SYSTEM_BUS_ADDRESS") or SYSTEM_BUS_DEFAULT
    if environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return environ["DBUS_SESSION_BUS_ADDRESS"]
    runtime = environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.exists(os.path.join(runtime, "bus")):
        return f"unix:path={os.path.join(runtime, 'bus')}"
    return None


def describe_bus(kind: str, address: str | None, environ: Mapping[str, str]) -> str:
    """The bus meant, with the address tried and where that address came from."""
    if address:
        return f"the bus at {address}"
    found = bus_address(kind, environ)
    if kind == "system":
        origin = ("DBUS_SYSTEM_BUS_ADDRESS" if environ.get("DBUS_SYSTEM_BUS_ADDRESS")
                  else "the default; DBUS_SYSTEM_BUS_ADDRESS is not set")
        return f"the system bus at {found} ({origin})"
    if found is None:
        return ("the session bus, which this process has none of (DBUS_SESSION_BUS_ADDRESS is "
                "not set and there is no $XDG_RUNTIME_DIR/bus: no login session)")
    origin = ("DBUS_SESSION_BUS_ADDRESS" if environ.get("DBUS_SESSION_BUS_ADDRESS")
              else "$XDG_RUNTIME_DIR/bus")
    return f"the session bus at {found} ({origin})"


@dataclass(frozen=True)
class StartFacts:
    """What decides how kho-agentd can be started here."""

    systemd_running: bool          # PID 1 is systemd (sd_booted(): /run/systemd/system)
    unit_installed: bool           # kho-agent.service is in one of systemd's unit directories
    session_bus: bool              # this process has a session bus to point a daemon at

    @classmethod
    def probe(cls, environ: Mapping[str, str]) -> StartFacts:
        return cls(systemd_running=os.path.isdir("/run/systemd/system"),
                   unit_installed=any(os.path.exists(os.path.join(d, UNIT)) for d in UNIT_DIRS),
                   session_bus=bus_address("session", environ) is not None)


def start_advice(kind: str, address: str | None, facts: StartFacts) -> str:
    """How to get a kho-agentd onto the bus meant, in commands that work on this host."""
    if address:
        return (f"start it with `kho-agentd --bus-address {address} --simulate DIR` (the "
                "simulated kernel; DIR: the simulated host, created when absent)")
    if kind == "session":
        if facts.session_bus:
            return ("start it with `kho-agentd --bus session --simulate DIR` (the simulated "
                    "kernel; DIR: the simulated host, created when absent)")
        return ("this process has no session bus; try the simulated kernel on a bus of its "
                f"own: {TRIAL}")
    if not facts.systemd_running:
        real = ("this host does not run systemd, so there is no kho-agent.service to start: run "
                "`kho-agentd` as root (it serves the system bus)")
    elif not facts.unit_installed:
        real = (f"{UNIT} is not installed on this host: install kho-agent (its package installs "
                "and enables the unit), then `systemctl start kho-agent`")
    else:
        real = "start it with `systemctl start kho-agent`"
    return f"{real}; or try the simulated kernel on a bus of its own: {TRIAL}"
