"""What `--version` says about this build: the package version and what the decoder knows.

Computed only when asked (VersionAction), since the format list loads the ABI registry, which
`kho-agentctl status` must not pay for (tests/test_import_cost.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

DISTRIBUTION = "kho-agent"


def package_version() -> str:
    """The installed distribution's version; a checkout run with PYTHONPATH has no metadata,
    so the version the package declares. (importlib.metadata is imported here: it pulls in
    email, zipfile and csv, which no other command needs.)"""
    from importlib import metadata
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        from . import __version__
        return __version__


def known_formats() -> dict[str, list[str]]:
    """Format family -> the versions (compatible strings) the decoder knows, oldest first."""
    from .abi.registry import FORMATS

    families: dict[str, list[str]] = {}
    for fmt in FORMATS:
        families.setdefault(fmt.family, []).append(fmt.compatible)
    return families


def version_text(prog: str) -> str:
    """Two lines: `PROG VERSION`, then the handover formats this build decodes."""
    formats = "; ".join(f"{family} {', '.join(versions)}"
                        for family, versions in known_formats().items())
    return f"{prog} {package_version()}\nhandover formats: {formats}"


class VersionAction(argparse.Action):
    """`--version`: print version_text() and exit 0, computed only when given."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS, help: str | None = None) -> None:
        super().__init__(option_strings=option_strings, dest=dest, default=default, nargs=0,
                         help=help or "print the version and the handover formats known, "
                                      "and exit")

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        sys.stdout.write(version_text(parser.prog) + "\n")  # on stdout, as argparse's own
        parser.exit(0)
