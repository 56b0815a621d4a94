"""`kho-agentctl jobs`: the Job objects kho-agentd exports now; and what every job command
(prepare, commit, cancel, verify) shares: starting the job, its progress, its outcome.

A job command prints progress on stderr (a redrawn bar on a terminal, `prepare: 30%` lines
otherwise, one per change) and the outcome on stdout. Exit codes: the job's error decides when it
failed (its D-Bus name maps back to the agent error and its exit code); a job cancelled by
someone else is 3; `--no-wait` prints the job's path and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from ..service import interfaces as api
from .bus import (
    DEFAULT_CALL_TIMEOUT,
    DEFAULT_JOB_TIMEOUT,
    AgentClient,
    JobInfo,
    add_bus_options,
    add_timeout_option,
)
from .common import EXIT_OK, EXIT_REFUSED, print_json

HELP = "list kho-agentd's jobs (running, or ended in the last 120 s)"
BAR_WIDTH = 30

# (text for a terminal or log, exit code) of a job that ended "done"
Outcome = Callable[[JobInfo], tuple[str, int]]


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ": id, type, state, progress.")
    add_common_options(p)
    p.set_defaults(run=run)


def add_common_options(p: argparse.ArgumentParser, *, job: bool = False) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_bus_options(p)
    if not job:
        add_timeout_option(p, DEFAULT_CALL_TIMEOUT, "every call to kho-agentd")


def add_job_options(p: argparse.ArgumentParser) -> None:
    add_common_options(p, job=True)
    p.add_argument("--no-wait", action="store_true",
                   help="print the job's object path and exit 0 without following it")
    add_timeout_option(p, DEFAULT_JOB_TIMEOUT, "the calls and following the job, which keeps "
                       "running in kho-agentd (JobNotFinished)")


# ---------------------------------------------------------------------------------- progress

def size_text(n: int) -> str:
    """412 MiB, 1.0 GiB, 512 B: binary units, three significant figures at most."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    if unit == "B":
        return f"{n} B"
    return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"


def phase_text(job: JobInfo) -> str:
    """`digesting 412 MiB / 1.0 GiB`, `loading the kernel`, or "" before the first phase."""
    if job.bytes_total > 0:
        return f"{job.phase} {size_text(job.bytes_done)} / {size_text(job.bytes_total)}"
    return job.phase


class ProgressView:
    """Job progress on a stream: the percentage, the phase and its bytes. One line redrawn
    with \\r on a terminal; else a plain line per new percentage or phase, and per tenth of a
    phase's bytes (logs and pipes stay readable)."""

    def __init__(self, label: str, stream: TextIO) -> None:
        self.label = label
        self.stream = stream
        self.tty = stream.isatty()
        self.last: tuple[int, str, int] | None = None
        self.width = 0
        self.drawn = False

    def update(self, job: JobInfo) -> None:
        percent = max(0, min(100, job.progress))
        # bytes in tenths (lines) or hundredths (a terminal): the daemon sends every 1%
        steps = 100 if self.tty else 10
        share = job.bytes_done * steps // job.bytes_total if job.bytes_total > 0 else 0
        now = (percent, job.phase, share)
        if now == self.last:
            return
        self.last = now
        what = phase_text(job)
        if self.tty:
            filled = BAR_WIDTH * percent // 100
            bar = "#" * filled + "." * (BAR_WIDTH - filled)
            line = f"{self.label} [{bar}] {percent:3d}%" + (f" {what}" if what else "")
            # blank what a longer line before left behind
            self.stream.write(f"\r{line.ljust(self.width)}")
            self.width = max(self.width, len(line))
            self.drawn = True
        else:
            self.stream.write(f"{self.label}: {percent}%" + (f" {what}" if what else "") + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


# ---------------------------------------------------------------------------------- outcome

def run_job(args: argparse.Namespace, label: str, method: str,
            options: dict[str, Any] | None, outcome: Outcome,
            before: Callable[[AgentClient], None] | None = None,
            fds: Sequence[int] = ()) -> int:
    """Start `method` and follow its job to the end (or print its path with --no-wait)."""
    with AgentClient.from_args(args) as client:
        if before is not None:
            before(client)
        return run_job_on(client, args, label, method, options, outcome, fds)


def run_job_on(client: AgentClient, args: argparse.Namespace, label: str, method: str,
               options: dict[str, Any] | None, outcome: Outcome,
               fds: Sequence[int] = ()) -> int:
    if args.no_wait:
        job = client.start_job(method, options, on_progress=lambda _j: None, fds=fds,
                               wait=False)
        return print_path(job.path, args.json)
    view = ProgressView(label, sys.stderr)
    try:
        job = client.start_job(method, options, on_progress=view.update, fds=fds)
    finally:
        view.finish()
    return report(job, args.json, outcome)


def follow_job(args: argparse.Namespace, client: AgentClient, path: str, label: str,
               outcome: Outcome) -> int:
    """Follow a job someone else started (or print its path with --no-wait)."""
    if args.no_wait:
        return print_path(path, args.json)
    view = ProgressView(label, sys.stderr)
    try:
        job = client.follow(path, on_progress=view.update)
    finally:
        view.finish()
    return report(job, args.json, outcome)


def print_path(path: str, as_json: bool) -> int:
    if as_json:
        print_json({"job": path})
    else:
        print(path)
    return EXIT_OK


def report(job: JobInfo, as_json: bool, outcome: Outcome) -> int:
    """Print how a job ended; its exit code. A failed job raises its agent error (main prints
    it, in the JSON envelope with --json, beside the job's document)."""
    if job.state == api.JOB_FAILED:
        if as_json:  # the envelope's result: which job, beside its error
            print_json(job.to_json())
        raise job.error()
    if job.state == api.JOB_CANCELED:
        data = job.result_json() or {}
        if as_json:
            print_json(job.to_json())
        else:
            print(f"{job.type or 'the job'} was cancelled before it completed: "
                  f"{data.get('message', 'no detail')}")
        return EXIT_REFUSED
    text, code = outcome(job)
    if as_json:
        print_json(job.to_json())
    else:
        print(text)
    return code


def plain_outcome(job: JobInfo) -> tuple[str, int]:
    data = job.result_json()
    if isinstance(data, dict) and "message" in data:
        return str(data["message"]), EXIT_OK
    return json.dumps(data, indent=2), EXIT_OK


# ---------------------------------------------------------------------------------- the command

def run(args: argparse.Namespace) -> int:
    with AgentClient.from_args(args) as client:
        jobs = client.jobs()
    if args.json:
        print_json([j.to_json() for j in jobs])
        return EXIT_OK
    if not jobs:
        print("no jobs (finished jobs stay listed for 120 s after they end)")
        return EXIT_OK
    print(f"{'ID':>4}  {'TYPE':<8} {'STATE':<9} {'PROGRESS':>8}  {'OBJECT':<28} ERROR")
    for j in jobs:
        error = ""
        if j.state == api.JOB_FAILED:
            err = j.error()
            error = f"{err.name}: {err.message}"
        print(f"{j.id:>4}  {j.type:<8} {j.state:<9} {j.progress:>7}%  {j.path:<28} {error}"
              .rstrip())
    return EXIT_OK
