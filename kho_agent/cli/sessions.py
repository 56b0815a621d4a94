"""`kho-agentctl sessions`: the LUO sessions kho-agentd holds (ListSessions), with their owners,
readiness and preserved files. Sessions of this boot are created by their owners (VM managers)
over D-Bus; incoming ones came through the last live update and wait for their owners."""

from __future__ import annotations

import argparse

from .bus import AgentClient, SessionRow
from .common import EXIT_OK, print_json
from .jobs import add_common_options

HELP = "list the sessions kho-agentd holds (owner, ready, claimed, files)"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ".")
    add_common_options(p)
    p.set_defaults(run=run)


def fetch(client: AgentClient) -> list[SessionRow]:
    rows = client.list_sessions()
    for row in rows:
        client.session_details(row)
    return rows


def owner_text(row: SessionRow) -> str:
    uid = "?" if row.owner_uid is None else str(row.owner_uid)
    return f"{uid} {row.owner_bus_name}".rstrip()


def table(rows: list[SessionRow]) -> str:
    if not rows:
        return "no sessions"
    width = max(8, *(len(r.name) for r in rows))
    lines = [f"{'NAME':<{width}}  {'ORIGIN':<9} {'READY':<5} {'CLAIMED':<7} {'FILES':>5}  OWNER"]
    for r in rows:
        files = "-" if r.tokens is None else str(len(r.tokens))
        lines.append(f"{r.name:<{width}}  {'incoming' if r.incoming else 'this boot':<9} "
                     f"{'yes' if r.ready else 'no':<5} {'yes' if r.claimed else 'no':<7} "
                     f"{files:>5}  {owner_text(r)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    with AgentClient.from_args(args) as client:
        rows = fetch(client)
    if args.json:
        print_json([r.to_json() for r in rows])
    else:
        print(table(rows))
    return EXIT_OK
