#!/usr/bin/env python3
"""Write kho-agentctl(8), kho-agentd(8) and kho-agentctl's bash and zsh completion from the
argparse parsers, so that every command and option is in them and nothing else is.

    packaging/gen_manpages.py           # rewrite man/*.8 and completion/*
    packaging/gen_manpages.py --check   # exit 1 if a committed file differs from what it writes

The generated files are committed (`man -l man/kho-agentctl.8` works in a plain checkout);
tests/test_manpages.py fails when a parser changed and this was not run again. Options hidden
from --help (argparse.SUPPRESS: test hooks) are left out of the pages and the completion alike.
Run from the checkout with its Python (it imports kho_agent): PYTHONPATH=. .venv/bin/python
packaging/gen_manpages.py.
"""

from __future__ import annotations

import argparse
import re
import sys
import textwrap
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere: the checkout's kho_agent
    sys.path.insert(0, str(REPO))

from kho_agent import __version__  # noqa: E402
from kho_agent.cli import build_parser as ctl_parser  # noqa: E402
from kho_agent.daemon import DEFAULT_STATE_DIR  # noqa: E402
from kho_agent.daemon import build_parser as daemon_parser  # noqa: E402
from kho_agent.errors import REGISTRY  # noqa: E402

# metavars whose value is a path: the completion offers files (or directories) for them
FILE_METAVARS = {"FILE", "IMAGE", "PATH", "MANIFEST", "OUTPUT"}
DIR_METAVARS = {"DIR"}


# ------------------------------------------------------------------------------ the model

@dataclass(frozen=True)
class Option:
    """One option or positional argument as a reader sees it."""

    flags: tuple[str, ...]          # empty for a positional
    metavar: str | None             # None: a flag taking no value
    choices: tuple[str, ...]
    help: str
    repeat: bool = False            # a positional taking several values

    @property
    def positional(self) -> bool:
        return not self.flags


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    description: str
    usage: str
    options: tuple[Option, ...]


@dataclass(frozen=True)
class Program:
    name: str
    summary: str
    usage: str
    options: tuple[Option, ...]
    commands: tuple[Command, ...] = field(default=())


def _help(action: argparse.Action, prog: str) -> str:
    text = action.help or ""
    if "%" in text:  # argparse's own expansion: %(default)s, %(prog)s
        text = text % {**vars(action), "prog": prog}
    return " ".join(text.split())


def _metavar(action: argparse.Action) -> str | None:
    if action.nargs == 0:
        return None
    if isinstance(action.metavar, str):
        return action.metavar
    if action.choices is not None:
        return "{" + ",".join(str(c) for c in action.choices) + "}"
    return action.dest.upper() if action.option_strings else action.dest


def options_of(parser: argparse.ArgumentParser) -> tuple[Option, ...]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) or action.help == argparse.SUPPRESS:
            continue
        choices = tuple(str(c) for c in action.choices) if action.choices is not None else ()
        found.append(Option(tuple(action.option_strings), _metavar(action), choices,
                            _help(action, parser.prog),
                            repeat=action.nargs in ("*", "+", argparse.REMAINDER)))
    return tuple(found)


def _usage(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_usage().removeprefix("usage:").split())


def program(parser: argparse.ArgumentParser, summary: str) -> Program:
    commands = []
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        helps = {a.dest: a.help or "" for a in action._choices_actions}
        for name, sub in action.choices.items():
            commands.append(Command(name, " ".join(helps.get(name, "").split()),
                                    " ".join((sub.description or "").split()), _usage(sub),
                                    options_of(sub)))
    return Program(parser.prog, summary, _usage(parser), options_of(parser), tuple(commands))


# -------------------------------------------------------------------------------- roff

