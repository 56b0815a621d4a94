"""The errors every layer above `abi/` raises, each with a stable name and exit code.

The name is what the D-Bus service sends (`org.khoagent.Agent1.Error.<name>`) and what `--json`
output carries; the exit code is what `kho-agentctl` returns. Fleet tooling keys on both, so they
never change meaning. Errors that come from a system call keep their errno.
"""

from __future__ import annotations

import errno as errno_mod
import os
from dataclasses import dataclass
from typing import ClassVar, Self

DBUS_ERROR_PREFIX = "org.khoagent.Agent1.Error."

# The exit codes of kho-agentctl (issue 4's table; fleet tooling keys on them):
EXIT_OK = 0
EXIT_FINDINGS = 1        # a check or verification found errors
EXIT_CANNOT_RUN = 2      # usage: bad arguments, missing input, state or feature; cannot run
EXIT_REFUSED = 3         # refused by policy: a blocker, the state, a permission, a busy agent
EXIT_KERNEL = 4          # the kernel refused a system call (the errno is in the message/JSON)


def errno_text(err: int | OSError) -> str:
    """`EBADF (Bad file descriptor)`: an errno (or a failed call's OSError) by its name with its
    text, never the text alone: the one spelling of every message that names an errno. An
    OSError raised without an errno reads as EIO."""
    code = err if isinstance(err, int) else err.errno or errno_mod.EIO
    return f"{errno_mod.errorcode.get(code, str(code))} ({os.strerror(code)})"


class AgentError(Exception):
    """Base of all agent errors: a message a user can act on, plus a stable name and exit code
    (both from REGISTRY below)."""

    name: ClassVar[str]
    exit_code: ClassVar[int]

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def dbus_name(self) -> str:
        return DBUS_ERROR_PREFIX + self.name

    def to_json(self) -> dict[str, object]:
        return {"error": self.name, "message": self.message, "exit_code": self.exit_code}


class InvalidArgument(AgentError):
    pass


class Busy(AgentError):
    pass


class NotPrepared(AgentError):
    pass


class PreflightFailed(AgentError):
    pass


class Inhibited(AgentError):
    """A commit while someone holds live updates off (`kho-agentctl inhibit`, Inhibit())."""


class AbiMismatch(AgentError):
    pass


class Cancelled(AgentError):
    """The operation was cancelled on request (Job.Cancel of a running prepare) and rolled
    back."""


class SystemCallFailed(AgentError):
    """A system call failed: `errno` is the kernel's answer, `op` names what was done
    (`PRESERVE_FD`, `moving /var/lib/kho-agent/state.json aside`); the message always names the
    errno (`EBUSY (Device or resource busy)`)."""

    def __init__(self, op: str, err: int, advice: str) -> None:
        super().__init__(f"{op} failed: {errno_text(err)}: {advice}")
        self.op = op
        self.errno = err
        self.advice = advice

    @classmethod
    def with_message(cls, message: str, op: str, err: int, advice: str = "") -> Self:
        """The error with a message written elsewhere (the daemon's, read back from the bus),
        kept verbatim."""
        error = cls.__new__(cls)
        AgentError.__init__(error, message)
        error.op, error.errno, error.advice = op, err, advice
        return error

    def to_json(self) -> dict[str, object]:
        out = super().to_json()
        out.update(op=self.op, errno=self.errno, errno_name=errno_mod.errorcode.get(self.errno))
        return out


class KernelRefused(SystemCallFailed):
    """The kernel refused what the agent asked of it (an ioctl, kexec_file_load, a read of
    its state)."""


class StorageFailed(SystemCallFailed):
    """The agent's own files could not be written or moved (its state directory: a full disk,
    a read-only or missing directory): the host's kernel was not involved."""


class PermissionDenied(AgentError):
    pass


def with_message(exc: AgentError, message: str) -> AgentError:
    """`exc` again (its class; its op, errno and advice if it has them) with `message`: for
    saying more about an error on its way out without changing the one already raised."""
    if isinstance(exc, SystemCallFailed):
        return type(exc).with_message(message, exc.op, exc.errno, exc.advice)
    return type(exc)(message)


class NotFound(AgentError):
    pass


class ConfigInvalid(AgentError):
    """kho-agentd's configuration (kho-agent.conf(5)) cannot be used; the message names the file,
    the line and the key."""


class StateCorrupt(AgentError):
    """Persisted state (state file, manifest) cannot be read back; nothing was changed."""


class VerificationFailed(AgentError):
    pass


class DaemonUnreachable(AgentError):
    """No kho-agentd answers on the chosen bus (or the bus itself is missing)."""


class DaemonNotResponding(AgentError):
    """kho-agentd owns its bus name but did not answer within the command's --timeout: it is
    stopped (SIGSTOP), hung or overloaded. Whether what was asked took effect is unknown."""


class JobNotFinished(AgentError):
    """The client stopped following a job that still runs (timeout, interrupt, daemon gone)."""


