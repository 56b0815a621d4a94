"""`kho-agentctl history`: every live update and attempt on this host, oldest first, as
kho-agentd keeps them across kexecs (History()): when, from and to which kernel, sessions and
bytes, the blackout, the verdict, the error. Read-only; anyone may run it. Lines of the history
file that could not be read are reported (on stderr, and under `problems` with --json), never
fatal."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import StateCorrupt
from .bus import AgentClient
from .common import EXIT_OK, print_json
from .jobs import add_common_options, size_text

HELP = "list past live updates and attempts (kept across kexecs)"
COLUMNS = ("STARTED", "VERDICT", "FROM", "TO", "SESSIONS", "BYTES", "BLACKOUT", "DETAIL")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ".")
    add_common_options(p)
    p.add_argument("-n", "--last", type=_positive, metavar="N",
                   help="only the newest N entries")
    p.set_defaults(run=run)


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"N is a whole number, not {text!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"N is 1 or more, not {number}")
    return number


def _size(value: object) -> str:
    return size_text(value) if isinstance(value, int) else "-"


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def _error(name: object, message: object) -> str | None:
    if message:
        return f"{name}: {message}" if name else str(message)
    return None if name is None else str(name)


def _refusals(entry: dict[str, Any]) -> str | None:
    """The commits that did not happen while the update was prepared, and the last one."""
    counts = [f"{n} commit(s) {what}" for n, what in (
        (entry.get("commits_refused"), "refused"), (entry.get("commits_failed"), "failed"))
        if isinstance(n, int) and n > 0]
    if not counts:
        return None
    last = _error(entry.get("last_commit_error_name"), entry.get("last_commit_error_message"))
    return ", ".join(counts) + (f" (last: {last})" if last else "")


def row(entry: dict[str, Any]) -> tuple[str, ...]:
    blackout = entry.get("blackout_seconds")
    error = _error(entry.get("error_name"), entry.get("error_message"))
    refusals = _refusals(entry)
    if refusals:
        error = f"{error}; {refusals}" if error else refusals
    kind = "" if entry.get("kind") == "update" else f"{entry.get('kind')} "
    return (_cell(entry.get("started")), kind + _cell(entry.get("verdict")),
            _cell(entry.get("release_from")), _cell(entry.get("release_to")),
            _cell(entry.get("sessions")), _size(entry.get("bytes")),
            f"{blackout:.2f} s" if isinstance(blackout, int | float) else "-",
            _cell(error)[:120])


def render(entries: list[dict[str, Any]]) -> str:
    if not entries:
        return "no live update or attempt recorded on this host"
    rows = [COLUMNS, *(row(e) for e in entries)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=False))
                     + "  " + r[-1] for r in rows)


def run(args: argparse.Namespace) -> int:
    with AgentClient.from_args(args) as client:
        (text,) = client.manager("History")
    try:
        document = json.loads(text)
        entries = list(document["entries"])
        problems = [str(p) for p in document.get("problems", [])]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise StateCorrupt(f"kho-agentd sent a history that is not the expected JSON ({exc})"
                           ) from exc
    if args.last is not None:
        entries = entries[-args.last:] if args.last > 0 else []
    if args.json:
        print_json({**document, "entries": entries})
        return EXIT_OK
    print(render(entries))
    for problem in problems:
        print(f"kho-agentctl: history: {problem}", file=sys.stderr)
    return EXIT_OK
