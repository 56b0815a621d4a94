"""`kho-agentctl verify`: did the live update bring everything back?

After a live update kho-agentd verifies on its own at start. This command follows that job while
it runs, and afterwards reports its result (the Manager's LastResult) instead of verifying again:
the incoming state is consumed by the first verification (the agent's carried manifest copy is
retrieved once), so a second run cannot repeat it. `--again` starts a new Verify job without
looking for that result first: it runs when the last verification could not run (no manifest,
no device: nothing was retrieved), and is refused (NotPrepared, exit 3, naming the result and
its report) after one that ran.
Exit 0 verified, 1 verification found problems, 2 cannot run (nothing to verify against),
3 refused.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import Busy
from .bus import AgentClient, JobInfo
from .common import EXIT_FINDINGS, EXIT_OK, print_json
from .jobs import add_job_options, follow_job, report, run_job_on

HELP = "check that the live update restored every preserved item (a kho-agentd job)"
MAX_FAILURES_SHOWN = 20


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ". Exit 0 verified, 1 problems "
                       "found, 2 cannot run, 3 refused.")
    p.add_argument("--again", action="store_true",
                   help="start a new Verify job instead of reporting the last one: it runs "
                   "when the last verification could not run; after one that ran it is refused "
                   "(exit 3): "
                   "that one retrieved the sessions, which the kernel hands out once")
    add_job_options(p)
    p.set_defaults(run=run)


def parse_result(text: str) -> dict[str, Any] | None:
    if not text:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {"result": "unreadable", "reason": text}
    return data if isinstance(data, dict) else {"result": "unreadable", "reason": text}


def render_summary(summary: dict[str, Any]) -> str:
    """A verify summary, a cancel or a failure record (LastResult) as a few lines."""
    result = str(summary.get("result", "?"))
    counts = summary.get("counts")
    head = result
    if isinstance(counts, dict) and counts:
        head += ": " + ", ".join(f"{n} {verdict}" for verdict, n in sorted(counts.items()))
    if summary.get("reason"):
        head += f": {summary['reason']}"
    lines = [head]
    failures = summary.get("failures") or []
    for item in failures[:MAX_FAILURES_SHOWN]:
        lines.append(f"  {item.get('verdict', '?')}: {item.get('kind', '?')} "
                     f"{item.get('name', '?')}: {item.get('detail', '')}")
    total = summary.get("failures_total", len(failures))
    if isinstance(total, int) and total > min(len(failures), MAX_FAILURES_SHOWN):
        lines.append(f"  ... {total - min(len(failures), MAX_FAILURES_SHOWN)} more")
    if summary.get("report"):
        lines.append(f"  full report: {summary['report']}")
    return "\n".join(lines)


def outcome(job: JobInfo) -> tuple[str, int]:
    data = job.result_json() or {}
    summary = data.get("summary") if isinstance(data.get("summary"), dict) else {}
    ok = bool(data.get("ok"))
    text = render_summary(summary or {"result": "verified" if ok else "failed"})
    return text, EXIT_OK if ok else EXIT_FINDINGS


def _boot_verification(props: dict[str, Any]) -> dict[str, Any] | None:
    """The verify summary of this boot, when the daemon has one (verified or failed with
    per-item counts: a verification that ran, not one that could not run)."""
    if props.get("State") not in ("verified", "failed"):
        return None
    last = parse_result(str(props.get("LastResult", "")))
    if last is None or "counts" not in last:
        return None
    return last


def _latest_verify(client: AgentClient) -> JobInfo | None:
    """The newest Verify job still exported (running, or ended in the last 120 s)."""
    return next((j for j in reversed(client.jobs()) if j.type == "verify"), None)


def run(args: argparse.Namespace) -> int:
    with AgentClient.from_args(args) as client:
        if not args.again:
            last = _boot_verification(client.manager_properties())
            if last is not None:
                return _report_last(last, args.json)
            # the daemon's own verification at start (or one that just ended, before State
            # caught up): its answer, not a second run
            latest = _latest_verify(client)
            if latest is not None:
                if latest.running:
                    return follow_job(args, client, latest.path, "verify", outcome)
                return report(latest, args.json, outcome)
        try:
            return run_job_on(client, args, "verify", "Verify", None, outcome)
        except Busy:
            latest = _latest_verify(client)
            if latest is None or not latest.running:
                raise
            return follow_job(args, client, latest.path, "verify", outcome)


def _report_last(last: dict[str, Any], as_json: bool) -> int:
    ok = bool(last.get("ok"))
    if as_json:
        print_json({"job": None, "type": "verify", "state": "done", "progress": 100,
                    "result": {"ok": ok, "summary": last}, "error": None,
                    "source": "LastResult"})
    else:
        print(render_summary(last))
        print("(kho-agentd verified this boot at its start; it retrieved the sessions, which "
              "the kernel hands out once, so it is not run again)")
    return EXIT_OK if ok else EXIT_FINDINGS