class Interrupted(AgentError):
    """Ctrl-C (SIGINT) stopped the command before it finished; nothing it started is undone."""


@dataclass(frozen=True)
class Registered:
    """One error: its class, its name (`org.khoagent.Agent1.Error.<name>` on the bus, `error`
    in `--json`), kho-agentctl's exit code for it, what it means (the README's tables are these
    rows), and who raises it: kho-agentd (sent on the bus) or only the client side."""

    error: type[AgentError]
    name: str
    exit_code: int
    meaning: str
    on_bus: bool = True


# Every error, once. The classes take their names and exit codes from here; the client maps a
# D-Bus error back through it (service/errors.py from_dbus); README.md's tables list exactly
# these rows (tests/test_contract.py).
REGISTRY: tuple[Registered, ...] = (
    Registered(AgentError, "Failed", EXIT_CANNOT_RUN,
               "anything else: an internal error (the daemon log has the details), a bus "
               "error of no other name"),
    Registered(InvalidArgument, "InvalidArgument", EXIT_CANNOT_RUN,
               "bad argument; nothing was changed"),
    Registered(NotFound, "NotFound", EXIT_CANNOT_RUN,
               "no such session, file or manifest; or a digest algorithm the manifest names "
               "that this host cannot compute (blake3 without python3-blake3): "
               "verification is refused before it retrieves anything"),
    Registered(ConfigInvalid, "ConfigInvalid", EXIT_CANNOT_RUN,
               "the configuration (`/etc/kho-agent/agent.conf` or a drop-in) cannot be used: "
               "the message names the file, line and key; kho-agentd does not start"),
    Registered(StateCorrupt, "StateCorrupt", EXIT_CANNOT_RUN,
               "a state or manifest file cannot be read back (kept, never guessed at)"),
    Registered(StorageFailed, "StorageFailed", EXIT_CANNOT_RUN,
               "the agent's own state directory could not be written (full, read-only, "
               "missing); the JSON carries `errno` and `errno_name`, the message names the "
               "errno (e.g. `ENOSPC (No space left on device)`)"),
    Registered(Busy, "Busy", EXIT_REFUSED,
               "another operation runs, a client is not ready (or its file changed while it "
               "was digested), or too many unprivileged requests wait (try again)"),
    Registered(Cancelled, "Cancelled", EXIT_REFUSED,
               "the operation was cancelled on request (`Job.Cancel` of a prepare) and rolled "
               "back"),
    Registered(NotPrepared, "NotPrepared", EXIT_REFUSED,
               "commit/cancel without a prepared update"),
    Registered(PreflightFailed, "PreflightFailed", EXIT_REFUSED,
               "a blocker (the message lists them)"),
    Registered(Inhibited, "Inhibited", EXIT_REFUSED,
               "a commit while an inhibitor holds live updates off (the message names who and "
               "why; `kho-agentctl status` lists them); prepare and cancel are not held"),
    Registered(AbiMismatch, "AbiMismatch", EXIT_REFUSED,
               "the kernel's interface differs from what the agent knows"),
    Registered(PermissionDenied, "PermissionDenied", EXIT_REFUSED,
               "not allowed (root or the polkit action is needed)"),
    Registered(KernelRefused, "KernelRefused", EXIT_KERNEL,
               "a system call failed (in kho-agentd or in kho-agentctl); the JSON carries "
               "`errno` and `errno_name`, the message always names the errno (e.g. `EBADF (Bad "
               "file descriptor)`)"),
    Registered(VerificationFailed, "VerificationFailed", EXIT_FINDINGS,
               "the live update lost or changed something (the report lists it)"),
    Registered(DaemonUnreachable, "DaemonUnreachable", EXIT_CANNOT_RUN,
               "no `kho-agentd` on that bus, or no bus", on_bus=False),
    Registered(JobNotFinished, "JobNotFinished", EXIT_CANNOT_RUN,
               "stopped following a job that still runs (timeout, Ctrl-C, the daemon left the "
               "bus)", on_bus=False),
    Registered(DaemonNotResponding, "DaemonNotResponding", EXIT_CANNOT_RUN,
               "kho-agentd owns its name but did not answer within `--timeout` (stopped, hung, "
               "overloaded); whether the request took effect is unknown", on_bus=False),
    Registered(Interrupted, "Interrupted", EXIT_CANNOT_RUN,
               "Ctrl-C stopped kho-agentctl; what already ran in kho-agentd continues",
               on_bus=False),
)


def _name_the_classes() -> None:
    """Each registered class gets its name and exit code (subclasses inherit them)."""
    for entry in REGISTRY:
        entry.error.name = entry.name
        entry.error.exit_code = entry.exit_code


_name_the_classes()

ERRORS: tuple[type[AgentError], ...] = tuple(e.error for e in REGISTRY)
EXIT_CODES: dict[str, int] = {e.name: e.exit_code for e in REGISTRY}
