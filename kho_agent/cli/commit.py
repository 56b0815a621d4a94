"""`kho-agentctl commit`: hand off to the prepared kernel (a kho-agentd job).

Without `--dry-run` this is the blackout: the daemon writes the final manifest and reboots into
the loaded kernel; guests pause until the new kernel's agent restores their sessions. There is no
prompt (fleet tools run it unattended): a warning on stderr says what is about to happen, and
only once kho-agentd's own checks passed (a dry run of the same Commit, which changes nothing):
a commit that is refused (nothing prepared, the kernel no longer loaded, sessions not ready)
says why and never announced a reboot. Sessions whose owners have not marked them ready refuse
the commit (Busy, exit 3) unless `--force`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import Cancelled
from ..service import interfaces as api
from .bus import AgentClient, JobInfo, options
from .common import EXIT_OK
from .jobs import add_job_options, run_job

HELP = "reboot into the prepared kernel, keeping the sessions (a kho-agentd job)"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ". Exit 0 handed off, 2 cannot run, "
                       "3 refused (nothing prepared, sessions not ready), 4 the kernel refused "
                       "the kexec (everything stays prepared).")
    p.add_argument("--force", action="store_true",
                   help="commit although some sessions are not marked ready (over D-Bus: "
                   "Commit's option \"force\": true)")
    p.add_argument("--dry-run", action="store_true",
                   help="check and show what commit would do; change nothing")
    add_job_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    opts: dict[str, Any] = {"force": True if args.force else None,
                            "dry_run": True if args.dry_run else None}

    def warn(client: AgentClient) -> None:
        if args.dry_run:
            return
        props = client.manager_properties()
        if props.get("State") != "prepared":
            return  # the job refuses with the reason; nothing to warn about
        # the daemon's checks, as a dry run: a commit they refuse announces nothing. The
        # commit itself still runs: it meets the same refusal, which then is reported with
        # its job and recorded in the history as a refused commit (a dry run is not)
        checked = client.start_job("Commit", options({**opts, "dry_run": True},
                                                     api.COMMIT_OPTIONS),
                                   on_progress=lambda _job: None)
        if checked.state == api.JOB_FAILED:
            return
        if checked.state != api.JOB_DONE:
            raise Cancelled("the checks before the commit were cancelled (by another "
                            "caller): nothing was handed off")
        target = props.get("TargetKernel") or "?"
        print(f"kho-agentctl commit: the checks passed; handing off to the loaded kernel "
              f"({target}) now: this host reboots into it and the guests pause until it "
              "restores their sessions", file=sys.stderr, flush=True)

    return run_job(args, "commit", "Commit", options(opts, api.COMMIT_OPTIONS), outcome,
                   before=warn)


def outcome(job: JobInfo) -> tuple[str, int]:
    data = job.result_json() or {}
    plan = [f"  - {step}" for step in data.get("plan") or []]
    if data.get("dry_run"):
        return "\n".join(["dry run: commit would go ahead:", *plan,
                          "nothing was changed"]), EXIT_OK
    seconds = data.get("handoff_seconds")
    took = f" in {seconds * 1000:.1f} ms" if isinstance(seconds, (int, float)) else ""
    return "\n".join([f"committed: handed off{took}", *plan,
                      "the host reboots into the loaded kernel; there kho-agentd verifies on its "
                      "own (`kho-agentctl status` shows the result)"]), EXIT_OK
