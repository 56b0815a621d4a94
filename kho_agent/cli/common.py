"""What several commands share: exit codes, the error types, JSON output, and turning whatever
went wrong into an agent error with a stable name (the one shape `--json` prints)."""

from __future__ import annotations

import errno
import json
import signal
import sys
from typing import Any

from ..errors import (
    EXIT_CANNOT_RUN,
    EXIT_FINDINGS,
    EXIT_KERNEL,
    EXIT_OK,
    EXIT_REFUSED,
    AgentError,
    Interrupted,
    InvalidArgument,
    KernelRefused,
    NotFound,
    PermissionDenied,
    errno_text,
)

__all__ = ["EXIT_BROKEN_PIPE", "EXIT_CANNOT_RUN", "EXIT_FINDINGS", "EXIT_KERNEL", "EXIT_OK",
           "EXIT_REFUSED", "CliError", "Interrupted", "UsageError", "os_error",
           "print_json"]

# A reader that went away (`kho-agentctl status | head -1`): 128 + SIGPIPE, the status a shell
# shows for a C tool the signal ended, so `set -o pipefail` scripts see that the output was cut
# short, as they would for cat or grep (see main()).
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


class CliError(InvalidArgument):
    """The command cannot run as asked; the message says why and what to do (InvalidArgument,
    exit 2)."""


class UsageError(InvalidArgument):
    """The command line does not parse (argparse's error): an unknown option, a missing or bad
    value. `usage` is the usage text of the (sub)command it concerns."""

    def __init__(self, message: str, usage: str, prog: str) -> None:
        super().__init__(message)
        self.usage = usage
        self.prog = prog


def os_error(exc: OSError, what: str = "") -> AgentError:
    """The agent error for a failed system call that no layer below turned into one: a missing
    file is NotFound, a refused one PermissionDenied (as kernel/callerfile.py names them), any
    other errno a KernelRefused that carries it (errno and errno_name in `--json`)."""
    where = what or (f"{exc.filename}" if exc.filename is not None else "")
    code = exc.errno
    if code is None:  # an OSError raised without an errno: only its text is known
        return InvalidArgument(f"{where}: {exc}" if where else str(exc))
    prefix = f"{where}: " if where else ""
    if code in (errno.ENOENT, errno.ENOTDIR):
        return NotFound(f"{prefix}{errno_text(code)}")
    if code in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"{prefix}{errno_text(code)}; run as root")
    return KernelRefused(where or "a system call", code, "kho-agentctl stopped there")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
