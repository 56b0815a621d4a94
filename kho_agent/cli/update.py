"""`kho-agentctl update`: one live update under the host's configuration, from choosing the
target to the commit (what kho-agent-update.service runs, unattended or started by a fleet tool).

    kho-agentctl update [--kernel IMAGE [--initrd FILE]] [--ready-timeout SECONDS] [--check]

1. The target is resolved and checked by a Prepare dry run (without --kernel: the daemon's
   Target=, kho-agent.conf(5)), which changes nothing.
2. An update already prepared (or running) is left alone: Busy (the dry run's
   `prepare_refused`, or the daemon's refusal of the dry run while a job runs).
3. A target that is the kernel running (same release and `uname -v`) is "up-to-date": exit 0,
   nothing done.
4. Refused before anything changes, with the error the commit or the prepare would meet: an
   inhibitor held (Inhibited), outside MaintenanceWindow= or a hand-off mode other than
   HandoffMode= (PreflightFailed), then what the prepare would refuse (the dry run's
   `prepare_refused`, from the daemon's own checks): a preflight blocker (PreflightFailed), a
   command line the next kernel would not take (InvalidArgument). `--check` ends here
   ("would-update").
5. Prepare, then wait (at most --ready-timeout, default [Update] ReadyTimeoutSec=) until a
   Commit dry run passes: every client session ready. A timeout, or any refusal after the
   prepare, cancels the update (the sessions' owners are told with SessionReleased, as by
   `kho-agentctl cancel`) and fails with the error; so does SIGTERM (`systemctl stop`). A
   prepare still running after --timeout is cancelled (Job.Cancel) before update fails.
6. Commit: the kexec ends this process with the host. A commit refused (or whose job failed)
   is cancelled as above; one whose outcome is unknown (still running after --timeout, a
   daemon that does not answer) never: the kexec may be under way. The proof is read in the
   next kernel (`kho-agentctl status --json`, `verify --json`, `history --json`).

With --json the envelope's result is the UpdateReport below, also beside an error (how far the
update went: `stage`, and whether it cancelled what it had prepared: `cancelled`).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from gi.repository import Gio

from ..config.model import DEFAULT_READY_TIMEOUT_SECONDS
from ..config.parse import READY_TIMEOUT_MAX
from ..errors import (
    AgentError,
    Busy,
    Cancelled,
    Interrupted,
    InvalidArgument,
    JobNotFinished,
)
from ..service import interfaces as api
from ..service.errors import DaemonNotResponding, DaemonUnreachable, from_dbus
from .bus import (
    DBUS_IFACE,
    DBUS_NAME,
    DBUS_PATH,
    DEFAULT_JOB_TIMEOUT,
    PROPERTIES_IFACE,
    AgentClient,
    Deadline,
    JobInfo,
    Progress,
    SignalWatch,
    Subscription,
    TargetFiles,
    add_timeout_option,
    iterate_until,
    open_target_files,
    options,
)
from .common import EXIT_OK, print_json
from .jobs import ProgressView, add_common_options
from .stops import StopRequested, StopRequests

HELP = "perform one live update under the host's configuration: check, prepare, wait, commit"
LABEL = "kho-agentctl update"
# without news from the daemon, readiness is asked again this often (a signal missed while
# the bus was busy must not cost the whole timeout)
RECHECK_SECONDS = 15.0


def ready_seconds(text: str) -> float:
    """--ready-timeout's value: seconds, 0 .. 24 h (as ReadyTimeoutSec=)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 <= value <= READY_TIMEOUT_MAX:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds from 0 to "
                                         f"{READY_TIMEOUT_MAX:g}")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ". Exit 0 committed (the kexec "
                       "follows), up to date, or with --check would update; 2 cannot run; 3 "
                       "refused (an update already prepared, an inhibitor, outside the "
                       "maintenance window, a preflight blocker, clients not ready in time: "
                       "what it prepared is cancelled); 4 the kernel refused.")
    p.add_argument("--kernel", metavar="IMAGE",
                   help="the next kernel's image; without it, the daemon's Target= "
                        "(kho-agent.conf(5))")
    p.add_argument("--initrd", metavar="FILE", help="its initrd (only with --kernel)")
    p.add_argument("--ready-timeout", type=ready_seconds, default=None, metavar="SECONDS",
                   help="how long to wait after the prepare for every client session to be "
                        "ready, then cancel (default: [Update] ReadyTimeoutSec= of "
                        "kho-agent.conf(5), 10 min unless set)")
    p.add_argument("--check", action="store_true",
                   help="only say what update would do (resolve, compare with the running "
                        "kernel, preflight, the refusals); prepare nothing")
    add_common_options(p, job=True)
    add_timeout_option(p, DEFAULT_JOB_TIMEOUT, "each call and each job (the prepare, the "
                       "commit); the wait for the clients is --ready-timeout's")
    p.set_defaults(run=run)


