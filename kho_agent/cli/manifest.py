"""`kho-agentctl manifest`: the manifest of the prepared (or last committed) live update, as
kho-agentd keeps it (GetManifest), pretty-printed JSON. Exit 2 when there is none (NotFound)."""

from __future__ import annotations

import argparse
import json

from ..errors import StateCorrupt
from .bus import AgentClient
from .common import EXIT_OK, print_json
from .jobs import add_common_options

HELP = "print the manifest of the prepared or last committed live update (JSON)"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP, description=HELP + ".")
    add_common_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    with AgentClient.from_args(args) as client:
        (text,) = client.manager("GetManifest")
    # the manifest is JSON either way: without --json the manifest itself, with it the
    # manifest as the result of the envelope every --json document is
    try:
        print_json(json.loads(text))
    except json.JSONDecodeError as exc:
        raise StateCorrupt(f"kho-agentd sent a manifest that is not JSON ({exc}); the file "
                           "it reads may be damaged") from exc
    return EXIT_OK
