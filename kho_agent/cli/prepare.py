"""`kho-agentctl prepare`: load the next kernel through kho-agentd and write the manifest.

The daemon runs the preflight (a blocker refuses: PreflightFailed, exit 3), loads the kernel
with kexec_file_load and records every session it holds in the manifest. `--dry-run` runs only
the preflight and shows the command line the kernel would get: nothing is loaded or written.
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from typing import Any

from ..errors import InvalidArgument
from ..service import interfaces as api
from .bus import JobInfo, open_target_files, options
from .common import EXIT_FINDINGS, EXIT_OK
from .jobs import add_job_options, run_job

HELP = "load the next kernel and record the manifest (a kho-agentd job)"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ". Exit 0 prepared, 1 a dry run "
                       "found blockers, 2 cannot run, 3 refused (blockers, state), 4 the kernel "
                       "refused the load.")
    p.add_argument("--kernel", metavar="IMAGE",
                   help="the next kernel's image; without it, the daemon's Target= "
                        "(kho-agent.conf(5): a fixed image, or the newest installed kernel that "
                        "passes the preflight)")
    p.add_argument("--initrd", metavar="FILE", help="its initrd (only with --kernel)")
    line = p.add_mutually_exclusive_group()
    line.add_argument("--cmdline", metavar="S", help="its command line (kho=on liveupdate=on "
                      "are added when missing)")
    line.add_argument("--reuse-cmdline", action="store_true",
                      help="the daemon's command-line policy (the default): the running "
                           "kernel's command line unless kho-agent.conf(5) sets CommandLine= "
                           "or AppendCommandLine=")
    p.add_argument("--scratch", metavar="keep|auto|VALUE", default=None,
                   help="kho_scratch= on the next kernel's command line: keep the current one "
                        "(default), auto (the recommended sizes), or a value such as "
                        "256M,512M,256M or 200%%. A kernel that boots through KHO keeps the "
                        "scratch areas it inherits and ignores it (it counts only if the "
                        "handover is refused); to resize the areas, put the value on the boot "
                        "loader's command line and boot cold (see `kho-agentctl scratch`)")
    p.add_argument("--dry-run", action="store_true",
                   help="run the preflight and show the command line; load nothing")
    add_job_options(p)
    p.set_defaults(run=run)


def scratch_option(value: str | None) -> str | None:
    """The scratch option as the daemon takes it; a value must parse as the kernel parses it
    (a malformed kho_scratch= makes the next kernel ignore it and fall back to its default)."""
    if value is None or value in ("keep", "auto"):
        return value
    value = value.removeprefix("kho_scratch=")
    from ..kernel.kho_scratch import parse_kho_scratch

    try:
        parse_kho_scratch(value)
    except InvalidArgument as exc:
        raise InvalidArgument(f"--scratch {value!r}: {exc.message}") from exc
    return value


def run(args: argparse.Namespace) -> int:
    scratch = scratch_option(args.scratch)  # refused before anything is opened or called
    if args.initrd is not None and args.kernel is None:
        raise InvalidArgument("--initrd needs --kernel (the configured Target= brings its own)")
    with ExitStack() as stack:
        # opened here, with our rights; the daemon gets the fds (bus.open_target_files)
        files = open_target_files(args.kernel, args.initrd, stack)
        opts: dict[str, Any] = {
            **files.options,
            "cmdline": None if args.reuse_cmdline else args.cmdline,
            "scratch": scratch,
            "dry_run": True if args.dry_run else None,
        }
        return run_job(args, "prepare", "Prepare", options(opts, api.PREPARE_OPTIONS), outcome,
                       fds=files.fds)


def outcome(job: JobInfo) -> tuple[str, int]:
    data = job.result_json() or {}
    if data.get("dry_run"):
        return dry_run_text(data)
    sessions = ", ".join(data.get("sessions") or []) or "none"
    lines = [f"prepared {data.get('prepared', '?')}",
             f"  command line: {data.get('cmdline', '?')}",
             f"  sessions:     {sessions}",
             "next: `kho-agentctl commit` once the sessions are ready (`kho-agentctl sessions`), "
             "or `kho-agentctl cancel`"]
    return "\n".join(lines), EXIT_OK


def dry_run_text(data: dict[str, Any]) -> tuple[str, int]:
    sessions = ", ".join(data.get("sessions") or []) or "none"
    would = bool(data.get("would_prepare"))
    lines = [f"dry run: prepare would load {data.get('kernel', '?')} (initrd "
             f"{data.get('initrd') or 'none'})",
             f"  command line: {data.get('cmdline', '?')}",
             f"  sessions:     {sessions}"]
    if data.get("target_is_running"):
        lines.append("  note:         this is the kernel running (same release and uname -v)")
    refused = data.get("commit_refused")
    if isinstance(refused, dict):
        lines.append(f"  note:         a commit now would be refused: {refused.get('error')}: "
                     f"{refused.get('message')}")
    report = data.get("preflight")
    if isinstance(report, dict):
        from .preflight import render_report

        lines += ["", render_report(report), ""]
    refusal = data.get("prepare_refused")
    if would:
        lines.append("verdict: prepare would go ahead")
    elif isinstance(refusal, dict):
        lines.append(f"verdict: prepare would be refused: {refusal.get('error')}: "
                     f"{refusal.get('message')}")
    else:  # a daemon from before prepare_refused
        lines.append("verdict: prepare would be refused (the blockers above)")
    lines.append("nothing was loaded, written or preserved")
    return "\n".join(lines), EXIT_OK if would else EXIT_FINDINGS