@dataclass
class UpdateReport:
    """`update --json`'s result. `outcome`: "up-to-date", "would-update" (--check) or
    "committing"; None when the update failed (the envelope's `error` says why). `stage`: how
    far it went: "check" (nothing changed), "prepare", "wait", "commit"."""

    outcome: str | None = None
    running: dict[str, str | None] = field(
        default_factory=lambda: {"release": None, "version": None})
    target: dict[str, str | None] | None = None
    live_update_number: int = 0
    preflight: dict[str, Any] | None = None
    waited_ready_s: float | None = None
    stage: str = "check"
    cancelled: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "running": self.running, "target": self.target,
                "live_update_number": self.live_update_number, "preflight": self.preflight,
                "waited_ready_s": self.waited_ready_s, "stage": self.stage,
                "cancelled": self.cancelled}


def say(text: str) -> None:
    """A step, on stderr (the journal of kho-agent-update.service)."""
    print(f"{LABEL}: {text}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- jobs

def run_job(client: AgentClient, timeout: float, method: str, opts: dict[str, Any] | None,
            fds: Sequence[int] = (), progress: str | None = None,
            started: Progress | None = None) -> JobInfo:
    """Start a job and follow it to its end (each job gets the whole --timeout); a job that
    failed or was cancelled raises its error. `started` sees the job as soon as it exists
    (before its end: a job that outlives the wait is still known)."""
    client.deadline = Deadline.after(timeout)
    signatures = {"Prepare": api.PREPARE_OPTIONS, "Commit": api.COMMIT_OPTIONS}
    wrapped = options(opts, signatures[method]) if opts is not None else None
    view = ProgressView(progress, sys.stderr) if progress else None

    def on_progress(job: JobInfo) -> None:
        if started is not None:
            started(job)
        if view is not None:
            view.update(job)
    try:
        job = client.start_job(method, wrapped, fds=fds, on_progress=on_progress)
    finally:
        if view is not None:
            view.finish()
    if job.state == api.JOB_FAILED:
        raise job.error()
    if job.state == api.JOB_CANCELED:
        raise Cancelled(f"the {method.lower()} job was cancelled by another caller")
    return job


def commit_refusal(client: AgentClient, timeout: float) -> AgentError | None:
    """What a Commit dry run says now: None (it would go ahead), or its error."""
    try:
        run_job(client, timeout, "Commit", {"dry_run": True})
    except AgentError as exc:
        return exc
    return None


def cancel(client: AgentClient, timeout: float, report: UpdateReport) -> None:
    """Undo what this update prepared (the sessions' owners get SessionReleased). A cancel
    that fails is said, and the update's own error is still the one reported."""
    try:
        run_job(client, timeout, "Cancel", None)
    except AgentError as exc:
        say(f"could not cancel the prepared update ({exc.name}: {exc.message}); run "
            "`kho-agentctl cancel`")
        return
    report.cancelled = True
    say("cancelled the update it had prepared; the clients' owners were told "
        "(SessionReleased)")


def prepare(client: AgentClient, timeout: float, files: TargetFiles,
            report: UpdateReport) -> dict[str, Any]:
    """The Prepare, followed to its end; its result. One still running when the wait ends
    (--timeout) is cancelled: update must not leave behind a prepared host it gave up on."""
    jobs: list[str] = []

    def started(job: JobInfo) -> None:
        if not jobs:
            jobs.append(job.path)
    try:
        job = run_job(client, timeout, "Prepare", dict(files.options), files.fds,
                      progress="prepare", started=started)
    except JobNotFinished as exc:
        if not jobs:  # the job never said it existed: nothing to cancel
            raise
        why = (f"--timeout {timeout:g} s" if client.deadline.passed() else exc.message)
        raise JobNotFinished(f"the prepare did not finish ({why}); "
                             + abandon_prepare(client, jobs[0], timeout, report)) from None
    result: dict[str, Any] = job.result_json() or {}
    return result


def abandon_prepare(client: AgentClient, path: str, timeout: float,
                    report: UpdateReport) -> str:
    """Cancel a prepare still running (Job.Cancel: it rolls back at its next step and the
    clients' sessions stay as they were), then follow it to its end (at most `timeout`);
    what became of it, as the end of a sentence. One that ended just before the cancel
    reached it is undone as any prepared update (Manager.Cancel, the owners told)."""
    client.deadline = Deadline.after(timeout)
    say(f"the prepare did not finish in time: cancelling it ({path})")
    try:
        client.call(path, api.JOB_IFACE, "Cancel", reply_type="()")
    except Busy:
        pass  # it has ended meanwhile: how, the job says below
    except AgentError as exc:
        return (f"it could not be cancelled ({exc.name}: {exc.message}): see `kho-agentctl "
                "jobs`; once it has ended, `kho-agentctl cancel` undoes it")
    try:
        job = client.follow(path, on_progress=lambda _job: None)
    except AgentError as exc:
        return (f"kho-agentd was asked to cancel it, but it had not ended when update last "
                f"looked ({exc.name}: {exc.message}); a cancelled prepare rolls back at its "
                "next step and the clients' sessions stay: see `kho-agentctl status`")
    if job.state == api.JOB_CANCELED:
        report.cancelled = True
        return "it was cancelled: nothing is prepared, the clients' sessions are as they were"
    if job.state == api.JOB_FAILED:
        err = job.error()
        return f"it failed meanwhile ({err.name}: {err.message}): nothing is prepared"
    cancel(client, timeout, report)  # done just before the cancel came
    return ("it ended just before the cancel and was cancelled then" if report.cancelled
            else "it ended just before the cancel and could NOT be cancelled: run "
            "`kho-agentctl cancel`")


# ---------------------------------------------------------------------------------- waiting

class ChangeWatch(SignalWatch):
    """Wakes the wait for readiness when something it depends on may have changed: a
    session's properties (Ready), a session released, the Manager's properties (State,
    Inhibitors), the daemon leaving the bus. Subscribed before the first look."""

    def __init__(self, connection: Gio.DBusConnection) -> None:
        super().__init__(connection)
        self.seen = False

    def subscriptions(self) -> list[Subscription]:
        return [
            (api.BUS_NAME, PROPERTIES_IFACE, "PropertiesChanged", None, api.SESSION_IFACE,
             self._on_signal),
            (api.BUS_NAME, PROPERTIES_IFACE, "PropertiesChanged", api.MANAGER_PATH,
             api.MANAGER_IFACE, self._on_signal),
            (api.BUS_NAME, api.MANAGER_IFACE, "SessionReleased", api.MANAGER_PATH, None,
             self._on_signal),
            (DBUS_NAME, DBUS_IFACE, "NameOwnerChanged", DBUS_PATH, api.BUS_NAME,
             self._on_signal),
        ]

    def _on_signal(self, *_args: object) -> None:
        self.seen = True

    def wait(self, seconds: float, stopped: Callable[[], bool]) -> None:
        """Until a change is seen, stopped() or `seconds` passed."""
        iterate_until(self.context, lambda: self.seen or stopped(), Deadline.after(seconds))
        self.seen = False


def wait_ready(client: AgentClient, timeout: float, ready_timeout: float,
               stops: StopRequests) -> float:
    """Until a Commit dry run passes (every client session ready), at most `ready_timeout`
    seconds; the seconds waited. A refusal other than Busy ends the wait with it; the timeout
    is Busy naming the sessions that were not ready. A stop request interrupts the waiting
    between two looks, never a call or a job (a dry run still running would keep the cancel
    that follows from starting)."""
    start = time.monotonic()
    end = start + ready_timeout
    announced = False
    with ChangeWatch(client.connection) as watch:
        while True:
            stops.check()
            client.deadline = Deadline.after(timeout)
            waiting = [s.name for s in client.list_sessions() if not s.incoming and not s.ready]
            busy = ""
            if not waiting:
                refusal = commit_refusal(client, timeout)
                if refusal is None:
                    return round(time.monotonic() - start, 3)
                if not isinstance(refusal, Busy):
                    raise refusal
                busy = refusal.message  # a session turned unready, another job: look again
            remaining = end - time.monotonic()
            if remaining <= 0:
                what = (f"session(s) not ready: {', '.join(waiting)}" if waiting
                        else f"kho-agentd was busy: {busy}")
                raise Busy(f"{what} after {ready_timeout:g} s (--ready-timeout, [Update] "
                           "ReadyTimeoutSec=); the update was not committed")
            if not announced and waiting:
                say(f"waiting up to {ready_timeout:g} s for session(s) to be ready: "
                    f"{', '.join(waiting)}")
                announced = True
            watch.wait(min(remaining, RECHECK_SECONDS), lambda: stops.requested is not None)


# ---------------------------------------------------------------------------------- the command

def run(args: argparse.Namespace) -> int:
    if args.initrd is not None and args.kernel is None:
        raise InvalidArgument("--initrd needs --kernel (the configured Target= brings its own)")
    report = UpdateReport()
    try:
        code = update(args, report)
    finally:
        # the document also when the update failed: how far it went, beside the error
        if args.json:
            print_json(report.to_json())
    if not args.json:
        print(render(report))
    return code


def render(report: UpdateReport) -> str:
    running = report.running.get("release") or "?"
    target = report.target or {}
    to = f"{target.get('release') or '?'} ({target.get('kernel') or '?'})"
    if report.outcome == "up-to-date":
        return f"up to date: the running kernel {running} is the target {to}; nothing was done"
    if report.outcome == "would-update":
        verdict = (report.preflight or {}).get("verdict", "?")
        return (f"would update: {running} -> {to}, preflight {verdict}; nothing was changed "
                "(--check)")
    return (f"committing: {running} -> {to} after {report.waited_ready_s or 0:g} s waiting for "
            "the clients; the host reboots into it (afterwards: `kho-agentctl status`, "
            "`kho-agentctl verify`)")


def update(args: argparse.Namespace, report: UpdateReport) -> int:
    with ExitStack() as stack:
        # opened here, with our rights, before anything is asked (as prepare does)
        files = open_target_files(args.kernel, args.initrd, stack)
        client = stack.enter_context(AgentClient.from_args(args))
        code = update_on(client, args, report, files)
    return code


def update_on(client: AgentClient, args: argparse.Namespace, report: UpdateReport,
              files: TargetFiles) -> int:
    """The steps of the module's docstring, on a connected client."""
    props = client.manager_properties()
    report.running["release"] = props.get("RunningKernel") or None
    report.live_update_number = int(props.get("LiveUpdateNumber", 0))
    ready_timeout = args.ready_timeout
    if ready_timeout is None:
        usec = props.get("ReadyTimeoutUSec")
        ready_timeout = usec / 1e6 if isinstance(usec, int) else DEFAULT_READY_TIMEOUT_SECONDS

    checked = run_job(client, args.timeout, "Prepare", {**files.options, "dry_run": True},
                      files.fds).result_json() or {}
    report.running = dict(checked.get("running") or report.running)
    report.target = {"kernel": checked.get("kernel"), "initrd": checked.get("initrd"),
                     "release": checked.get("release"), "version": checked.get("version")}
    report.preflight = checked.get("preflight")
    prepare_refused = refusal_in(checked, "prepare_refused")
    if isinstance(prepare_refused, Busy):  # whatever the target: the host is not idle
        raise Busy(f"an update is already {props.get('State')} (target "
                   f"{props.get('TargetKernel') or '?'}); update leaves it alone: finish it "
                   "with `kho-agentctl commit` or `kho-agentctl cancel`")
    if checked.get("target_is_running"):
        report.outcome = "up-to-date"
        return EXIT_OK
    for refused in (refusal_in(checked, "commit_refused"), prepare_refused):
        if refused is not None:
            raise refused
    if args.check:
        report.outcome = "would-update"
        return EXIT_OK

    # SIGTERM (`systemctl stop`, a fleet tool giving up) or SIGINT from here on: the update
    # cancels what it prepared before it exits. Remembered during the prepare job (which runs
    # on in kho-agentd either way) and acted on when it ends; during the wait for the clients
    # at the next tick. Not during the commit: a stop then is the shutdown of the kexec itself.
    with StopRequests() as stops:
        prepare_and_wait(client, args, report, checked, stops, files, ready_timeout)

    report.stage = "commit"
    say(f"the clients are ready; handing off to {checked.get('kernel')} now: this host "
        "reboots into it and the guests pause until it restores their sessions")
    try:
        run_job(client, args.timeout, "Commit", {}, progress="commit")
    except (JobNotFinished, DaemonNotResponding, DaemonUnreachable) as exc:
        # the commit may be under way (the shutdown, the kexec): nothing may touch it now
        raise type(exc)(f"{exc.message}; the commit was not cancelled: it may be handing off "
                        "now (see `kho-agentctl status`, after a reboot `kho-agentctl verify`)"
                        ) from None
    except AgentError:
        # kho-agentd refused it or its job failed: the kexec did not happen, undo the prepare
        cancel(client, args.timeout, report)
        raise
    report.outcome = "committing"
    return EXIT_OK


def refusal_in(checked: dict[str, Any], key: str) -> AgentError | None:
    """The error a dry run's result says a step would be refused with (commit_refused,
    prepare_refused: the daemon's own check), or None."""
    refused = checked.get(key)
    if not isinstance(refused, dict):
        return None
    return from_dbus(api.ERROR_PREFIX + str(refused.get("error")), str(refused.get("message")))


def prepare_and_wait(client: AgentClient, args: argparse.Namespace, report: UpdateReport,
                     checked: dict[str, Any], stops: StopRequests, files: TargetFiles,
                     ready_timeout: float) -> None:
    """Prepare, then wait for the clients; anything that ends it here cancels the prepare."""
    report.stage = "prepare"
    say(f"preparing {checked.get('kernel')}")
    prepared = prepare(client, args.timeout, files, report)
    report.stage = "wait"
    try:
        if prepared.get("prepared") != checked.get("kernel"):
            # Target=newest-compatible chose again, and a kernel installed meanwhile won
            raise Busy(f"the target changed between the check ({checked.get('kernel')}) and "
                       f"the prepare ({prepared.get('prepared')}); run update again")
        report.waited_ready_s = wait_ready(client, args.timeout, ready_timeout, stops)
        # a stop that came during the last readiness check (a dry-run job, not interrupted)
        # cancels too: it must not end in the commit
        stops.check()
    except StopRequested:
        say(f"{stops.why()}: cancelling what this update prepared")
        cancel(client, args.timeout, report)
        raise Interrupted(f"{stops.why()} while waiting for the clients; the prepared update "
                          "was " + ("cancelled" if report.cancelled else
                                    "NOT cancelled: run `kho-agentctl cancel`")) from None
    except AgentError:
        cancel(client, args.timeout, report)
        raise
