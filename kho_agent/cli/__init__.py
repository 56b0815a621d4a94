"""kho-agentctl: one module per command, registered in COMMANDS (name -> module).

Exit codes are stable for fleet tooling: 0 ok, 1 a check failed, 2 usage or cannot run, 3 refused
by policy, 4 the kernel refused (kho_agent.errors maps every error to one of them). Every failure,
a usage error included, is one agent error with a stable name: printed on stderr, and with
`--json` in the one envelope every command prints on stdout (envelope.py: `schema`, `command`,
`ok`, `exit_code`, `result`, `error`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import NoReturn, cast

from ..about import VersionAction
from ..errors import AgentError, InvalidArgument
from . import envelope
from .bus import add_bus_options
from .common import EXIT_BROKEN_PIPE, Interrupted, UsageError, os_error, print_json

# Command name -> the module (in this package) that implements it. Modules are imported only
# when their command runs (or for the top-level help): `status` must not pay for the decoder
# and the simulator.
COMMANDS: dict[str, str] = {
    "decode": "decode",
    "check": "decode",
    "compat": "compat",
    "kernels": "kernels",
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
    # prepare, wait for the clients and commit in one (kho-agent-update.service runs it)
    "update": "update",
    # on its own: collects what the others say, with or without a daemon
    "report": "bugreport",  # not "report": main() has a function of that name
    "history": "history",
    "inhibit": "inhibit",
}


def command_module(name: str) -> ModuleType:
    return importlib.import_module(f".{COMMANDS[name]}", __name__)


def _chosen(argv: list[str]) -> str | None:
    """The command named on the command line, if any (the first word that is one)."""
    return next((word for word in argv if word in COMMANDS), None)


def wants_json(argv: list[str]) -> bool:
    """Whether the command line asks for --json, known before (and without) parsing it: a usage
    error must come out as JSON too. Matches what argparse takes for it: `--json` or an
    abbreviation down to `--j` (no other option starts so), and `--json=...` (which argparse
    then refuses, in JSON). Words after `--` are not ours: `inhibit -- kho-agentctl commit
    --json` runs a command that prints its own document."""
    ours = argv[:argv.index("--")] if "--" in argv else argv
    return any(word == "--json" or word.startswith("--json=")
               or (len(word) >= 3 and "--json".startswith(word)) for word in ours)


class _Parser(argparse.ArgumentParser):
    """argparse reports a bad command line by printing and exiting from inside parse_args();
    this one raises UsageError instead, so main() reports it like every other error (as JSON
    with --json). Sub-command parsers are of the same class (add_subparsers uses type(self))."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage(), self.prog)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only` one whose other commands are bare names (enough to
    parse a command line that runs `only`)."""
    parser = _Parser(
        prog="kho-agentctl",
        description="Drive and check Linux live updates (KHO + LUO).",
        epilog="Exit codes: 0 ok, 1 a check failed, 2 usage or cannot run, 3 refused by policy, "
               "4 the kernel refused. End-to-end tests on a real KHO kernel of your own, from a "
               "checkout: KHO_AGENT_TEST_KERNEL=/path/bzImage ./quickstart.sh vm (see README).")
    parser.add_argument("--version", action=VersionAction)
    add_bus_options(parser, top_level=True)
    # the sub-command parsers are _Parsers too (argparse makes them of type(parser))
    sub = cast("argparse._SubParsersAction[argparse.ArgumentParser]",
               parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    for name in COMMANDS:
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        add: Callable[[argparse._SubParsersAction[argparse.ArgumentParser], str], None] = \
            command_module(name).add_parser
        add(sub, name)
    return parser


# The error types of modules a command may have loaded: each is looked up only if its module was
# loaded, since a module that was never imported cannot have raised its error (and `status`
# must not import the decoder to find out).
_LOADED_ERRORS = (("kho_agent.kernel.debugfs", "DebugfsError"),
                  ("kho_agent.kernel.image", "ImageError"),
                  ("kho_agent.abi.errors", "AbiError"))


def handled_errors() -> tuple[type[BaseException], ...]:
    """What main() reports as an error of the command. Anything else is a bug and keeps its
    traceback."""
    found: list[type[BaseException]] = [AgentError, OSError, KeyboardInterrupt]
    for module, name in _LOADED_ERRORS:
        loaded = sys.modules.get(module)
        if loaded is not None:
            found.append(getattr(loaded, name))
    bus = sys.modules.get("kho_agent.cli.bus")
    if bus is not None:
        found.append(bus.GLib.Error)
    return tuple(found)


def as_agent_error(exc: BaseException) -> AgentError:
    """The agent error (name, exit code) for one of handled_errors()."""
    if isinstance(exc, AgentError):
        return exc
    if isinstance(exc, OSError):
        return os_error(exc)
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted("interrupted (Ctrl-C); what already ran in kho-agentd continues "
                           "there: see `kho-agentctl status`")
    convert = getattr(exc, "as_agent_error", None)  # DebugfsError, ImageError: their `kind`
    if convert is not None:
        converted: AgentError = convert()
        return converted
    bus = sys.modules.get("kho_agent.cli.bus")
    if bus is not None and isinstance(exc, bus.GLib.Error):
        glib: AgentError = bus.glib_error(exc)
        return glib
    # what is left of handled_errors() is the decoder's AbiError: the input is malformed
    return InvalidArgument(str(exc))


def report(err: AgentError, label: str) -> int:
    """Print an error on stderr (main() puts it in the JSON envelope with --json); its exit
    code."""
    if isinstance(err, UsageError):
        # argparse's own form: the usage of the command concerned, then `PROG: error: ...`
        sys.stderr.write(err.usage)
        print(f"{err.prog}: error: {err.message}", file=sys.stderr)
    else:
        print(f"{label}: {err.name}: {err.message}", file=sys.stderr)
    return err.exit_code


def _silence_broken_pipe() -> None:
    """Point stdout and stderr at /dev/null (the idiom of the Python docs' note on SIGPIPE), so
    that nothing written later, the interpreter's final flush included, raises again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            try:
                fd = stream.fileno()
            except (AttributeError, OSError, ValueError):
                continue  # not a real file (a test's capture): nothing will flush into a pipe
            os.dup2(devnull, fd)
    finally:
        os.close(devnull)


def _run(words: list[str], command: str | None, label: str) -> tuple[int, AgentError | None]:
    """Parse and run the command; an error is reported on stderr. (exit code, the error)."""
    try:
        args = build_parser(command).parse_args(words)
        code: int = args.run(args)
    except BrokenPipeError:
        raise
    except handled_errors() as exc:
        err = as_agent_error(exc)
        return report(err, label), err
    return code, None


def _run_json(words: list[str], command: str | None, label: str) -> int:
    """--json: what the command prints on stdout becomes the `result` of the one envelope."""
    printed = envelope.Captured(sys.stdout)
    try:
        with contextlib.redirect_stdout(printed):
            code, error = _run(words, command, label)
    except SystemExit:  # --help (argparse prints and exits): its text, as it is
        sys.stdout.write(printed.getvalue())
        raise
    doc = envelope.document(command, code, printed.getvalue(), error)
    if printed.streamed:   # after a document printed at once (inhibit's hold): the next line
        sys.stdout.write(envelope.one_line(doc))
    else:
        print_json(doc)
    return int(doc["exit_code"])


def main(argv: list[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    as_json = wants_json(words)
    command = _chosen(words)
    label = f"kho-agentctl {command}" if command else "kho-agentctl"
    try:
        code = _run_json(words, command, label) if as_json else _run(words, command, label)[0]
        # flushed here, not at exit, so that a reader gone away is seen below
        sys.stdout.flush()
        sys.stderr.flush()
        return code
    except BrokenPipeError:
        # Python ignores SIGPIPE, so writing to a pipe whose reader has gone (`kho-agentctl
        # status | head -1`) raises here. Stop quietly, as a C tool that SIGPIPE ends does, and
        # exit 141 (128 + SIGPIPE, the status a shell shows for one): scripts with `set -o
        # pipefail` see the output was cut short, as they do for cat or grep. What the command
        # started in kho-agentd is not undone.
        _silence_broken_pipe()
        return EXIT_BROKEN_PIPE
