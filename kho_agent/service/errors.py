"""Errors on the bus: every AgentError becomes `org.khoagent.Agent1.Error.<Name>` with its message
(a KernelRefused or StorageFailed keeps the errno in the message: "PRESERVE_FD failed: EBUSY
(...)"), and the argument checks that turn a malformed call into InvalidArgument before anything
changes. The names and exit codes are errors.REGISTRY's."""

from __future__ import annotations

import errno as errno_mod
import math
import re
from typing import TYPE_CHECKING, Any

from ..errors import (
    REGISTRY,
    AgentError,
    DaemonNotResponding,
    DaemonUnreachable,
    InvalidArgument,
    SystemCallFailed,
)
from .interfaces import ERROR_PREFIX, NUMBER_RANGE, STRING_MAX

if TYPE_CHECKING:  # objects.py needs Gio, which kho-agentctl's local commands never load
    from .objects import Call

INTERNAL = ERROR_PREFIX + "Failed"
# "... failed: EBUSY (Device or resource busy): ..." as KernelRefused formats it
_ERRNO_IN_MESSAGE = re.compile(r"failed: (E[A-Z0-9]+) \(")


def errno_from_message(message: str) -> int | None:
    """The errno a KernelRefused message carries, for clients that get it over D-Bus."""
    found = _ERRNO_IN_MESSAGE.search(message)
    if found is None:
        return None
    value = getattr(errno_mod, found.group(1), None)
    return value if isinstance(value, int) else None


# The bus's answers while no kho-agentd owns its name (not started yet, or gone)
NOT_ON_BUS_ERRORS = ("org.freedesktop.DBus.Error.ServiceUnknown",
                     "org.freedesktop.DBus.Error.NameHasNoOwner")

__all__ = ["INTERNAL", "NOT_ON_BUS_ERRORS", "DaemonNotResponding", "DaemonUnreachable",
           "check_options", "errno_from_message", "from_dbus"]


def from_dbus(name: str, message: str) -> AgentError:
    """Rebuild an agent error from a D-Bus error (client side), keeping its name and exit code
    (errors.REGISTRY). A name that is not ours (the bus refused, a timeout) is a plain
    AgentError."""
    short = name[len(ERROR_PREFIX):] if name.startswith(ERROR_PREFIX) else None
    for entry in REGISTRY:
        if entry.name != short or not entry.on_bus or entry.error is AgentError:
            continue
        if issubclass(entry.error, SystemCallFailed):  # the daemon's text, verbatim
            return entry.error.with_message(message, "", errno_from_message(message)
                                            or errno_mod.EIO)
        return entry.error(message)
    return AgentError(f"{name}: {message}" if short is None else message)


def check_options(call: Call) -> dict[str, Any]:
    """Validate the call's a{sv} dictionary: the keys its method declares only, each with the
    variant type the contract gives, numbers finite and within their range, strings within their
    length and without NUL. The type checked is the one each variant actually had (GLib keeps
    it; Python values alone cannot tell `t` from `x`)."""
    options, signatures = call.options()
    allowed = call.declared.options or {}
    method = call.method
    out: dict[str, Any] = {}
    for key, value in options.items():
        want = allowed.get(key)
        if want is None:
            known = ", ".join(sorted(allowed)) or "none"
            raise InvalidArgument(f"{method}: unknown option {key!r:.80} (known: {known})")
        got = signatures.get(key)
        if got != want:
            raise InvalidArgument(f"{method}: option {key!r} must be of type {want!r}, not "
                                  f"{got!r:.80}")
        if want == "d":
            low, high = NUMBER_RANGE.get(key, (0.0, math.inf))
            if not math.isfinite(value) or not low <= value <= high:
                raise InvalidArgument(f"{method}: option {key!r} must be a number from {low:g} "
                                      f"to {high:g}, not {value!r}")
        if want == "s":
            if "\0" in value:
                raise InvalidArgument(f"{method}: option {key!r} contains a NUL byte")
            limit = STRING_MAX.get(key, 4096)
            if len(value.encode("utf-8", errors="surrogateescape")) > limit:
                raise InvalidArgument(f"{method}: option {key!r} is longer than {limit} bytes")
        out[key] = value
    return out