def roff(text: str) -> str:
    """Text for a roff line: backslashes and hyphens escaped, no line read as a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def roff_text(text: str) -> str:
    """A paragraph of running text: escaped, in source lines of at most 80 bytes where the words
    allow (mandoc's style check)."""
    lines = textwrap.wrap(text, width=76, break_long_words=False, break_on_hyphens=False)
    return "\n".join(roff(line) for line in lines)


def _option_head(option: Option) -> str:
    if option.positional:
        return f"\\fI{roff(option.metavar or '')}\\fR" + (" ..." if option.repeat else "")
    value = f" \\fI{roff(option.metavar)}\\fR" if option.metavar else ""
    return ", ".join(f"\\fB{roff(flag)}\\fR{value}" for flag in option.flags)


def _options(options: Iterable[Option], skip: Callable[[Option], bool] = lambda o: False
             ) -> list[str]:
    lines = []
    for option in options:
        if skip(option):
            continue
        lines += [".TP", _option_head(option), roff_text(option.help or "(no description)")]
    return lines


def _is_help(option: Option) -> bool:
    return option.flags == ("-h", "--help")


@dataclass(frozen=True)
class PageText:
    """What the parser does not say: the hand-written part of a page."""

    description: list[str]
    files: list[tuple[str, str]]
    environment: list[tuple[str, str]]
    see_also: list[str]


def _pairs(pairs: list[tuple[str, str]]) -> list[str]:
    lines = []
    for head, text in pairs:
        lines += [".TP", f"\\fI{roff(head)}\\fR", roff_text(text)]
    return lines


def _exit_status() -> list[str]:
    lines = [".SH \"EXIT STATUS\"",
             ".TP", "\\fB0\\fR", "success",
             ".TP", "\\fB1\\fR", "a check failed (findings, an incompatible kernel, a failed "
             "verification)",
             ".TP", "\\fB2\\fR", "usage error, or the command cannot run",
             ".TP", "\\fB3\\fR", "refused by policy",
             ".TP", "\\fB4\\fR", "the kernel refused (a system call failed)",
             ".TP", "\\fB141\\fR", "the reader of the output went away (128 + SIGPIPE)",
             ".PP",
             "Every failure is one error with a stable name, printed on standard error as",
             "\\fIPROGRAM\\fR: \\fINAME\\fR: \\fImessage\\fR (and with \\fB\\-\\-json\\fR as "
             "the \\fBerror\\fR key",
             "of the JSON document on standard output). On the bus it is",
             "\\fBorg.khoagent.Agent1.Error.\\fR\\fINAME\\fR. The names and their exit codes:"]
    for entry in REGISTRY:
        where = "" if entry.on_bus else " (client side only)"
        lines += [".TP", f"\\fB{entry.name}\\fR ({entry.exit_code}){where}",
                  roff_text(entry.meaning)]
    return lines


def _page(prog: Program, text: PageText, commands_title: str) -> str:
    title = prog.name.upper()
    lines = [f".\\\" Generated by packaging/gen_manpages.py from the {prog.name} parser; "
             "do not edit.",
             f".TH {title} 8 \"{PAGE_DATE}\" \"kho-agent {__version__}\" \"System Administration\"",
             ".SH NAME", f"{roff(prog.name)} \\- {roff(prog.summary)}",
             ".SH SYNOPSIS", ".nh", ".ad l", f"\\fB{roff(prog.name)}\\fR "
             + roff_text(prog.usage.removeprefix(prog.name).strip()), ".ad", ".hy",
             ".SH DESCRIPTION"]
    for number, paragraph in enumerate(text.description):
        lines += [".PP"] if number else []
        lines.append(roff_text(paragraph))
    lines += [".SH OPTIONS", *_options(prog.options)]
    if prog.commands:
        lines += [f".SH {commands_title}"]
        for command in prog.commands:
            lines += [f".SS {roff(command.name)}", ".nh", ".ad l",
                      f"\\fB{roff(prog.name)} {roff(command.name)}\\fR "
                      + roff_text(command.usage.removeprefix(f"{prog.name} {command.name}")
                                  .strip()),
                      ".ad", ".hy", ".PP", roff_text(command.description or command.summary),
                      *_options(command.options, _is_help)]
    lines += _exit_status()
    lines += [".SH FILES", *_pairs(text.files)]
    lines += [".SH ENVIRONMENT", *_pairs(text.environment)]
    lines += [".SH \"SEE ALSO\"", ",\n".join(f"\\fB{roff(ref.split('(')[0])}\\fR("
                                             + ref.split("(")[1] for ref in text.see_also)]
    return "\n".join(lines) + "\n"


# The .TH date: when the hand-written text below last changed in substance (a generated date
# would make every regeneration a change, and the up-to-date test fail each day).
PAGE_DATE = "2026-12-04"
STATE_DIR = str(DEFAULT_STATE_DIR)

COMMON_FILES = [
    ("/etc/kho-agent/agent.conf", "the configuration, with drop-ins in "
     "/etc/kho-agent/agent.conf.d/ (see kho-agent.conf(5))"),
    (f"{STATE_DIR}/state.json", "kho-agentd's persisted state: the prepared or committed update"),
    (f"{STATE_DIR}/manifest.json", "the manifest of the prepared update"),
    (f"{STATE_DIR}/last-verify.json", "the report of the last verification"),
    (f"{STATE_DIR}/kernels/", "one record per installed kernel: whether a live update into it "
     "is possible (written by /etc/kernel/postinst.d/zz-kho-agent, listed by kho-agentctl "
     "kernels)"),
    ("/sys/kernel/debug/kho/", "the kernel's KHO state (debugfs), read by decode, check, compat "
     "and preflight"),
    ("/dev/liveupdate", "the LUO device kho-agentd preserves sessions through"),
]

CTL_TEXT = PageText(
    description=[
        "kho-agentctl drives and checks Linux live updates: a kexec into a new kernel that "
        "keeps chosen memory (KHO, Kexec HandOver) and file descriptors (LUO, the Live Update "
        "Orchestrator, /dev/liveupdate) across the reboot. Some commands work on their own "
        "(decode, check, compat, kernels, report, rehearse, and preflight and scratch with "
        "--local); the others ask kho-agentd(8) over D-Bus, which holds the sessions and "
        "the state of an update.",
        "Options of the daemon connection (--bus, --bus-address) may be given before "
        "or after the command.",
    ],
    files=COMMON_FILES,
    environment=[
        ("KHO_AGENT_STATE_DIR", f"the state directory read by kho-agentctl kernels and report "
         f"(default {STATE_DIR}); for tests and a relocated state"),
        ("KHO_AGENTCTL", "the command the kernel install hooks run instead of kho-agentctl "
         "(tests)"),
    ],
    see_also=["kho-agentd(8)", "kho-agent.conf(5)", "kexec(8)", "systemctl(1)",
              "journalctl(1)"])

DAEMON_TEXT = PageText(
    description=[
        "kho-agentd is the live-update agent: it serves org.khoagent.Agent1 on D-Bus, prepares "
        "an update (loads the target kernel, preserves the sessions of its clients), commits "
        "it (kexec), and after the new kernel starts reconciles its persisted state with this "
        "boot, verifies what came through and keeps the retrieved sessions for their owners. "
        "It runs as kho-agent.service; kho-agentctl(8) is its command-line client.",
        "Run by hand (--bus session, --simulate DIR) it serves a session bus or a simulated "
        "kernel, which is how the agent is tried without a KHO kernel.",
    ],
    files=[*COMMON_FILES,
           ("/usr/lib/systemd/system/kho-agent.service", "the unit that runs it")],
    environment=[
        ("NOTIFY_SOCKET", "set by systemd: kho-agentd reports readiness and status there"),
        ("KHO_SIM_CRASH_AT", "with --simulate: stop the simulated kernel at the Nth write "
         "(tests)"),
    ],
    see_also=["kho-agentctl(8)", "kho-agent.conf(5)", "systemd.service(5)", "kexec(8)"])


def ctl_program() -> Program:
    return program(ctl_parser(), "drive and check Linux live updates (KHO and LUO)")


def daemon_program() -> Program:
    return program(daemon_parser(), "the Linux live-update agent (KHO and LUO) on D-Bus")


# --------------------------------------------------------------------------- completion

def _completion_words(options: Iterable[Option]) -> list[str]:
    return [flag for option in options for flag in option.flags]


def _value_kind(option: Option) -> str:
    """How a value is completed: a word list, files, directories or nothing."""
    if option.choices:
        return "choices"
    if option.metavar in DIR_METAVARS:
        return "dir"
    if option.metavar in FILE_METAVARS:
        return "file"
    return "none"


def _bash_value_cases(options: Iterable[Option], indent: str) -> list[str]:
    lines = []
    for option in options:
        if option.positional or option.metavar is None:
            continue
        pattern = "|".join(option.flags)
        kind = _value_kind(option)
        if kind == "choices":
            action = f'COMPREPLY=($(compgen -W "{" ".join(option.choices)}" -- "$cur"))'
        elif kind == "dir":
            action = 'COMPREPLY=($(compgen -d -- "$cur"))'
        elif kind == "file":
            action = 'COMPREPLY=($(compgen -f -- "$cur"))'
        else:
            action = "COMPREPLY=()"
        lines.append(f"{indent}{pattern}) {action}; return ;;")
    return lines


def bash_completion(prog: Program) -> str:
    names = [c.name for c in prog.commands]
    lines = [f"# bash completion for {prog.name}: generated by packaging/gen_manpages.py from "
             "its parser; do not edit.",
             "",
             "_kho_agentctl() {",
             '    local cur="${COMP_WORDS[COMP_CWORD]}" prev="${COMP_WORDS[COMP_CWORD-1]}"',
             '    local command="" i',
             "    for ((i = 1; i < COMP_CWORD; i++)); do",
             '        case "${COMP_WORDS[i]}" in',
             f"            {'|'.join(names)}) command=\"${{COMP_WORDS[i]}}\"; break ;;",
             "        esac",
             "    done",
             '    case "$prev" in',
             *_bash_value_cases(prog.options, "        "),
             "    esac",
             "    local words",
             '    case "$command" in',
             '        "")',
             '            if [[ "$cur" == -* ]]; then',
             f'                words="{" ".join(_completion_words(prog.options))}"',
             "            else",
             f'                words="{" ".join(names)}"',
             "            fi ;;"]
    for command in prog.commands:
        lines += [f"        {command.name})",
                  '            case "$prev" in',
                  *_bash_value_cases(command.options, "                "),
                  "            esac",
                  f'            words="{" ".join(_completion_words(command.options))}" ;;']
    lines += ["    esac",
              '    COMPREPLY=($(compgen -W "$words" -- "$cur"))',
              "}",
              "",
              f"complete -o default -F _kho_agentctl {prog.name}",
              ""]
    return "\n".join(lines)


def _zsh_text(text: str) -> str:
    """A description inside '...[text]' of an _arguments spec (single-quoted)."""
    first = re.split(r"(?<=[.;])\s", text, maxsplit=1)[0].rstrip(".;")
    # brackets would end the [description]; a colon is only special before it (_describe) or
    # outside it (_arguments), where none is put
    first = first.replace("[", "(").replace("]", ")")
    return first.replace("'", "'\\''")


def _zsh_action(option: Option) -> str:
    kind = _value_kind(option)
    label = (option.metavar or "value").lower().strip("{}").replace(":", "")
    if kind == "choices":
        return f":{label}:({' '.join(option.choices)})"
    if kind == "dir":
        return f":{label}:_files -/"
    if kind == "file":
        return f":{label}:_files"
    return f":{label}: "


def _zsh_specs(options: Iterable[Option]) -> list[str]:
    specs = []
    for option in options:
        if option.positional:
            action = _zsh_action(option)
            specs.append(f"'{'*' if option.repeat else ''}{action}'")
            continue
        description = _zsh_text(option.help)
        value = _zsh_action(option) if option.metavar else ""
        if len(option.flags) > 1:
            group = " ".join(option.flags)
            names = "{" + ",".join(option.flags) + "}"
            specs.append(f"'({group})'{names}'[{description}]{value}'")
        else:
            equals = "=" if option.metavar and option.flags[0].startswith("--") else ""
            specs.append(f"'{option.flags[0]}{equals}[{description}]{value}'")
    return specs


def zsh_completion(prog: Program) -> str:
    cont = " \\\n"
    lines = [f"#compdef {prog.name}",
             f"# zsh completion for {prog.name}: generated by packaging/gen_manpages.py from its "
             "parser; do not edit.",
             "",
             "_kho_agentctl() {",
             '    local curcontext="$curcontext" state line',
             "    typeset -A opt_args",
             "    _arguments -C" + cont + cont.join(
                 "        " + spec for spec in [*_zsh_specs(prog.options),
                                                "'1:command:->command'",
                                                "'*::argument:->argument'"]) + " && return 0",
             '    case "$state" in',
             "        command)",
             "            local -a commands",
             "            commands=("]
    lines += [f"                '{c.name}:{_zsh_text(c.summary)}'" for c in prog.commands]
    lines += ["            )",
              f"            _describe -t commands '{prog.name} command' commands ;;",
              "        argument)",
              '            case "$line[1]" in']
    for command in prog.commands:
        specs = _zsh_specs(command.options)
        lines.append(f"                {command.name}) _arguments" + cont + cont.join(
            "                    " + spec for spec in specs) + " ;;")
    lines += ["            esac ;;",
              "    esac",
              "}",
              "",
              '_kho_agentctl "$@"',
              ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------- files

def outputs() -> dict[Path, str]:
    """Path (relative to the checkout) -> its content."""
    ctl = ctl_program()
    return {
        Path("man/kho-agentctl.8"): _page(ctl, CTL_TEXT, "COMMANDS"),
        Path("man/kho-agentd.8"): _page(daemon_program(), DAEMON_TEXT, "COMMANDS"),
        Path("completion/bash/kho-agentctl"): bash_completion(ctl),
        Path("completion/zsh/_kho-agentctl"): zsh_completion(ctl),
    }


def stale(root: Path = REPO) -> list[Path]:
    """The generated files that are missing or differ from what outputs() writes."""
    return [path for path, text in outputs().items()
            if not (root / path).is_file() or (root / path).read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if a generated file is out of date")
    args = parser.parse_args(argv)
    if args.check:
        old = stale()
        for path in old:
            print(f"{path}: out of date; run packaging/gen_manpages.py", file=sys.stderr)
        return 1 if old else 0
    for path, text in outputs().items():
        target = REPO / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
