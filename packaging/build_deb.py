#!/usr/bin/env python3
"""Build kho-agent's Debian package from this checkout; print the path of the .deb.

    packaging/build_deb.py [--out DIR] [--log FILE]

dpkg-buildpackage needs debian/ at the top of the source tree and writes its outputs into the
tree's parent directory; neither may touch the checkout. So the tree is copied into a temporary
directory (the files git knows plus the untracked ones it does not ignore; outside a git
checkout every file but the top-level dot directories, .venv and caches, and __pycache__),
packaging/debian/ becomes its debian/, and `dpkg-buildpackage -us -uc -b` runs there with
Debian's own python3 first in PATH. The .deb is moved to --out (default: the current
directory) and its path is the last line printed. Build tools: see packaging/debian/control
(Build-Depends); .ci/run installs them.

Importable (tests, tests/vm): build_deb(out_dir) returns the path.

Standard library only: it runs with any Python 3.11, inside or outside the project's venv.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = "kho-agent"
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


def stage(tree: Path, repo: Path = REPO) -> None:
    """Copy the source tree into `tree` and give it packaging/debian/ as debian/."""
    for relative in source_files(repo):
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
    missing = [tool for tool in ("dpkg-buildpackage", "dh", "fakeroot", "python3")
               if shutil.which(tool, path=BUILD_PATH) is None]
    if missing:
        raise BuildError(f"{', '.join(missing)} not found: install the Build-Depends of "
                         "packaging/debian/control (apt-get install debhelper dh-python "
                         "pybuild-plugin-pyproject python3-all python3-setuptools fakeroot)")
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
    args = parser.parse_args(argv)
    try:
        deb = build_deb(args.out, log=args.log)
    except BuildError as exc:
        print(f"build_deb: {exc}", file=sys.stderr)
        return 1
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
