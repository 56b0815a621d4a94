"""kho-agentctl: one module per command, registered in COMMANDS (name -> module).

Exit codes are stable for fleet tooling: 0 ok, 1 a check failed, 2 usage or cannot run, 3 refused
by policy, 4 the kernel refused (kho_agent.errors maps every error to one of them).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from types import ModuleType

from ..errors import AgentError
from .bus import add_bus_options
from .common import EXIT_CANNOT_RUN, CliError, print_json

# Command name -> the module (in this package) that implements it. Modules are imported only
# when their command runs (or for the top-level help): `status` must not pay for the decoder
# and the simulator.
COMMANDS: dict[str, str] = {
    "decode": "decode",
    "check": "decode",
    "compat": "compat",
    "scratch": "scratch",
    "preflight": "preflight",
    "rehearse": "rehearse",
    # through kho-agentd over D-Bus (preflight and scratch too, unless --local)
    "status": "status",
    "prepare": "prepare",
    "commit": "commit",
    "cancel": "cancel",
    "verify": "verify",
    "sessions": "sessions",
    "manifest": "manifest",
    "jobs": "jobs",
}


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f".{COMMANDS[name]}", __name__)


def _chosen(argv: list[str]) -> str | None:
    """The command named on the command line, if any (the first word that is one)."""
    return next((word for word in argv if word in COMMANDS), None)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only` one whose other commands are bare names (enough to
    parse a command line that runs `only`)."""
    parser = argparse.ArgumentParser(
        prog="kho-agentctl",
        description="Drive and check Linux live updates (KHO + LUO).",
        epilog="Exit codes: 0 ok, 1 a check failed, 2 usage or cannot run, 3 refused by policy, "
               "4 the kernel refused. End-to-end tests on a real KHO kernel of your own, from a "
               "checkout: KHO_AGENT_TEST_KERNEL=/path/bzImage ./quickstart.sh vm (see README).")
    add_bus_options(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        add: Callable[[argparse._SubParsersAction[argparse.ArgumentParser], str], None] = \
            command_module(name).add_parser
        add(sub, name)
    return parser


def _usage_errors() -> tuple[type[Exception], ...]:
    """CliError and the decoder's own error types, these from the modules that define them if
    they were loaded: a module that was never imported cannot have raised its error."""
    found: list[type[Exception]] = [CliError]
    for module, name in (("kho_agent.abi.errors", "AbiError"),
                         ("kho_agent.kernel.debugfs", "DebugfsError")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            found.append(getattr(loaded, name))
    return tuple(found)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(_chosen(words))
    args = parser.parse_args(words)
    try:
        code: int = args.run(args)
        return code
    except _usage_errors() as exc:
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
