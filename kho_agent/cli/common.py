"""What several commands share: exit codes, the error type, JSON output."""

from __future__ import annotations

import json
import sys
from typing import Any

from ..errors import EXIT_CANNOT_RUN, EXIT_FINDINGS, EXIT_KERNEL, EXIT_OK, EXIT_REFUSED

__all__ = ["EXIT_CANNOT_RUN", "EXIT_FINDINGS", "EXIT_KERNEL", "EXIT_OK", "EXIT_REFUSED", "CliError",
           "print_json"]


class CliError(Exception):
    """The command could not run; the message says why and what to do."""


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
