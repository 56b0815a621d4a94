#!/usr/bin/env python3
"""Install kho-agent's data files where a distribution package puts them.

The Python package itself is installed by pip (or the distribution's Python helper); this
script places what pip does not: the systemd units, the D-Bus bus policy and activation file,
the polkit actions and the journal catalog, per the table in docs/systemd.md, and the empty
state directory /var/lib/kho-agent.

    packaging/install_data.py [--destdir DIR] [--prefix /usr] [--fdstore | --package] [--dry-run]

``--destdir`` stages the files under DIR (a package build root or a guest's root filesystem);
``--fdstore`` adds the drop-in for systemd >= 261 (``kho-agentctl preflight`` reports the mode a
host needs). ``--package`` is what the Debian package's build runs (packaging/debian/rules): the
drop-in goes to ``{prefix}/share/kho-agent/`` (the package's postinst links it into /etc on
systemd >= 261) and the state directory is left to tmpfiles. Nothing is run on the target
system: afterwards, on the target, run ``journalctl --update-catalog`` and
``systemctl daemon-reload``, then enable kho-agent.service.

Standard library only: it runs with any Python 3.11, inside or outside the project's venv.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DataFile:
    """One row of the install table: a file of this repository and where it goes.

    ``target`` is an absolute path on the target system; ``{prefix}`` in it is replaced by the
    installation prefix (``/usr`` for a distribution package). Paths under ``/etc`` are the
    administrator's and do not move with the prefix.
    """

    source: str
    target: str
    mode: int = 0o644
    # Only with --fdstore (hand-off mode "fdstore", systemd >= 261); with --package it is
    # shipped unused in PACKAGE_SHARE.
    fdstore_only: bool = False


DATA_FILES: tuple[DataFile, ...] = (
    DataFile("systemd/kho-agent.service", "{prefix}/lib/systemd/system/kho-agent.service"),
    DataFile("systemd/kho-agent.tmpfiles", "{prefix}/lib/tmpfiles.d/kho-agent.conf"),
    DataFile("systemd/kho-agent-verified.target",
             "{prefix}/lib/systemd/system/kho-agent-verified.target"),
    # one live update on demand (a fleet tool, by hand) and an example timer: shipped, never
    # enabled by the package
    DataFile("systemd/kho-agent-update.service",
             "{prefix}/lib/systemd/system/kho-agent-update.service"),
    DataFile("systemd/kho-agent-update.timer",
             "{prefix}/lib/systemd/system/kho-agent-update.timer"),
    DataFile("systemd/kho-agent-fdstore.conf",
             "/etc/systemd/system/kho-agent.service.d/fdstore.conf", fdstore_only=True),
    DataFile("etc/dbus-1/system.d/org.khoagent.Agent1.conf",
             "{prefix}/share/dbus-1/system.d/org.khoagent.Agent1.conf"),
    DataFile("share/dbus-1/system-services/org.khoagent.Agent1.service",
             "{prefix}/share/dbus-1/system-services/org.khoagent.Agent1.service"),
    DataFile("share/polkit-1/actions/org.khoagent.Agent1.policy",
             "{prefix}/share/polkit-1/actions/org.khoagent.Agent1.policy"),
    DataFile("catalog/kho-agent.catalog", "{prefix}/lib/systemd/catalog/kho-agent.catalog"),
    # every key commented out at its default (kho-agent.conf(5)); local settings belong in
    # drop-ins, /etc/kho-agent/agent.conf.d/*.conf
    DataFile("etc/kho-agent/agent.conf", "/etc/kho-agent/agent.conf"),
    # Debian's kernel packages run these after installing or removing a kernel ($1 = version,
    # $2 = image): record whether a live update into it is possible (kho-agentctl kernels)
    DataFile("packaging/kernel/postinst.d/zz-kho-agent", "/etc/kernel/postinst.d/zz-kho-agent",
             mode=0o755),
    DataFile("packaging/kernel/postrm.d/zz-kho-agent", "/etc/kernel/postrm.d/zz-kho-agent",
             mode=0o755),
)

# Directories the package owns, created empty with their mode: what `systemd-tmpfiles --create
# kho-agent.conf` makes from the `d` lines of systemd/kho-agent.tmpfiles (a package runs it at
# install; tests/test_packaging.py keeps the two in step). Made here too so that a staged tree
# (a guest image, a package root) has it before its first boot, without the host's systemd.
DATA_DIRS_CREATED: tuple[tuple[str, int], ...] = (("/var/lib/kho-agent", 0o700),)

# The repository directories whose every file must have a row above (tests/test_packaging.py).
DATA_DIRS: tuple[str, ...] = ("systemd", "etc", "share", "catalog", "packaging/kernel")

DIR_MODE = 0o755

# Where --package puts the fdstore-only rows: shipped, enabled by the package's postinst.
PACKAGE_SHARE = "{prefix}/share/kho-agent"


class InstallError(Exception):
    """A user-facing failure: the message says what went wrong and what to do."""


@dataclass(frozen=True)
class Placement:
    """One file to install: absolute source, absolute destination (under destdir), mode."""

    name: str  # the file in this repository, e.g. "systemd/kho-agent.service"
    source: Path
    destination: Path
    target: str  # the path on the target system (destination without destdir)
    mode: int


@dataclass(frozen=True)
class DirPlacement:
    """One directory to create: absolute destination (under destdir), its target path, mode."""

    destination: Path
    target: str
    mode: int


def plan_dirs(destdir: Path) -> list[DirPlacement]:
    return [DirPlacement(destdir / target.lstrip("/"), target, mode)
            for target, mode in DATA_DIRS_CREATED]


def target_path(row: DataFile, prefix: str, *, package: bool = False) -> str:
    target = row.target
    if package and row.fdstore_only:
        target = f"{PACKAGE_SHARE}/{Path(row.source).name}"
    return target.replace("{prefix}", prefix.rstrip("/") or "")


def plan(destdir: Path, prefix: str = "/usr", *, fdstore: bool = False, package: bool = False,
         repo: Path = REPO) -> list[Placement]:
    """Every file to install, in table order; raises InstallError for a bad prefix or source.
    `package`: every row, the fdstore-only ones in PACKAGE_SHARE (a distribution package)."""
    if not prefix.startswith("/"):
        raise InstallError(f"--prefix must be an absolute path, got {prefix!r} (e.g. /usr)")
    if fdstore and package:
        raise InstallError("--fdstore and --package exclude each other: a package ships the "
                           f"drop-in in {PACKAGE_SHARE.format(prefix=prefix)} and its postinst "
                           "enables it")
    placements = []
    for row in DATA_FILES:
        if row.fdstore_only and not (fdstore or package):
            continue
        source = repo / row.source
        if not source.is_file():
            raise InstallError(f"{source} is missing: run this from a complete kho-agent "
                               "checkout or source archive")
        target = target_path(row, prefix, package=package)
        placements.append(Placement(row.source, source, destdir / target.lstrip("/"), target,
                                    row.mode))
    return placements


def describe(placements: Sequence[Placement], destdir: Path,
             dirs: Sequence[DirPlacement] = ()) -> str:
    lines = [f"install {p.name} -> {p.destination} (mode {p.mode:04o})" for p in placements]
    lines += [f"mkdir {d.destination} (mode {d.mode:04o})" for d in dirs]
    lines.append(f"then on the target system{'' if destdir == Path('/') else f' ({destdir})'}: "
                 "systemd-tmpfiles --create kho-agent.conf; journalctl --update-catalog; "
                 "systemctl daemon-reload; "
                 "systemctl enable --now kho-agent.service")
    return "\n".join(lines)


def _install_one(placement: Placement) -> None:
    directory = placement.destination.parent
    _make_dirs(directory, DIR_MODE)
    data = placement.source.read_bytes()
    # Write beside the destination and rename: a reader (systemd, dbus-daemon reloading its
    # configuration) never sees a half-written file.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{placement.destination.name}.", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        tmp.chmod(placement.mode)
        tmp.replace(placement.destination)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _make_dirs(directory: Path, mode: int) -> None:
    # Created directories get their mode whatever the umask: the units and policies are read
    # by systemd, dbus-daemon and polkitd, the latter two not as root.
    missing = [d for d in (directory, *directory.parents) if not d.exists()]
    for new_dir in reversed(missing):
        new_dir.mkdir()
        new_dir.chmod(mode if new_dir == directory else DIR_MODE)


def install(placements: Sequence[Placement], dirs: Sequence[DirPlacement] = ()) -> None:
    for made in dirs:
        try:
            _make_dirs(made.destination, made.mode)
            made.destination.chmod(made.mode)
        except OSError as exc:
            raise InstallError(f"cannot create {made.destination}: {exc.strerror}; check that "
                               "--destdir is writable (installing to / needs root)") from exc
    for placement in placements:
        try:
            _install_one(placement)
        except OSError as exc:
            raise InstallError(f"cannot install {placement.destination}: {exc.strerror}; "
                               "check that --destdir is writable (installing to / needs root)"
                               ) from exc


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--destdir", type=Path, default=Path("/"),
                        help="stage the files under this directory (default: /)")
    parser.add_argument("--prefix", default="/usr",
                        help="installation prefix for the non-/etc files (default: /usr)")
    parser.add_argument("--fdstore", action="store_true",
                        help="also install the drop-in for hand-off mode fdstore (systemd >= 261)")
    parser.add_argument("--package", action="store_true",
                        help="what a distribution package ships: the fdstore drop-in under "
                             "PREFIX/share/kho-agent, no state directory (tmpfiles makes it)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan, install nothing")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout,
         err: TextIO = sys.stderr) -> int:
    args = parse_args(argv)
    destdir = args.destdir.resolve()
    try:
        placements = plan(destdir, args.prefix, fdstore=args.fdstore, package=args.package)
        dirs = [] if args.package else plan_dirs(destdir)
        if not args.dry_run:
            install(placements, dirs)
    except InstallError as exc:
        print(f"install_data: {exc}", file=err)
        return 1
    print(describe(placements, destdir, dirs), file=out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
