"""The errors every layer above `abi/` raises, each with a stable name and exit code.

The name is what the D-Bus service sends (`org.khoagent.Agent1.Error.<name>`) and what `--json`
output carries; the exit code is what `kho-agentctl` returns. Fleet tooling keys on both, so they
never change meaning. Errors that come from a system call keep their errno.
"""

from __future__ import annotations

import errno as errno_mod
import os
from typing import ClassVar

DBUS_ERROR_PREFIX = "org.khoagent.Agent1.Error."

# The exit codes of kho-agentctl (issue 4's table; fleet tooling keys on them):
EXIT_OK = 0
EXIT_FINDINGS = 1        # a check or verification found errors
EXIT_CANNOT_RUN = 2      # usage: bad arguments, missing input, state or feature; cannot run
EXIT_REFUSED = 3         # refused by policy: a blocker, the state, a permission, a busy agent
EXIT_KERNEL = 4          # the kernel refused a system call (the errno is in the message/JSON)


class AgentError(Exception):
    """Base of all agent errors: a message a user can act on, plus a stable name and exit code."""

    name: ClassVar[str] = "Failed"
    exit_code: ClassVar[int] = EXIT_CANNOT_RUN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def dbus_name(self) -> str:
        return DBUS_ERROR_PREFIX + self.name

    def to_json(self) -> dict[str, object]:
        return {"error": self.name, "message": self.message, "exit_code": self.exit_code}


class InvalidArgument(AgentError):
    name = "InvalidArgument"
    exit_code = EXIT_CANNOT_RUN


class Busy(AgentError):
    name = "Busy"
    exit_code = EXIT_REFUSED


class NotPrepared(AgentError):
    name = "NotPrepared"
    exit_code = EXIT_REFUSED


class PreflightFailed(AgentError):
    name = "PreflightFailed"
    exit_code = EXIT_REFUSED


class AbiMismatch(AgentError):
    name = "AbiMismatch"
    exit_code = EXIT_REFUSED


class Cancelled(AgentError):
    """The operation was cancelled on request (Job.Cancel of a running prepare) and rolled
    back."""

    name = "Cancelled"
    exit_code = EXIT_REFUSED


class KernelRefused(AgentError):
    """A system call failed. `errno` is the kernel's; `op` names the call (`PRESERVE_FD`)."""

    name = "KernelRefused"
    exit_code = EXIT_KERNEL

    def __init__(self, op: str, err: int, advice: str) -> None:
        code = errno_mod.errorcode.get(err, str(err))
        super().__init__(f"{op} failed: {code} ({os.strerror(err)}): {advice}")
        self.op = op
        self.errno = err
        self.advice = advice

    def to_json(self) -> dict[str, object]:
        out = super().to_json()
        out.update(op=self.op, errno=self.errno, errno_name=errno_mod.errorcode.get(self.errno))
        return out


class PermissionDenied(AgentError):
    name = "PermissionDenied"
    exit_code = EXIT_REFUSED


class NotFound(AgentError):
    name = "NotFound"
    exit_code = EXIT_CANNOT_RUN


class StateCorrupt(AgentError):
    """Persisted state (state file, manifest) cannot be read back; nothing was changed."""

    name = "StateCorrupt"
    exit_code = EXIT_CANNOT_RUN


class VerificationFailed(AgentError):
    name = "VerificationFailed"
    exit_code = EXIT_FINDINGS


# Every error the agent sends, once: the D-Bus names, the exit codes and the client's mapping
# back (service/errors.py from_dbus) derive from this table.
ERRORS: tuple[type[AgentError], ...] = (
    AgentError, InvalidArgument, Busy, Cancelled, NotPrepared, PreflightFailed, AbiMismatch,
    KernelRefused, PermissionDenied, NotFound, StateCorrupt, VerificationFailed)

EXIT_CODES: dict[str, int] = {cls.name: cls.exit_code for cls in ERRORS}
