"""--version, the man pages and the shell completion: generated from the parsers by
packaging/gen_manpages.py, committed, and complete (every command, option and error name)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import packaging_scripts
import pytest

from kho_agent.abi.registry import FORMATS
from kho_agent.cli import COMMANDS, build_parser
from kho_agent.daemon import build_parser as daemon_parser
from kho_agent.errors import REGISTRY

REPO = Path(__file__).resolve().parent.parent
BASH = REPO / "completion" / "bash" / "kho-agentctl"
ZSH = REPO / "completion" / "zsh" / "_kho-agentctl"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


gen = packaging_scripts.load("gen_manpages")


def visible_options(parser: argparse.ArgumentParser) -> list[str]:
    return [flag for action in parser._actions if action.help != argparse.SUPPRESS
            for flag in action.option_strings]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


# ----------------------------------------------------------------------------- --version

@pytest.mark.parametrize("module,prog", [("kho_agent.cli", "kho-agentctl"),
                                         ("kho_agent.daemon", "kho-agentd")])
def test_version_names_the_package_version_and_every_format(module: str, prog: str) -> None:
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                          text=True, timeout=60, env=ENV, check=False)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert first == f"{prog} {version}"
    assert second.startswith("handover formats: ")
    for fmt in FORMATS:
        assert fmt.compatible in second
    assert done.stderr == ""


def test_version_needs_no_command() -> None:
    # the command is required otherwise: --version alone must not be a usage error
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["--version"])
    assert stop.value.code == 0


# ---------------------------------------------------------------------------- the pages

def test_generated_files_are_committed_and_up_to_date() -> None:
    # A new command or option, or a changed help text, needs `packaging/gen_manpages.py`
    assert gen.stale() == [], "run: PYTHONPATH=. python packaging/gen_manpages.py"


def test_a_changed_file_is_seen_stale(tmp_path: Path) -> None:
    for path, text in gen.outputs().items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    assert gen.stale(tmp_path) == []
    page = tmp_path / "man" / "kho-agentctl.8"
    page.write_text(page.read_text().replace("\\-\\-json", "\\-\\-jsn", 1))
    (tmp_path / BASH.relative_to(REPO)).unlink()
    assert sorted(map(str, gen.stale(tmp_path))) == ["completion/bash/kho-agentctl",
                                                    "man/kho-agentctl.8"]


def test_ctl_page_has_every_command_option_and_error() -> None:
    page = (REPO / "man" / "kho-agentctl.8").read_text()
    parser = build_parser()
    assert set(subparsers(parser)) == set(COMMANDS)
    for name, sub in subparsers(parser).items():
        assert f".SS {gen.roff(name)}\n" in page
        section = page.split(f".SS {gen.roff(name)}\n")[1].split(".SS ")[0].split(".SH ")[0]
        for flag in visible_options(sub):
            if flag not in ("-h", "--help"):
                assert f"\\fB{gen.roff(flag)}\\fR" in section, (name, flag)
    for flag in visible_options(parser):
        assert f"\\fB{gen.roff(flag)}\\fR" in page
    for entry in REGISTRY:
        assert f"\\fB{entry.name}\\fR ({entry.exit_code})" in page
    assert "\\fBkho\\-agent.conf\\fR(5)" in page and "\\fBkho\\-agentd\\fR(8)" in page


def test_daemon_page_has_every_option_and_error() -> None:
    page = (REPO / "man" / "kho-agentd.8").read_text()
    for flag in visible_options(daemon_parser()):
        assert f"\\fB{gen.roff(flag)}\\fR" in page
    assert "polkit-bus" not in page  # hidden from --help, hidden here
    for entry in REGISTRY:
        assert f"\\fB{entry.name}\\fR" in page


@pytest.mark.parametrize("page", ["kho-agentctl.8", "kho-agentd.8"])
def test_pages_render_without_warnings(page: str) -> None:
    path = REPO / "man" / page
    if shutil.which("groff"):
        done = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(path)],
                              capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0 and done.stderr == "", done.stderr
    if not shutil.which("mandoc"):
        pytest.skip("mandoc is not installed (quickstart.sh installs it): lint not run")
    done = subprocess.run(["mandoc", "-Tlint", "-W", "warning", str(path)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.stdout + done.stderr == ""


# ------------------------------------------------------------------------- completion

def bash_complete(line: str) -> list[str]:
    """What bash offers for `line` (the cursor at its end), through the completion function."""
    script = ('source "$1"; read -ra COMP_WORDS <<<"$2"; [[ "$2" == *" " ]] && COMP_WORDS+=("");'
              ' COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _kho_agentctl;'
              ' printf "%s\\n" "${COMPREPLY[@]}"')
    done = subprocess.run(["bash", "-c", script, "bash", str(BASH), line],
                          capture_output=True, text=True, timeout=60, check=True)
    return [word for word in done.stdout.splitlines() if word]


def test_bash_completes_commands_options_and_values() -> None:
    assert bash_complete("kho-agentctl pre") == ["preflight", "prepare"]
    assert sorted(bash_complete("kho-agentctl ")) == sorted(COMMANDS)
    assert bash_complete("kho-agentctl --bus s") == ["system", "session"]
    assert bash_complete("kho-agentctl --ver") == ["--version"]
    # after the command, that command's options: those of compat, and not those of decode
    compat = bash_complete("kho-agentctl --bus system compat --")
    assert "--kernel" in compat and "--running-image" in compat and "--memory" not in compat
    assert "--debugfs" not in compat  # hidden from --help, hidden here


def test_bash_offers_every_option_of_every_command() -> None:
    for name, sub in subparsers(build_parser()).items():
        offered = set(bash_complete(f"kho-agentctl {name} --"))
        wanted = {flag for flag in visible_options(sub) if flag.startswith("--")}
        assert offered == wanted, name


def test_zsh_completion_names_every_command_and_option() -> None:
    text = ZSH.read_text()
    for name, sub in subparsers(build_parser()).items():
        assert f"\n                {name}) _arguments" in text
        assert f"'{name}:" in text
        block = text.split(f"\n                {name}) _arguments")[1].split(" ;;")[0]
        for flag in visible_options(sub):
            assert flag in block, (name, flag)
    if not shutil.which("zsh"):
        pytest.skip("zsh is not installed (quickstart.sh installs it): syntax not checked")
    done = subprocess.run(["zsh", "-n", str(ZSH)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
