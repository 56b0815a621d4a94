"""`kho-agentctl status`: what kho-agentd reports: every Manager property, the sessions it
holds and its jobs (the running one first). Read-only; anyone may run it."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from typing import Any

from ..service import interfaces as api
from .bus import AgentClient, JobInfo, SessionRow
from .common import EXIT_OK, print_json
from .jobs import add_common_options
from .sessions import table
from .verify import parse_result, render_summary

HELP = ("show kho-agentd's state, hand-off mode, kernels, last result, inhibitors, sessions "
        "and jobs")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ".")
    add_common_options(p)
    p.set_defaults(run=run)


def render(props: dict[str, Any], sessions: list[SessionRow], jobs: list[JobInfo],
           where: str) -> str:
    state = str(props.get("State", "?"))
    message = str(props.get("StateMessage", ""))
    simulated = " (simulated kernel)" if props.get("Simulated") else ""
    number = props.get("LiveUpdateNumber", 0)
    last = parse_result(str(props.get("LastResult", "")))
    lines = [f"kho-agentd on {where}{simulated}",
             f"  state:          {state}" + (f": {message}" if message else ""),
             f"  hand-off mode:  {props.get('HandoffMode') or '?'}",
             f"  running kernel: {props.get('RunningKernel') or '?'}",
             f"  target kernel:  {props.get('TargetKernel') or '-'}",
             f"  live update:    {'#' + str(number) if number else 'unknown'}"]
    files = list(props.get("ConfigFiles") or [])
    lines.append("  configuration:  " + (files[0] if files else "built-in defaults (no file)"))
    lines += [f"                  {path}" for path in files[1:]]
    if last is None:
        lines.append("  last result:    -")
    else:
        first, *rest = render_summary(last).splitlines()
        lines.append(f"  last result:    {first}")
        lines += [f"                  {line.strip()}" for line in rest]
    held = list(props.get("Inhibitors") or [])
    if not held:
        lines.append("  inhibitors:     none")
    for i, (who, why, uid, since) in enumerate(held):
        when = datetime.fromtimestamp(since / 1e6, UTC).isoformat(timespec="seconds")
        lines.append(("  inhibitors:     " if i == 0 else "                  ")
                     + f"{who} (uid {uid}, since {when}): {why}"
                     + (" - commits are refused until released" if i == len(held) - 1
                        else ""))
    running = [j for j in jobs if j.running]
    lines.append("  job:            " + ("; ".join(f"{j.id} {j.type} {j.progress}% ({j.path})"
                                                   for j in running) or "none running"))
    lines += ["", f"sessions: {len(sessions)}"]
    if sessions:
        lines += ["  " + line for line in table(sessions).splitlines()]
    ended = [j for j in jobs if not j.running]
    if ended:
        lines += ["", "recent jobs:"]
        for j in ended:
            detail = f" ({j.error().name})" if j.state == api.JOB_FAILED else ""
            lines.append(f"  {j.id} {j.type} {j.state}{detail}")
        lines.append("  (`kho-agentctl jobs` shows their errors)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    with AgentClient.from_args(args) as client:
        props = client.manager_properties()
        sessions = client.list_sessions()
        jobs = client.jobs()
        target = client.target
    if args.json:
        running = next((j for j in jobs if j.running), None)
        print_json({"connection": target.to_json(),
                    "properties": props,
                    "inhibitors": [{"who": who, "why": why, "uid": uid, "since_usec": since}
                                   for who, why, uid, since in props.get("Inhibitors") or []],
                    "last_result": parse_result(str(props.get("LastResult", ""))),
                    "sessions": [s.to_json() for s in sessions],
                    "running_job": running.to_json() if running else None,
                    "jobs": [j.to_json() for j in jobs]})
    else:
        print(render(props, sessions, jobs, target.describe()))
    return EXIT_OK
