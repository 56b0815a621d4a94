"""kho-agentctl: one module per command, registered in COMMANDS (name -> module).

Exit codes are stable for fleet tooling: 0 ok, 1 a check failed, 2 usage or cannot run, 3 refused
by policy, 4 the kernel refused (kho_agent.errors maps every error to one of them).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from types import ModuleType

from ..abi.errors import AbiError
from ..errors import AgentError
from ..kernel.debugfs import DebugfsError
from . import (
    cancel,
    commit,
    compat,
    decode,
    jobs,
    manifest,
    preflight,
    prepare,
    rehearse,
    scratch,
    sessions,
    status,
    verify,
)
from .bus import add_bus_options
from .common import EXIT_CANNOT_RUN, CliError, print_json

COMMANDS: dict[str, ModuleType] = {
    "decode": decode,
    "check": decode,
    "compat": compat,
    "scratch": scratch,
    "preflight": preflight,
    "rehearse": rehearse,
    # through kho-agentd over D-Bus (preflight and scratch too, unless --local)
    "status": status,
    "prepare": prepare,
    "commit": commit,
    "cancel": cancel,
    "verify": verify,
    "sessions": sessions,
    "manifest": manifest,
    "jobs": jobs,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kho-agentctl",
        description="Drive and check Linux live updates (KHO + LUO).",
        epilog="Exit codes: 0 ok, 1 a check failed, 2 usage or cannot run, 3 refused by policy, "
               "4 the kernel refused.")
    add_bus_options(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        add: Callable[[argparse._SubParsersAction[argparse.ArgumentParser], str], None] = \
            module.add_parser
        add(sub, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
        return code
    except (CliError, DebugfsError, AbiError) as exc:
        print(f"kho-agentctl {args.command}: {exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except AgentError as exc:
        if getattr(args, "json", False):
            print_json(exc.to_json())
        print(f"kho-agentctl {args.command}: {exc.name}: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"kho-agentctl {args.command}: {where}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_CANNOT_RUN
    except KeyboardInterrupt:
        print(f"kho-agentctl {args.command}: interrupted", file=sys.stderr)
        return EXIT_CANNOT_RUN
