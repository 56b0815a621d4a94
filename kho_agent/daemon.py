"""kho-agentd: the live-update agent as a D-Bus service (org.khoagent.Agent1).

    kho-agentd [--bus system|session | --bus-address ADDR] [--simulate DIR] [--state-dir DIR]
               [--config-root DIR] [--check-config] [--claim-grace SECONDS] [--no-digests]

The configuration is /etc/kho-agent/agent.conf and its drop-ins (kho-agent.conf(5)), read once
at start; a command-line option overrides the file. A configuration that cannot be used stops
the start with exit 2 (ConfigInvalid, naming the file, line and key).

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
import faulthandler
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import gi
from gi.repository import Gio, GLib

from .about import VersionAction
from .config import AgentConfig, Setting, load_config
from .config.model import ENGINE_HANDOFF_NAME
from .config.parse import format_config
from .engine import Engine, EngineConfig
from .engine.phase import Phase
from .errors import AgentError, ConfigInvalid, DaemonUnreachable
from .kernel.host import Host, real_host
from .service import interfaces as api
from .service.auth import Authorizer
from .service.buses import bus_address, describe_bus
from .service.fdstore import NotifierSessionStore, take_stored_sessions
from .service.journal import LOG_ERR, Event, EventLog, failure_priority, short_line
from .service.manager import AgentService, Hooks, Job, Snapshot
from .service.metrics import DEFAULT_METRICS_DIR, MetricsInput, MetricsWriter
from .service.metrics import render as render_metrics
from .service.notify import Notifier
from .service.worker import Worker

DEFAULT_STATE_DIR = Path("/var/lib/kho-agent")
EXIT_OK = 0
EXIT_CANNOT_RUN = 2


def build_parser() -> argparse.ArgumentParser:
    """kho-agentd's command line (packaging/gen_manpages.py writes kho-agentd(8) from it)."""
    p = argparse.ArgumentParser(prog="kho-agentd", description=__doc__.splitlines()[0] if __doc__
                                else None)
    p.add_argument("--version", action=VersionAction)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--bus", choices=("system", "session"), default="system",
                       help="the bus to serve (default: system)")
    where.add_argument("--bus-address", metavar="ADDR", help="a private bus (tests)")
    p.add_argument("--simulate", type=Path, metavar="DIR",
                   help="run on the simulated kernel in DIR (created when absent)")
    p.add_argument("--state-dir", type=Path, metavar="DIR",
                   help=f"persisted state (default {DEFAULT_STATE_DIR}, or DIR/state with "
                        "--simulate)")
    p.add_argument("--config-root", type=Path, default=Path("/"), metavar="DIR",
                   help="read the configuration under DIR instead of / (DIR/etc/kho-agent/"
                        "agent.conf, ...; and Target=newest-compatible looks in DIR/boot)")
    p.add_argument("--check-config", action="store_true",
                   help="read the configuration, print it as it applies with this command "
                        "line's options (each key with the file and line, or the option, that "
                        "set it) and exit: 0 usable, 2 not (ConfigInvalid)")
    p.add_argument("--claim-grace", type=float, default=None, metavar="SECONDS",
                   help="after verify, how long retrieved sessions wait for their owners before "
                        "they are finished (0 or less: wait forever); overrides ClaimGraceSec= "
                        "(default 1800)")
    # where polkit is asked about unprivileged callers: the system bus (default when serving
    # it), the served bus itself (tests run a polkit Authority on their private bus), or nowhere
    # (only root may act)
    p.add_argument("--polkit-bus", choices=("system", "served", "none"), default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("--no-digests", action="store_true",
                   help="do not digest preserved memory by default (sessions may opt in); "
                        "overrides Digests=")
    p.add_argument("--metrics-dir", type=str, metavar="DIR", default=None,
                   help="write kho_agent.prom for node_exporter's textfile collector here; "
                        "overrides MetricsDirectory= (default "
                        f"{DEFAULT_METRICS_DIR}; off with --simulate unless the configuration "
                        "names one; '' turns it off)")
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def effective_config(args: argparse.Namespace) -> AgentConfig:
    """The configuration files under --config-root, then the command line's overrides: every
    option that overrides a key is applied here, so `--check-config` prints what the daemon
    would run with (and names the option as the key's origin)."""
    config = load_config(args.config_root)
    origins = dict(config.origins)
    if args.claim_grace is not None:
        config = replace(config, claim_grace_seconds=args.claim_grace
                         if args.claim_grace > 0 else None)
        origins["ClaimGraceSec"] = Setting("the command line (--claim-grace)", 0)
    if args.no_digests:
        config = replace(config, digests=False)
        origins["Digests"] = Setting("the command line (--no-digests)", 0)
    if args.metrics_dir is not None:
        # absolute, as MetricsDirectory= must be: the printed configuration parses back
        config = replace(config, metrics_directory=os.path.abspath(args.metrics_dir)
                         if args.metrics_dir else "")
        origins["MetricsDirectory"] = Setting("the command line (--metrics-dir)", 0)
    elif args.simulate is not None and "MetricsDirectory" not in origins:
        # the default is the real host's collector: a simulated host writes none there
        config = replace(config, metrics_directory="")
        origins["MetricsDirectory"] = Setting(
            "the command line (--simulate: no metrics unless a file or --metrics-dir names a "
            "directory)", 0)
    return replace(config, origins=tuple(origins.items()))


def engine_config(config: AgentConfig, state_dir: Path) -> EngineConfig:
    return EngineConfig(
        state_dir=state_dir, digests=config.digests, scratch_margin=config.scratch_margin,
        claim_grace_seconds=config.claim_grace_seconds,
        handoff_required=ENGINE_HANDOFF_NAME.get(config.handoff_mode, "auto"),
        maintenance_window=config.maintenance_window,
        history_max_entries=config.history_max_entries,
        setting_origins=tuple((key, str(where)) for key, where in config.origins))


def metrics_dir(config: AgentConfig) -> Path | None:
    """MetricsDirectory= of the effective configuration (--metrics-dir and --simulate applied
    by effective_config); "" turns metrics off."""
    return Path(config.metrics_directory) if config.metrics_directory else None


def _log_metrics_error(_written: bool | None, error: AgentError | None) -> None:
    if error is not None:
        log(f"metrics not written: {error.message}")


def build_host(args: argparse.Namespace) -> Host:
    if args.simulate is None:
        return real_host()
    from .sim import SimKernel

    directory: Path = args.simulate
    if (directory / "boot.json").exists():
        return SimKernel(directory).host()
    return SimKernel.create(directory).host()


def connect(args: argparse.Namespace) -> tuple[Gio.DBusConnection, Gio.DBusConnection | None]:
    """(the bus we serve, the system bus for polkit or None). A bus that cannot be reached is
    DaemonUnreachable ("no bus") naming the bus and the address tried."""
    if args.bus_address:
        flags = (Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT
                 | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION)
        bus = _connected("session", args.bus_address, lambda: Gio.DBusConnection
                         .new_for_address_sync(args.bus_address, flags, None, None))
    else:
        kind = Gio.BusType.SYSTEM if args.bus == "system" else Gio.BusType.SESSION
        bus = _connected(args.bus, None, lambda: Gio.bus_get_sync(kind, None))
    polkit = args.polkit_bus or ("system" if args.bus == "system" and not args.bus_address
                                 else "none")
    if polkit == "served":
        return bus, bus
    if polkit == "system":
        return bus, bus if args.bus == "system" and not args.bus_address else \
            _connected("system", None, lambda: Gio.bus_get_sync(Gio.BusType.SYSTEM, None))
    return bus, None


def _connected(kind: str, address: str | None,
               make: Callable[[], Gio.DBusConnection]) -> Gio.DBusConnection:
    try:
        return make()
    except GLib.Error as exc:
        where = describe_bus(kind, address, os.environ)
        advice = ("" if address or bus_address(kind, os.environ) else "; give one with "
                  "--bus-address (`dbus-daemon --session --fork --print-address` starts one "
                  "and prints its address)")
        raise DaemonUnreachable(f"cannot connect to {where}: {exc.message}{advice}") from exc


def log(text: str) -> None:
    print(f"kho-agentd: {text}", file=sys.stderr, flush=True)


def seconds_since_exec() -> float | None:
    """How long this process has run: after a kexec a VM manager waits on the agent's start, so
    the log says where it stands. /proc/self/stat's starttime counts clock ticks on
    CLOCK_BOOTTIME."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None
    return time.clock_gettime(time.CLOCK_BOOTTIME) - started


def log_started(what: str) -> None:
    since = seconds_since_exec()
    log(what if since is None else f"{what} ({since:.2f} s after exec)")


def _unix_signal_add(signum: int, handler: Callable[[int], bool]) -> None:
    """GLib's unix signal source: GLibUnix.signal_add where GLib has the namespace (2.80;
    PyGObject 3.58 warns that GLib.unix_signal_add is deprecated), else the old name."""
    try:
        gi.require_version("GLibUnix", "2.0")
        from gi.repository import GLibUnix
    except (ValueError, ImportError):  # bookworm's GLib 2.74 has no GLibUnix typelib
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, handler, signum)
        return
    GLibUnix.signal_add(GLib.PRIORITY_DEFAULT, signum, handler, signum)


class Daemon:
    def __init__(self, args: argparse.Namespace) -> None:
        log_started("start: modules loaded")
        self.args = args
        # first: a configuration that cannot be used stops the start (ConfigInvalid, exit 2)
        # before anything is touched
        self.config = effective_config(args)
        log("configuration: " + (", ".join(self.config.files) if self.config.files
                                 else "no file, the built-in defaults"))
        self.loop = GLib.MainLoop()
        self.exit_code = EXIT_OK
        # the signal that stopped the agent while an update was prepared (cancelled at exit)
        self.stopped_prepared_by: int | None = None
        self.boot_id: str | None = None  # this boot's, read at start
        self.host = build_host(args)
        state_dir = args.state_dir or (args.simulate / "state" if args.simulate
                                       else DEFAULT_STATE_DIR)
        self.service: AgentService | None = None
        directory = metrics_dir(self.config)
        self.metrics = MetricsWriter(directory, log) if directory is not None else None
        self.worker = Worker(log)
        self.notifier = Notifier.from_env()
        self.events = EventLog()
        fd_store = None
        if self.notifier.enabled and self.notifier.fdstore_max > 0:
            # the unit has an fd store (kho-agent-fdstore.conf): on a systemd that carries it
            # through the kexec, commit parks the sessions there (hand-off mode fdstore)
            fd_store = NotifierSessionStore(self.notifier)
        # after a kexec in mode fdstore, the incoming sessions come back from the store
        stored = take_stored_sessions(self.notifier.listen_fds(), log)
        if stored:
            log(f"the fd store handed back {len(stored)} session fd(s): "
                + ", ".join(sorted(stored)))
        self.engine = Engine(self.host, engine_config(self.config, state_dir),
            fd_store=fd_store, stored_sessions=stored,
            on_step_timed=lambda step, seconds: log(f"verify: {step}: {seconds:.2f} s"),
            on_history_note=lambda note: log(f"history: {note}"))

    def run(self) -> int:
        recovery = self.engine.start()
        self.boot_id = recovery.boot_id  # read by the recovery (all of sysinfo forks systemctl)
        log_started("start: state reconciled with this boot")
        log(f"state {recovery.phase.value}: {recovery.message or self.engine.state.message}")
        if recovery.disrupted:  # something ended halfway: the operator looks at it
            self.events.log_event(Event.RECOVERED, f"kho-agentd started in state "
                                  f"{recovery.phase.value}: {recovery.message}",
                                  state=recovery.phase.value)
        elif recovery.verify_pending:  # the normal path after a kexec: info
            log("started after a live update: verifying it")
        bus, polkit_bus = connect(self.args)
        # After the hand-off the bus goes away with the shutdown: the process must stay (it
        # holds the sessions until the kexec), so Gio must not exit it when the bus closes.
        bus.set_exit_on_close(False)
        bus.connect("closed", self._bus_closed)
        self.service = AgentService(bus, self.engine, Authorizer(bus, polkit_bus), self.worker,
                                    Hooks(state_changed=self._state_changed,
                                          job_finished=self._job_finished,
                                          handed_off=self._handed_off,
                                          discarded=self._discarded,
                                          incoming=self._incoming,
                                          inhibitors_changed=self._inhibitors_changed,
                                          log=log),
                                    self.config, self.args.config_root / "boot")
        # the properties are right from the first call: read them before owning the name
        self.service.snapshot = self.service._read_snapshot()
        log_started("start: connected, properties read")
        verify_now = recovery.verify_pending
        owner = Gio.bus_own_name_on_connection(
            bus, api.BUS_NAME, Gio.BusNameOwnerFlags.DO_NOT_QUEUE,
            lambda conn, name: self._name_acquired(verify_now),
            lambda conn, name: self._name_lost())
        for signum in (signal.SIGTERM, signal.SIGINT):
            _unix_signal_add(signum, self._on_signal)
        self.loop.run()
        self.notifier.stopping()
        Gio.bus_unown_name(owner)
        self.service.close()
        self.worker.shutdown()
        if self.stopped_prepared_by is not None:
            self._cancel_at_stop(self.stopped_prepared_by)
        self.engine.close()
        bus.flush_sync(None)
        return self.exit_code

    def _name_acquired(self, verify_now: bool) -> None:
        log_started(f"serving {api.BUS_NAME}"
                    + (" (simulated kernel)" if self.host.simulated else ""))
        assert self.service is not None
        state = self.engine.state
        self.notifier.ready(status=f"{state.phase.value}: {state.message}")
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            # pinged from the main loop: a loop that stops turning stops the pings
            GLib.timeout_add(max(1, int(interval * 1000)), self._watchdog)
        if verify_now:  # the verify job publishes the properties as it goes
            log("incoming live-update state found: verifying")
            self.service.start_verify()
        else:
            self.service.refresh()
        self._write_metrics()

    def _watchdog(self) -> bool:
        self.notifier.watchdog()
        return True

    def _parked(self) -> bool:
        """Handed off in mode fdstore: systemd holds the sessions, this process may end."""
        return self.service is not None and self.service.handed_off and bool(self.engine.parked)

    def _bus_closed(self, _conn: Gio.DBusConnection, _remote: bool, _error: object) -> None:
        if self._parked():
            log("the bus closed during the shutdown; the sessions are in systemd's fd store")
            self.loop.quit()
            return
        if self.service is not None and self.service.handed_off:
            log("the bus closed during the shutdown: holding the sessions until the kexec")
            return
        log("the bus connection closed; exiting (systemd restarts the service)")
        self.exit_code = 1
        self.loop.quit()

    def _name_lost(self) -> None:
        if self.service is not None and self.service.handed_off:
            return  # the bus is going down with the shutdown; the kexec follows
        log(f"cannot own {api.BUS_NAME} on the bus: another kho-agentd runs, or the bus policy "
            "(etc/dbus-1/system.d/org.khoagent.Agent1.conf) does not allow this user to own it")
        self.exit_code = EXIT_CANNOT_RUN
        self.loop.quit()

    def _state_changed(self, old: Snapshot, new: Snapshot) -> None:
        self.notifier.status(f"{new.state}: {new.message}")
        if old.state != new.state:
            log(f"state {new.state}: {new.message}")
        self._write_metrics()

    def _inhibitors_changed(self, held: tuple[str, ...]) -> None:
        self._write_metrics()

    def _write_metrics(self) -> None:
        """kho_agent.prom from the published state and the history, written beside the engine
        (the history is a file read) by the reader thread, which alone touches the writer."""
        writer, service = self.metrics, self.service
        if writer is None or service is None:
            return
        snap = service.snapshot
        data = (snap.state, snap.liveupdate_number, len(service.inhibitors))
        engine = self.engine

        def write() -> bool:
            return writer.write(render_metrics(MetricsInput(*data, engine.history().entries)))
        service.reader.submit(write, _log_metrics_error)

    def _job_finished(self, job: Job) -> None:
        self._write_metrics()  # a refused commit changes the history, not the state
        # one short line; the job's JSON result goes into the journal entry's fields
        detail = job.error_message or self.engine.state.message
        log(short_line(f"job {job.id} ({job.type}) {job.state}: {detail}"))
        target = self.engine.state.target
        fields: dict[str, str | None] = {
            "job": str(job.id), "job_type": job.type, "state": self.engine.state.phase.value,
            "target": target.kernel if target else "", "caller": job.caller or "kho-agentd",
            "result": job.result or None}
        if job.state != "done":
            if job.state == "failed":
                # a caller's refused or malformed request is not the agent failing
                priority = failure_priority(job.error)
                what = "failed" if priority <= LOG_ERR else f"refused for {fields['caller']}"
                self.events.log_event(Event.FAILED, f"{job.type} {what}: {job.error_message}",
                                      priority, error=job.error_name,
                                      error_message=job.error_message, **fields)
            return
        if job.type == "verify":
            if self.engine.state.phase is Phase.VERIFIED:
                self.events.log_event(Event.VERIFIED, "the live update is verified: every "
                                      "preserved item came back", **fields)
                summary = job.result
                self.worker.submit(lambda: self.notifier.start_verified_target(summary),
                                   self._verified_target_started)
            else:
                self.events.log_event(Event.FAILED, "the live update failed verification: "
                                      f"{self.engine.state.message}", **fields)
            return
        event = {"prepare": Event.PREPARED, "commit": Event.COMMITTED,
                 "cancel": Event.CANCELLED}.get(job.type)
        if event is not None and '"dry_run": true' not in job.result:
            self.events.log_event(event, f"{job.type} done: {self.engine.state.message}",
                                  **fields)

    def _verified_target_started(self, started: bool | None, error: AgentError | None) -> None:
        if error is not None:
            log(f"cannot start kho-agent-verified.target: {error.message}")

    def _incoming(self, now: list[str], held: list[str]) -> None:
        what = [f"{len(now)} incoming session(s) can be claimed"]
        if held:
            what.append(f"{len(held)} with digests once they are checked")
        log_started("verify: " + ", ".join(what))

    def _discarded(self, names: list[str]) -> None:
        self.events.log_event(Event.SESSION_DISCARDED, "finished unclaimed sessions after the "
                              f"grace period, their memory is discarded: {', '.join(names)}",
                              sessions=names)

    def _handed_off(self) -> None:
        if self.host.simulated:
            log("the simulated kernel kexec'd: this process ends as a real one would; start "
                "kho-agentd again to run as the next boot")
            GLib.timeout_add(200, self._quit)  # let JobRemoved reach the bus first
        elif self.engine.parked:
            log("handed off to the loaded kernel: the sessions are parked in systemd's fd store")
        else:
            log("handed off to the loaded kernel: holding the sessions until the kexec")

    def _quit(self) -> bool:
        self.loop.quit()
        return False

    def _on_signal(self, signum: int) -> bool:
        phase = self.engine.state.phase
        if self._parked():
            log(f"signal {signum} after the hand-off: the sessions are in systemd's fd store, "
                "exiting")
            self.loop.quit()
            return False
        if phase in (Phase.PREPARED, Phase.COMMITTING) \
                and self.engine.state.boot_id != self.boot_id:
            # the state is an earlier boot's: a kexec left it prepared or committing and its
            # verification has not run yet (refused until blake3 is installed, say). This
            # process holds nothing of that update, so there is nothing to hold through a
            # shutdown or to cancel; the sessions wait in the kernel for the next start
            log(f"signal {signum} with verification pending: exiting (the incoming sessions "
                "stay in the kernel for the next start's verification)")
            self.loop.quit()
            return False
        if self.service is not None and (self.service.handed_off or phase is Phase.COMMITTING):
            # systemd-shutdown may signal everyone on the way to the kexec: the sessions must
            # stay open until the kernel reboots
            log(f"signal {signum} while handing off: holding the sessions until the kexec")
            return True
        if phase in (Phase.PREPARED, Phase.PREPARING):
            # the sessions close with this process whatever it does: cancel the update at exit,
            # so that nothing stays loaded and the state says why (docs/systemd.md); a running
            # prepare is asked to roll back first, as Job.Cancel would
            self.stopped_prepared_by = signum
            if phase is Phase.PREPARING and self.service is not None:
                self.service.cancel_running_prepare()
        self.loop.quit()
        return False

    def _cancel_at_stop(self, signum: int) -> None:
        """Stopped while prepared: the session fds close with this process, so the update is
        cancelled now (the kernel unloaded, the manifest removed, the state idle with the
        reason) rather than found broken by the next start."""
        if self.engine.state.phase is not Phase.PREPARED:  # a prepare that did not finish
            return
        sessions = sorted(self.engine.outgoing_sessions())
        why = (f"kho-agentd was stopped (signal {signum}) while the update was prepared: its "
               "session fds closed with it and nothing is preserved any more; prepare again "
               "once it runs")
        try:
            message = self.engine.cancel(why)
        except AgentError as exc:
            message = f"cancelling failed: {exc.name}: {exc.message}"
        self.events.log_event(
            Event.STOPPED_PREPARED, f"stopped (signal {signum}) while prepared: "
            f"{len(sessions)} session(s) dropped ({', '.join(sessions) or 'none'}); {message}",
            state=self.engine.state.phase.value, sessions=sessions, signal=signum)


def main(argv: list[str] | None = None) -> int:
    # systemd's watchdog ends a stuck daemon with SIGABRT: the journal then shows where each
    # thread was (a main loop starved by a long call on another thread, say)
    faulthandler.enable(all_threads=True)
    args = parse_args(argv)
    if args.check_config:   # before a restart: a bad file would keep the agent down
        try:
            print(format_config(effective_config(args)), end="")
        except AgentError as exc:
            log(f"{exc.name}: {exc.message}")
            return exc.exit_code
        return EXIT_OK
    try:
        daemon = Daemon(args)
        return daemon.run()
    except ConfigInvalid as exc:
        # at err, with its own MESSAGE_ID: the unit does not restart on exit 2, so this entry
        # is what an operator finds
        EventLog().log_event(Event.CONFIG_INVALID, f"{exc.name}: {exc.message}",
                             error=exc.name)
        return exc.exit_code
    except DaemonUnreachable as exc:  # its own bus: the message names it
        log(exc.message)
        return exc.exit_code
    except AgentError as exc:
        log(f"{exc.name}: {exc.message}")
        return exc.exit_code
    except GLib.Error as exc:
        log(f"D-Bus: {exc.message}")
        return EXIT_CANNOT_RUN


if __name__ == "__main__":
    sys.exit(main())
