"""kho-agentd: the live-update agent as a D-Bus service (org.khoagent.Agent1).

    kho-agentd [--bus system|session | --bus-address ADDR] [--simulate DIR] [--state-dir DIR]
               [--claim-grace SECONDS] [--no-digests]

At start it reconciles its persisted state with this boot; after a live update it verifies on
its own (a Verify job anyone can watch) and keeps the retrieved sessions for their owners. The
GLib main loop only answers the bus: the engine runs on one worker thread.

Run under systemd as `ExecStart=@/usr/bin/python3 @kho-agentd -m kho_agent.daemon` (see
docs/systemd.md): the `@` keeps systemd-shutdown from killing it while it holds the sessions
on the way to the kexec. In `--simulate DIR` mode the host is the simulated kernel in DIR; a
commit there ends this process, as a real kexec would, and the next start is the next boot.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from gi.repository import Gio, GLib

from .errors import AgentError
from .kernel.host import Host, real_host
from .orchestrator import EngineConfig, Orchestrator
from .service import interfaces as api
from .service.auth import Authorizer
from .service.manager import AgentService, Hooks, Job, Snapshot
from .service.worker import Worker
from .statefile import Phase

DEFAULT_STATE_DIR = Path("/var/lib/kho-agent")
EXIT_OK = 0
EXIT_CANNOT_RUN = 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kho-agentd", description=__doc__.splitlines()[0] if __doc__
                                else None)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--bus", choices=("system", "session"), default="system")
    where.add_argument("--bus-address", metavar="ADDR", help="a private bus (tests)")
    p.add_argument("--simulate", type=Path, metavar="DIR",
                   help="run on the simulated kernel in DIR (created when absent)")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help=f"persisted state (default {DEFAULT_STATE_DIR}, or DIR/state with "
                        "--simulate)")
    p.add_argument("--claim-grace", type=float, default=1800.0, metavar="SECONDS",
                   help="after verify, how long retrieved sessions wait for their owners before "
                        "they are finished (0 or less: wait forever); default 1800")
    # where polkit is asked about unprivileged callers: the system bus (default when serving
    # it), the served bus itself (tests run a polkit Authority on their private bus), or nowhere
    # (only root may act)
    p.add_argument("--polkit-bus", choices=("system", "served", "none"), default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--no-digests", action="store_true",
                   help="do not digest preserved memory by default (sessions may opt in)")
    return p.parse_args(argv)


def build_host(args: argparse.Namespace) -> Host:
    if args.simulate is None:
        return real_host()
    from .sim import SimKernel

    directory: Path = args.simulate
    if (directory / "boot.json").exists():
        return SimKernel(directory).host()
    return SimKernel.create(directory).host()


def connect(args: argparse.Namespace) -> tuple[Gio.DBusConnection, Gio.DBusConnection | None]:
    """(the bus we serve, the system bus for polkit or None)."""
    if args.bus_address:
        flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                 | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
        bus = Gio.DBusConnection.new_for_address_sync(args.bus_address, flags, None, None)
    else:
        kind = Gio.BusType.SYSTEM if args.bus == "system" else Gio.BusType.SESSION
        bus = Gio.bus_get_sync(kind, None)
    polkit = args.polkit_bus or ("system" if args.bus == "system" and not args.bus_address
                                 else "none")
    if polkit == "served":
        return bus, bus
    if polkit == "system":
        return bus, bus if args.bus == "system" and not args.bus_address else \
            Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
    return bus, None


def log(text: str) -> None:
    print(f"kho-agentd: {text}", file=sys.stderr, flush=True)


class Daemon:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.loop = GLib.MainLoop()
        self.exit_code = EXIT_OK
        self.host = build_host(args)
        state_dir = args.state_dir or (args.simulate / "state" if args.simulate
                                       else DEFAULT_STATE_DIR)
        grace = args.claim_grace if args.claim_grace > 0 else None
        self.agent = Orchestrator(self.host, EngineConfig(
            state_dir=state_dir, digests=not args.no_digests, claim_grace_seconds=grace))
        self.service: AgentService | None = None
        self.worker = Worker(log)

    def run(self) -> int:
        recovery = self.agent.start()
        log(f"state {recovery.phase.value}: {recovery.message or self.agent.state.message}")
        bus, polkit_bus = connect(self.args)
        self.service = AgentService(bus, self.agent, Authorizer(bus, polkit_bus), self.worker,
                                    Hooks(state_changed=self._state_changed,
                                          job_finished=self._job_finished,
                                          handed_off=self._handed_off, log=log))
        verify_now = recovery.verify_pending
        owner = Gio.bus_own_name_on_connection(
            bus, api.BUS_NAME, Gio.BusNameOwnerFlags.DO_NOT_QUEUE,
            lambda conn, name: self._name_acquired(verify_now),
            lambda conn, name: self._name_lost())
        for signum in (signal.SIGTERM, signal.SIGINT):
            GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, self._on_signal, signum)
        self.loop.run()
        Gio.bus_unown_name(owner)
        self.service.close()
        self.worker.shutdown()
        self.agent.close()
        bus.flush_sync(None)
        return self.exit_code

    def _name_acquired(self, verify_now: bool) -> None:
        log(f"serving {api.BUS_NAME}" + (" (simulated kernel)" if self.host.simulated else ""))
        assert self.service is not None
        self.service.refresh()
        if verify_now:
            log("incoming live-update state found: verifying")
            self.service.start_verify()

    def _name_lost(self) -> None:
        log(f"cannot own {api.BUS_NAME} on the bus: another kho-agentd runs, or the bus policy "
            "(etc/dbus-1/system.d/org.khoagent.Agent1.conf) does not allow this user to own it")
        self.exit_code = EXIT_CANNOT_RUN
        self.loop.quit()

    def _state_changed(self, old: Snapshot, new: Snapshot) -> None:
        if old.state != new.state:
            log(f"state {new.state}: {new.message}")

    def _job_finished(self, job: Job) -> None:
        detail = job.error_message if job.error_message else job.result
        log(f"job {job.id} ({job.type}) {job.state}: {detail}")

    def _handed_off(self) -> None:
        if self.host.simulated:
            log("the simulated kernel kexec'd: this process ends as a real one would; start "
                "kho-agentd again to run as the next boot")
            GLib.timeout_add(200, self._quit)  # let JobRemoved reach the bus first
        else:
            log("handed off to the loaded kernel: holding the sessions until the kexec")

    def _quit(self) -> bool:
        self.loop.quit()
        return False

    def _on_signal(self, signum: int) -> bool:
        phase = self.agent.state.phase
        if self.service is not None and (self.service.handed_off or phase is Phase.COMMITTING):
            # systemd-shutdown may signal everyone on the way to the kexec: the sessions must
            # stay open until the kernel reboots
            log(f"signal {signum} while handing off: holding the sessions until the kexec")
            return True
        if phase is Phase.PREPARED:
            log(f"signal {signum}: stopping while prepared; the sessions close with this process "
                "and nothing stays preserved (the next start reports it cancelled)")
        self.loop.quit()
        return False


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        daemon = Daemon(args)
        return daemon.run()
    except AgentError as exc:
        log(f"{exc.name}: {exc.message}")
        return exc.exit_code
    except GLib.Error as exc:
        log(f"cannot connect to the bus: {exc.message}")
        return EXIT_CANNOT_RUN


if __name__ == "__main__":
    sys.exit(main())
