"""`kho-agentctl preflight`: can this host live-update (into that kernel)?

Tiered like `criu check`: ok / warning / not-run / blocker per check, with the fix for each.
Exit 0 every check ran and none blocks, 1 at least one blocker, 2 could not run: the checks
could not be made at all, or no check blocks but one or more could not run (their inputs are
missing: no /dev/liveupdate, no readable KHO debugfs). An operator's health check takes 0 as
"this host can live-update": a check that looked at nothing cannot say that, and it is not a
blocker either (prepare does not refuse on it), so it is "cannot run" (2), with the report
printed all the same.

Asks kho-agentd (Preflight over D-Bus) by default: the daemon knows the sessions it holds, and it
holds /dev/liveupdate, which a second process would only see as busy. `--local` runs the checks
in this process; so does the hidden `--root` (tests on a simulated root). When no daemon answers
and neither was given, the checks run here with one note on stderr, so an operator still gets an
answer on a host where the daemon is not running; a daemon that is there but does not answer
(DaemonNotResponding) is an error instead: it holds /dev/liveupdate and the sessions, so checks run
here would miss them.

--kernel and --initrd are opened here in both modes (regular files only, never blocking: a FIFO,
a device or a directory exits 2 before anything runs); kho-agentd gets them as fds.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import AgentError
from ..service import interfaces as api
from ..service.errors import DaemonUnreachable
from .bus import (
    DEFAULT_CALL_TIMEOUT,
    AgentClient,
    TargetFiles,
    add_bus_options,
    add_timeout_option,
    open_target_files,
    options,
)
from .common import EXIT_CANNOT_RUN, EXIT_FINDINGS, EXIT_OK, print_json

if TYPE_CHECKING:  # the engine is imported only when a report is rendered (import cost)
    from ..engine.preflight import Tier

HELP = "check whether this host can live-update, with a tiered verdict"
DEFAULT_STATE_DIR = Path("/var/lib/kho-agent")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ". Exit 0 every check ran and none "
                       "blocks, 1 blockers, 2 could not run (some checks or all).")
    p.add_argument("--kernel", type=Path, metavar="IMAGE", help="target kernel image")
    p.add_argument("--initrd", type=Path, metavar="FILE", help="target initrd")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--local", action="store_true",
                   help="run the checks in this process instead of asking kho-agentd")
    p.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    add_bus_options(p)
    add_timeout_option(p, DEFAULT_CALL_TIMEOUT, "the call to kho-agentd")
    p.set_defaults(run=run)


def render_report(report: dict[str, Any]) -> str:
    """The text of a preflight report given as JSON (PreflightResult.to_json())."""
    from ..engine.preflight import Check, PreflightResult, render

    checks = [Check(str(c["name"]), _tier(c.get("tier")), str(c["message"]), c.get("fix"))
              for c in report.get("checks", [])]
    if not checks:
        return f"verdict: {report.get('verdict', '?')} (no checks reported)"
    return render(PreflightResult(checks, str(report.get("handoff_mode", "?"))))


def _tier(label: object) -> Tier:
    from ..engine.preflight import Tier

    try:
        return Tier.from_label(str(label))
    except KeyError:
        raise AgentError(f"kho-agentd sent a preflight tier {str(label)[:40]!r} this "
                         "kho-agentctl does not know; are both the same version? --local runs "
                         "the checks here") from None


def local_report(args: argparse.Namespace) -> dict[str, Any]:
    from ..engine import Engine, EngineConfig
    from ..kernel.host import real_host

    host = real_host(args.root if args.root is not None else Path("/"))
    # Preflight reads; it never writes state, so the state directory is not touched.
    engine = Engine(host, EngineConfig(state_dir=DEFAULT_STATE_DIR))
    report: dict[str, Any] = engine.gather_preflight(args.kernel, args.initrd).to_json()
    return report


def bus_report(args: argparse.Namespace, files: TargetFiles) -> dict[str, Any]:
    opts = options(files.options, api.PREFLIGHT_OPTIONS)
    with AgentClient.from_args(args) as client:
        (text,) = client.manager("Preflight", opts, fds=files.fds)
    try:
        report: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as exc:
        raise AgentError(f"kho-agentd sent a preflight report that is not JSON ({exc}); are "
                         "both the same version? --local runs the checks here") from exc
    return report


def run(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        # opened (and refused) here in both modes; in --local the engine opens them again
        files = open_target_files(args.kernel, args.initrd, stack)
        if args.local or args.root is not None:
            report = local_report(args)
        else:
            try:
                report = bus_report(args, files)
            except DaemonUnreachable as exc:
                print(f"kho-agentctl preflight: note: {exc.message.split(';')[0]}; running the "
                      "checks in this process instead (--local)", file=sys.stderr)
                report = local_report(args)
    if args.json:
        print_json(report)
    else:
        print(render_report(report))
    return exit_status(report)


def exit_status(report: dict[str, Any]) -> int:
    """1 a blocker; 2 no blocker but a check did not run; 0 every check ran and none blocks."""
    verdict = report.get("verdict")
    if verdict == "blocker":
        return EXIT_FINDINGS
    return EXIT_CANNOT_RUN if verdict == "not-run" else EXIT_OK
