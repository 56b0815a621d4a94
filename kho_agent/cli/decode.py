"""`kho-agentctl decode` and `kho-agentctl check`: show or check a KHO state.

decode prints the state and exits 0 whenever it could read it; check exits 1 when any finding is
an error. Both exit 2 when they could not run at all (no debugfs, KHO off, a missing file, or one
that is not a regular file or is larger than its format allows: kho_agent/kernel/debugfs.py and
physmem.py give each bound), 3 when they may not read it (PermissionDenied: root is needed).
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from typing import Any

from ..abi import Severity, decode_state
from ..abi.jsonview import to_json
from .common import EXIT_FINDINGS, EXIT_OK, print_json
from .inputs import add_state_arguments, load_input
from .render import render_state

HELP = {
    "decode": "decode a KHO state (root FDT, memory map, subtrees, LUO sessions) and print it",
    "check": "decode a KHO state and check it; exit 1 if any error finding",
}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str) -> None:
    p = sub.add_parser(name, help=HELP[name], description=HELP[name])
    add_state_arguments(p)
    p.set_defaults(run=run, check=name == "check")


def run(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        inp, source = load_input(args, stack)
        state = decode_state(inp)
    errors = sum(1 for f in state.findings if f.severity is Severity.ERROR)
    if args.json:
        doc: dict[str, Any] = {"source": source, "state": to_json(state),
                               "summary": {sev.value: sum(1 for f in state.findings
                                                          if f.severity is sev)
                                           for sev in Severity}}
        print_json(doc)
    else:
        print(render_state(state, source))
    if args.check and errors:
        return EXIT_FINDINGS
    return EXIT_OK
