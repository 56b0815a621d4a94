#!/usr/bin/env python3
"""Build kho-agent's Debian package from this checkout; print the path of the .deb.

    packaging/build_deb.py [--out DIR] [--log FILE]
    packaging/build_deb.py --print-build-deps    # what to apt-get install first


dpkg-buildpackage needs debian/ at the top of the source tree and writes its outputs into the
tree's parent directory; neither may touch the checkout. So what the package is built from
(PACKAGE_SOURCES: of the files git knows plus the untracked ones it does not ignore; outside a
git checkout every file but the top-level dot directories, .venv and caches, and __pycache__)
is copied into a temporary directory, packaging/debian/ becomes its debian/, and
`dpkg-buildpackage -us -uc -b` runs there with Debian's own python3 first in PATH. The .deb is
moved to --out (default: the current directory) and its path is the last line printed.

Build tools: packaging/debian/control's Build-Depends is the one list of them; build_depends()
reads it (with build-essential, which Debian never lists), --print-build-deps prints it for
apt-get (.ci/run, quickstart.sh, README's install command).

Importable (tests, tests/vm): build_deb(out_dir) returns the path; package_files() is what the
build is given (tests/vm keys its guest image on them); build_depends() and relation_names()
read the control file.

Standard library only: it runs with any Python 3.11, inside or outside the project's venv.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "kho-agent"
CONTROL = REPO / "packaging" / "debian" / "control"
# What the package is built from, relative to the checkout: what pybuild reads (pyproject.toml,
# its readme and LICENSE, the kho_agent package) and what debian/rules installs (packaging/:
# install_data.py and its table's files, which are under systemd/ etc/ share/ catalog/
# packaging/kernel/; man pages, completion; packaging/debian/ itself). Only these are copied
# into the build tree: a file the build needs and this list lacks fails the build, and nothing
# else (tests, docs, quickstart.sh) is an input of the package or of the guest images'
# key (tests/vm/rootfs.py).
PACKAGE_SOURCES: tuple[str, ...] = (
    "pyproject.toml", "README.md", "LICENSE", "kho_agent", "packaging", "systemd", "etc",
    "share", "catalog", "man", "completion",
)
# Debian Policy 4.2: build-essential is needed to build any package and never listed in
# Build-Depends. No fakeroot: the control file says Rules-Requires-Root: no, so
# dpkg-buildpackage runs no root command.
IMPLICIT_BUILD_DEPENDS: tuple[str, ...] = ("build-essential",)
# Virtual packages of Build-Depends, which dpkg-query cannot find installed: their provider.
PROVIDERS: dict[str, str] = {"debhelper-compat": "debhelper"}
BUILD_DEPENDS_FIELDS = ("build-depends", "build-depends-indep", "build-depends-arch")
# One relation (Debian Policy 7.1): a name, an optional :arch qualifier, an optional version
# constraint. Architecture restrictions [...] and build profiles <...> are not used by this
# control file; rather than guess what they select, relation_names() refuses them.
_RELATION = re.compile(r"(?P<name>[a-z0-9][a-z0-9+.-]+)(?::[a-z0-9-]+)?"
                       r"\s*(?:\(\s*(?:<<|<=|=|>=|>>)\s*[^\s()]+\s*\))?")
_SUBSTVAR = re.compile(r"\$\{[A-Za-z0-9:.+-]+\}")
BUILD_COMMAND = ("dpkg-buildpackage", "-us", "-uc", "-b")
# A Debian package is built with Debian's own interpreter and tools: a virtual environment's or
# pyenv's python3 first in PATH would build (or fail to build: no `build` module) with another.
BUILD_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
SCRUBBED_ENV = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE")


class BuildError(Exception):
    """The package could not be built: the message says why (and holds the build's log tail)."""


def source_files(repo: Path = REPO) -> list[Path]:
    """The files of the tree to build, relative to it."""
    if (repo / ".git").exists() and shutil.which("git"):
        listed = subprocess.run(
            ["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others",
             "--exclude-standard"], check=True, capture_output=True).stdout
        names = [Path(n) for n in listed.decode().split("\0") if n]
        return [n for n in names if (repo / n).is_file() or (repo / n).is_symlink()]
    found = []
    for path in sorted(repo.rglob("*")):
        relative = path.relative_to(repo)
        if relative.parts[0].startswith(".") or "__pycache__" in relative.parts:
            continue
        if path.is_file():
            found.append(relative)
    return found


def package_files(repo: Path = REPO) -> list[Path]:
    """The files the package is built from (those of source_files() in PACKAGE_SOURCES),
    relative to `repo`: what stage() copies."""
    return [relative for relative in source_files(repo)
            if relative.parts[0] in PACKAGE_SOURCES]


def control_paragraphs(text: str) -> list[dict[str, str]]:
    """The paragraphs of a deb822 file (debian/control): field name (lower case) -> value, the
    continuation lines joined with newlines; comment lines skipped."""
    paragraphs: list[dict[str, str]] = []
    current: dict[str, str] = {}
    field = ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                paragraphs.append(current)
            current, field = {}, ""
        elif line[0] in " \t":
            if not field:
                raise BuildError(f"control line {number}: a continuation line without a field")
            current[field] += "\n" + line.strip()
        else:
            name, colon, value = line.partition(":")
            if not colon or not name.strip() or " " in name.strip():
                raise BuildError(f"control line {number}: not a field: {line!r}")
            field = name.strip().lower()
            current[field] = value.strip()
    if current:
        paragraphs.append(current)
    return paragraphs


def relation_names(value: str) -> list[str]:
    """The package names of a relation field's value (Depends, Build-Depends, ...): version
    constraints and :arch qualifiers dropped, of alternatives `a | b` the first (what Debian's
    build daemons install), substitution variables (${misc:Depends}) skipped."""
    names = []
    for relation in value.split(","):
        first = relation.split("|")[0].strip()
        if not first or _SUBSTVAR.fullmatch(first):
            continue
        matched = _RELATION.fullmatch(first)
        if matched is None:
            raise BuildError(f"control: {first!r} is not a relation this reader understands "
                             "(name, :arch, (op version); no [arch] or <profile> lists)")
        names.append(matched["name"])
    return names


def _paragraph(control: Path, key: str, value: str) -> dict[str, str]:
    for paragraph in control_paragraphs(control.read_text()):
        if paragraph.get(key) == value:
            return paragraph
    raise BuildError(f"{control} has no paragraph with {key}: {value}")


def build_depends(control: Path = CONTROL) -> list[str]:
    """What to install to build the package: build-essential and the source paragraph's
    Build-Depends (-Indep, -Arch), virtual packages replaced by their provider, in order."""
    source = _paragraph(control, "source", PACKAGE)
    names = list(IMPLICIT_BUILD_DEPENDS)
    for field in BUILD_DEPENDS_FIELDS:
        names += (PROVIDERS.get(name, name) for name in relation_names(source.get(field, "")))
    return list(dict.fromkeys(names))


def binary_relations(field: str, control: Path = CONTROL, package: str = PACKAGE) -> list[str]:
    """The package names of a relation field (Depends, Recommends) of binary `package`."""
    return relation_names(_paragraph(control, "package", package).get(field.lower(), ""))


def stage(tree: Path, repo: Path = REPO) -> None:
    """Copy what the package is built from into `tree`; packaging/debian/ becomes debian/."""
    for relative in package_files(repo):
        target = tree / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(repo / relative, target, follow_symlinks=False)
    shutil.copytree(repo / "packaging" / "debian", tree / "debian", symlinks=True)


def build_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
    env["PATH"] = BUILD_PATH
    return env


def build_deb(out_dir: Path, repo: Path = REPO, log: Path | None = None) -> Path:
    """Build the package; return the path of the .deb in `out_dir`. `log` keeps the build's
    output (otherwise it is in the BuildError on failure)."""
    missing = [tool for tool in ("dpkg-buildpackage", "dh", "python3")
               if shutil.which(tool, path=BUILD_PATH) is None]
    if missing:
        raise BuildError(f"{', '.join(missing)} not found: install the Build-Depends of "
                         "packaging/debian/control (apt-get install --no-install-recommends "
                         f"{' '.join(build_depends())})")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kho-agent-deb-") as work:
        tree = Path(work) / PACKAGE
        stage(tree, repo)
        result = subprocess.run(BUILD_COMMAND, cwd=tree, env=build_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, check=False)
        output = result.stdout.decode(errors="replace")
        if log is not None:
            log.write_text(output)
        if result.returncode != 0:
            tail = "\n".join(output.splitlines()[-40:])
            raise BuildError(f"{' '.join(BUILD_COMMAND)} failed (exit {result.returncode}):\n"
                             f"{tail}")
        debs = sorted(Path(work).glob(f"{PACKAGE}_*_all.deb"))
        if len(debs) != 1:
            raise BuildError(f"expected one {PACKAGE}_*_all.deb, found {[d.name for d in debs]}")
        destination = out_dir / debs[0].name
        shutil.move(str(debs[0]), destination)
        return destination.resolve()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path.cwd(),
                        help="directory for the .deb (default: the current directory)")
    parser.add_argument("--log", type=Path, help="write the build's output to this file")
    parser.add_argument("--print-build-deps", action="store_true",
                        help="print the packages the build needs (packaging/debian/control's "
                             "Build-Depends and build-essential) on one line, and build nothing")
    args = parser.parse_args(argv)
    try:
        if args.print_build_deps:
            print(" ".join(build_depends()))
            return 0
        deb = build_deb(args.out, log=args.log)
    except BuildError as exc:
        print(f"build_deb: {exc}", file=sys.stderr)
        return 1
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
